"""Store URL resolution: ``open_store(url)`` → a Store.

Resolution order: the ``url`` argument (``--store``), else ``$DAGCRAFT_STORE``, else
``.dagcraft`` in the current directory. Accepted forms:

- a local path, or ``file:///abs/path`` → :class:`LocalStore`
- ``s3://bucket/prefix`` with optional ``?endpoint=http://host:port`` (else ``AWS_ENDPOINT_URL``)
  and ``?region=...`` → :class:`S3Store` (boto3 is imported only then).
"""

from __future__ import annotations

import os
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from dagcraft.errors import InvalidInput
from dagcraft.primitives.store import Store

DEFAULT_LOCAL = ".dagcraft"


def resolve_store_url(url: str | None = None) -> str:
    """The store URL to use: ``url``, else ``$DAGCRAFT_STORE``, else ``.dagcraft``."""
    return url or os.environ.get("DAGCRAFT_STORE") or DEFAULT_LOCAL


def s3_url(bucket: str, prefix: str = "", endpoint: str | None = None, **params: str) -> str:
    """Build ``s3://bucket/prefix?endpoint=...`` (for tests and subprocesses)."""
    q = {}
    if endpoint:
        q["endpoint"] = endpoint
    q.update(params)
    base = f"s3://{bucket}/{prefix.strip('/')}" if prefix else f"s3://{bucket}"
    return base + (("?" + urlencode(q)) if q else "")


def open_store(url: str | None = None, *, create: bool = True) -> Store:
    """Open the store named by ``url`` (see module docstring). Raises InvalidInput for a
    malformed URL; S3 connectivity problems surface as StoreUnavailable on first use. With
    ``create=False`` (read-only commands) a local path that holds no store raises NotFound
    ("no store at PATH") and nothing is created; an S3 store is never created either way."""
    url = resolve_store_url(url)
    if "\x00" in url:
        raise InvalidInput("invalid store URL: contains NUL")
    if url.startswith("s3://"):
        parts = urlsplit(url)
        bucket = parts.netloc
        if not bucket:
            raise InvalidInput(f"invalid store URL {url!r}: missing bucket")
        q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(q) - {"endpoint", "region"}
        if unknown:
            raise InvalidInput(f"invalid store URL: unknown parameter(s) {', '.join(sorted(unknown))}")
        from dagcraft.primitives.s3 import S3Store

        return S3Store(bucket, unquote(parts.path).strip("/"), endpoint_url=q.get("endpoint"),
                       region=q.get("region"))
    if url.startswith("file://"):
        path = unquote(urlsplit(url).path)
        if not path:
            raise InvalidInput(f"invalid store URL {url!r}: missing path")
    elif "://" in url:
        raise InvalidInput(f"unsupported store URL {url.split('://')[0]}://... (use a path or s3://)")
    else:
        path = url
    from dagcraft.primitives.local import LocalStore

    return LocalStore(path, create=create)
