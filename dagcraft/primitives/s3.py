"""S3Store: the Store protocol on an S3-compatible bucket (AWS S3, MinIO, Ceph, R2, moto).

Imported lazily (boto3 costs ~150 ms to import): only ``s3://`` stores load this module.

- Credentials: boto3's standard chain (env, profile, instance role). Endpoint: ``endpoint_url``
  (``?endpoint=`` in the URL), else ``$AWS_ENDPOINT_URL``; with a custom endpoint, path-style
  addressing is used (MinIO/Ceph need it).
- Conditional writes: ``put(if_none_match=True)`` sends ``If-None-Match: *``,
  ``put(if_match=etag)`` sends ``If-Match``; HTTP 412 (PreconditionFailed), 409
  (ConditionalRequestConflict) and 404 on If-Match raise :class:`Conflict`. Atomicity is the
  server's: S3 guarantees one winner among concurrent conditional writers.
- Adapted to the bucket's probed capabilities (``apply_capabilities``, from
  :mod:`dagcraft.primitives.capabilities`): ``If-Match`` unquoted where the quoted form is
  refused (Ceph RGW); a create-if-absent ``put_file`` is one streamed PUT (up to 5 GiB) where
  CompleteMultipartUpload ignores ``If-None-Match``; ``list`` always sorts and filters
  ``start_after`` client side, and sends ``start_after``/``limit`` to the server only where it
  lists in byte order (not SeaweedFS). Until a record is applied, AWS behaviour is assumed.
- Transient errors (connection errors/resets, timeouts, 5xx, throttling) are retried with
  tenacity: exponential backoff with full jitter, at most ``attempts`` tries. botocore's own
  retries are disabled so every HTTP request is visible and counted in ``stats``. ``get``
  retries "GET + read the body" as one unit, so a connection that breaks while the body
  streams in is retried too (and is StoreUnavailable if it keeps breaking); ``open_read``
  hands the stream to the caller, whose reads are not retried.
- No false Conflict: every put carries a unique ``x-amz-meta-write-id``. If a conditional put
  is retried and the retry gets Conflict, the store HEADs the object: when it carries our write
  id, the first try landed (only its response was lost) and the put succeeds. When a
  conditional put exhausts its retries on HTTP 500 (Ceph RGW answers race losers so while
  the race lasts), the store HEADs too: our write id → success; a create meeting another writer's
  object → Conflict (it lost); else StoreUnavailable.
- Clock: ``now()`` = local clock + an offset learned from the ``Date`` header of responses
  (no extra request); clamped to never go backwards within the process.
- Errors never include secrets: unreachable endpoint, missing credentials, access denied and
  missing bucket raise :class:`StoreUnavailable` naming the endpoint and bucket only.

Requests per method: get = 1 GET, put = 1 PUT (+1 HEAD only after a retried conditional put
got Conflict), list = 1 LIST per 1000 keys, delete = 1 DELETE, put_file = 1 PUT for files up
to ``multipart_threshold`` else 1 create + N parts + 1 complete, open_read = 1 GET (streamed).
"""

from __future__ import annotations

import email.utils
import os
import shlex
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import boto3
import botocore.config
import botocore.exceptions as bex
import tenacity
import urllib3.exceptions as u3ex

from dagcraft.errors import Conflict, InvalidInput, NotFound, StoreUnavailable
from dagcraft.primitives.capabilities import Capabilities
from dagcraft.primitives.keys import validate_key, validate_prefix
from dagcraft.primitives.store import LIST_PAGE
from dagcraft.primitives.ulid import new_ulid

_OPS = {
    "GetObject": "get", "PutObject": "put", "ListObjectsV2": "list", "DeleteObject": "delete",
    "HeadObject": "head", "HeadBucket": "head_bucket", "CreateMultipartUpload": "multipart_create",
    "UploadPart": "multipart_part", "CompleteMultipartUpload": "multipart_complete",
    "AbortMultipartUpload": "multipart_abort", "CreateBucket": "create_bucket",
}
_TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "Throttling", "ThrottlingException",
                    "RequestTimeout", "RequestTimeTooSkewed", "500", "502", "503", "504"}
_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}
_MISSING = {"NoSuchKey", "404", "NotFound"}
_AUTH = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "InvalidToken",
         "ExpiredToken", "AuthorizationHeaderMalformed"}


def _code(exc: bex.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: bex.ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


#: the connection broke while a response body was being read (reset, truncated, stalled):
#: botocore wraps urllib3's errors in the first two; the urllib3 ones can escape raw
_BODY_ERRORS: tuple[type[Exception], ...] = (bex.ResponseStreamingError, bex.IncompleteReadError,
                                             u3ex.ProtocolError, u3ex.ReadTimeoutError)


class _ServerError(StoreUnavailable):
    """Retries exhausted on an HTTP error the server answered (``status``: its code)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, (bex.EndpointConnectionError, bex.ConnectionClosedError, bex.ReadTimeoutError,
                        bex.ConnectTimeoutError) + _BODY_ERRORS):
        return True
    if isinstance(exc, bex.ClientError):
        return _code(exc) in _TRANSIENT_CODES or _status(exc) >= 500
    return False


def _etag(resp: Any) -> str:
    """The ETag of a response (GET/PUT/HEAD/complete), without its quotes."""
    return str(resp["ETag"]).strip('"')


def _safe_endpoint(url: str | None) -> str:
    if not url:
        return "AWS S3"
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{':' + str(parts.port) if parts.port else ''}"


def make_client(endpoint_url: str | None = None, region: str | None = None) -> Any:
    """A boto3 S3 client configured as S3Store uses it: botocore retries off (the store retries
    and counts every request), path-style addressing when a custom endpoint is given."""
    cfg = botocore.config.Config(
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=5, read_timeout=30, max_pool_connections=32,
        s3={"addressing_style": "path"} if endpoint_url else None,
    )
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint_url,
                          region_name=region or session.region_name or "us-east-1", config=cfg)


#: S3's largest single PUT (5 GiB)
MAX_SINGLE_PUT = 5 << 30

#: upper bound assumed for the time between the server stamping Date and us reading it
_MAX_LATENCY = 0.1


class S3Store:
    """Store on an S3 bucket under ``prefix``. See the module docstring for guarantees."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, client: Any = None,
                 *, region: str | None = None, attempts: int = 5, multipart_threshold: int = 16 << 20,
                 part_size: int = 8 << 20, max_wait: float = 2.0) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            validate_key(self.prefix, "store prefix")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        self.region = region
        self.stats: Counter[str] = Counter()
        self.attempts = attempts
        self.multipart_threshold = multipart_threshold
        self.part_size = max(part_size, 5 << 20)
        self.max_wait = max_wait
        self.page_size = LIST_PAGE
        self._client = client
        # adapted to the bucket's probed capabilities (apply_capabilities); until then the
        # AWS behaviour is assumed
        self._quote_if_match = True
        self._multipart_conditional = True
        self._list_server_side = True
        #: the bucket's capabilities as this instance learned them (apply_capabilities)
        self.capabilities: Capabilities | None = None
        self._adapting = threading.local()
        self._client_lock = threading.Lock()
        self._offset = 0.0
        # bounds on (server clock - local clock) learned from Date headers; see _learn_clock
        self._off_lo: float | None = None
        self._off_hi: float | None = None
        self._last_now = 0.0
        self._now_lock = threading.Lock()
        if client is not None:
            self._hook(client)
        # the URL reopens this store (subprocesses' --store, printed hints): endpoint and region
        params = [f"endpoint={_safe_endpoint(endpoint_url)}"] if endpoint_url else []
        params += [f"region={region}"] if region else []
        q = "?" + "&".join(params) if params else ""
        self.url = f"s3://{bucket}/{self.prefix}{q}" if self.prefix else f"s3://{bucket}{q}"
        self.where = f"s3://{bucket}/{self.prefix} at {_safe_endpoint(self.endpoint_url)}"

    def __repr__(self) -> str:
        return f"S3Store({self.where})"

    # -- client --------------------------------------------------------------------------
    def _hook(self, client: Any) -> None:
        client.meta.events.register("before-call.s3.*", self._count)
        client.meta.events.register("after-call.s3.*", self._learn_clock)

    def _count(self, request: Any = None, event_name: str = "", **_: Any) -> None:
        op = event_name.rsplit(".", 1)[-1]
        self.stats[_OPS.get(op, op)] += 1

    def _learn_clock(self, http_response: Any = None, **_: Any) -> None:
        try:
            date = http_response.headers.get("Date") if http_response is not None else None
        except Exception:  # pragma: no cover - defensive
            date = None
        if not date:
            return
        try:
            server = email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            return
        # Date has 1 s resolution: when the server stamped it, its clock was in
        # [server, server + 1); the stamp happened shortly before we got the response. Each
        # response therefore bounds the offset; intersecting the bounds narrows it to well
        # under a second after a few responses that straddle a second boundary, instead of
        # jumping by up to ±0.5 s with every response.
        local = time.time()
        lo, hi = server - local, server + 1.0 + _MAX_LATENCY - local
        with self._now_lock:
            if self._off_lo is None or self._off_hi is None or lo > self._off_hi or hi < self._off_lo:
                self._off_lo, self._off_hi = lo, hi  # first sample, or a clock jump: start over
            else:
                self._off_lo, self._off_hi = max(self._off_lo, lo), min(self._off_hi, hi)
            self._offset = (self._off_lo + self._off_hi) / 2

    @property
    def client(self) -> Any:
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    try:
                        client = make_client(self.endpoint_url, self.region)
                    except ValueError as exc:
                        raise StoreUnavailable(f"{self.where}: invalid endpoint ({exc})") from None
                    except bex.BotoCoreError as exc:
                        raise StoreUnavailable(f"{self.where}: {type(exc).__name__}") from None
                    self._hook(client)
                    self._client = client
        return self._client

    def _key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, op: Any, _counter: list[int] | None = None, **kw: Any) -> Any:
        """Call a client method with transient-error retries; map errors to typed ones."""
        client = self.client

        fn = getattr(client, op) if isinstance(op, str) else op

        def once() -> Any:
            if _counter is not None:
                _counter[0] += 1
            return fn(**kw)

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(_transient),
            stop=tenacity.stop_after_attempt(self.attempts),
            wait=tenacity.wait_random_exponential(multiplier=0.05, max=self.max_wait),
            reraise=True,
        )
        # every StoreUnavailable names the store, the operation and the key (never a secret)
        where = f"{self.where}: {self._what(op, kw)}"
        try:
            return retrying(once)
        except bex.ClientError as exc:
            code = _code(exc)
            if code == "NoSuchBucket":
                raise StoreUnavailable(f"{where}: {self._missing_bucket()}") from None
            if code in _AUTH:
                raise StoreUnavailable(f"{where}: access denied ({code})") from None
            if _transient(exc):
                raise _ServerError(f"{where}: server error {code or _status(exc)} after "
                                   f"{self.attempts} attempts", _status(exc)) from None
            raise
        except bex.NoCredentialsError:
            raise StoreUnavailable(f"{where}: no AWS credentials found") from None
        except (bex.EndpointConnectionError, bex.ConnectionClosedError, bex.ConnectTimeoutError,
                bex.ReadTimeoutError) as exc:
            raise StoreUnavailable(f"{where}: cannot reach endpoint ({type(exc).__name__})") from None
        except _BODY_ERRORS as exc:
            raise StoreUnavailable(f"{where}: connection lost while reading a response "
                                   f"({type(exc).__name__}) after {self.attempts} attempts") from None
        except bex.ParamValidationError as exc:
            raise InvalidInput(f"{where}: invalid request: {exc}") from None
        except bex.BotoCoreError as exc:
            raise StoreUnavailable(f"{where}: {type(exc).__name__}") from None

    _OPS = {"get_and_read": "get", "get_object": "get", "put_object": "put", "head_object": "head",
            "list_objects_v2": "list", "delete_object": "delete", "head_bucket": "check bucket",
            "create_multipart_upload": "put", "upload_part": "put", "complete_multipart_upload": "put",
            "abort_multipart_upload": "put"}

    def _what(self, op: Any, kw: dict[str, Any]) -> str:
        """``<operation> <key>`` of a client call, in the Store protocol's terms."""
        name = op if isinstance(op, str) else getattr(op, "__name__", "request")
        key = kw.get("Key", kw.get("Prefix", ""))
        if isinstance(key, str) and self.prefix and key.startswith(self.prefix + "/"):
            key = key[len(self.prefix) + 1:]
        return f"{self._OPS.get(name, name)} {key}".rstrip() if key else self._OPS.get(name, name)

    # -- protocol ------------------------------------------------------------------------
    def get(self, key: str) -> tuple[bytes, str] | None:
        k = self._key(key)

        def get_and_read(**kw: Any) -> tuple[bytes, str]:
            # The retried unit is "GET + read the body": a connection reset while the body
            # streams in is retried (a fresh GET) and, if it persists, mapped like any other
            # transient error, instead of escaping as a raw botocore/urllib3 exception.
            resp = self.client.get_object(**kw)
            body = resp["Body"]
            try:
                data: bytes = body.read()
            finally:
                body.close()
            return data, _etag(resp)

        try:
            got: tuple[bytes, str] = self._call(get_and_read, Bucket=self.bucket, Key=k)
        except bex.ClientError as exc:
            if _code(exc) in _MISSING:
                return None
            raise
        return got

    def put(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidInput(f"put {key!r}: data must be bytes")
        k = self._key(key)
        return self._put(k, key, {"Body": bytes(data)}, if_none_match, if_match)

    def _put(self, k: str, key: str, body: dict[str, Any], if_none_match: bool, if_match: str | None,
             reopen: Any = None) -> str:
        write_id = new_ulid()
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": k, "Metadata": {"write-id": write_id}, **body}
        if if_none_match:
            kw["IfNoneMatch"] = "*"
        if if_match is not None:
            self._adapt()
            kw["IfMatch"] = f'"{if_match}"' if self._quote_if_match else if_match
        tries = [0]
        try:
            if reopen is None:
                resp = self._call("put_object", tries, **kw)
            else:
                resp = self._call_reopen(reopen, tries, kw)
        except bex.ClientError as exc:
            code = _code(exc)
            if code in _CONFLICT_CODES or _status(exc) in (409, 412) or (if_match and code in _MISSING):
                if tries[0] > 1:
                    landed = self._landed(k, write_id)
                    if landed is not None:
                        return landed
                what = "already exists" if if_none_match else "version mismatch"
                raise Conflict(f"{key}: {what}") from None
            raise
        except _ServerError as exc:
            if exc.status != 500 or not (if_none_match or if_match is not None):
                raise
            landed = self._decided_by_object(k, key, write_id, if_none_match)
            if landed is None:
                raise
            return landed
        return _etag(resp)

    def _call_reopen(self, reopen: Any, tries: list[int], kw: dict[str, Any]) -> Any:
        # A streamed body must be rewound on each try: open the file anew per attempt.
        def put_object(**kw2: Any) -> Any:
            with reopen() as f:
                return self.client.put_object(Body=f, **kw2)

        return self._call(put_object, tries, **kw)

    def _landed(self, k: str, write_id: str) -> str | None:
        """After a retried conditional put got Conflict: did our first try land?"""
        head = self._head(k)
        if head is not None and head.get("Metadata", {}).get("write-id") == write_id:
            return _etag(head)
        return None

    def _decided_by_object(self, k: str, key: str, write_id: str, create: bool) -> str | None:
        """A conditional put exhausted its retries on HTTP 500 (RGW answers race losers so,
        and keeps doing so while the race lasts): the object decides. Ours → the put landed (its ETag);
        a create meeting another writer's object → it lost (Conflict, not an outage); else
        None (the caller re-raises StoreUnavailable)."""
        try:
            head = self._head(k)
        except StoreUnavailable:
            return None
        if head is not None and head.get("Metadata", {}).get("write-id") == write_id:
            return _etag(head)
        if head is not None and create:
            raise Conflict(f"{key}: already exists") from None
        return None

    def _head(self, k: str) -> dict[str, Any] | None:
        """HEAD ``k``: its response, or None when it is missing (StoreUnavailable propagates)."""
        try:
            head: dict[str, Any] = self._call("head_object", Bucket=self.bucket, Key=k)
        except bex.ClientError:
            return None
        return head

    def list(self, prefix: str, start_after: str | None = None, limit: int | None = None) -> list[str]:
        """Sorted and cut by ``start_after`` client side whatever the server's order (sorting
        what is already sorted is linear). ``start_after`` and ``limit`` reach the server only
        when the probe confirmed it lists in byte order and never skips a key after
        ``start_after``; else every key under ``prefix`` is listed (correct, costlier)."""
        validate_prefix(prefix)
        base = f"{self.prefix}/" if self.prefix else ""
        if start_after is not None or limit is not None:
            self._adapt()
        server_side = self._list_server_side
        out: list[str] = []
        token: str | None = None
        while not server_side or limit is None or len(out) < limit:
            page = self.page_size if limit is None or not server_side else min(self.page_size, limit - len(out))
            kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": base + prefix, "MaxKeys": page}
            if token:
                kw["ContinuationToken"] = token
            elif start_after is not None and server_side:
                kw["StartAfter"] = base + start_after
            resp = self._call("list_objects_v2", **kw)
            for item in resp.get("Contents", []):
                key = item["Key"][len(base):]
                if start_after is None or key > start_after:
                    out.append(key)
            if not resp.get("IsTruncated"):
                break
            token = resp.get("NextContinuationToken")
        out.sort()
        return out if limit is None else out[:limit]

    def delete(self, key: str) -> None:
        self._call("delete_object", Bucket=self.bucket, Key=self._key(key))

    def now(self) -> float:
        with self._now_lock:
            t = max(time.time() + self._offset, self._last_now)
            self._last_now = t
            return t

    def put_file(self, key: str, path: Path, *, if_none_match: bool = False, consume: bool = False) -> str:
        k = self._key(key)
        path = Path(path)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise NotFound(f"no such file: {path}") from None
        # A server that ignores If-None-Match on CompleteMultipartUpload (Ceph RGW) would let
        # a second create overwrite silently: there a create-if-absent is one streamed PUT,
        # which it does enforce, up to S3's single-PUT limit, and refused beyond it.
        if if_none_match and size > self.multipart_threshold:
            self._adapt()
        single = size <= self.multipart_threshold or (if_none_match and not self._multipart_conditional)
        if single and size > MAX_SINGLE_PUT:
            raise InvalidInput(f"put {key}: {size} bytes is more than {self.where} can create-if-absent "
                               f"({MAX_SINGLE_PUT} bytes: it ignores If-None-Match on multipart uploads)")
        if single:
            return self._put(k, key, {}, if_none_match, None, reopen=lambda: open(path, "rb"))
        return self._multipart(k, key, path, if_none_match)

    def _multipart(self, k: str, key: str, path: Path, if_none_match: bool) -> str:
        write_id = new_ulid()
        up = self._call("create_multipart_upload", Bucket=self.bucket, Key=k, Metadata={"write-id": write_id})
        upload_id = up["UploadId"]
        parts = []
        try:
            with open(path, "rb") as f:
                n = 1
                while chunk := f.read(self.part_size):  # one part in memory at a time
                    r = self._call("upload_part", Bucket=self.bucket, Key=k, UploadId=upload_id,
                                   PartNumber=n, Body=chunk)
                    parts.append({"PartNumber": n, "ETag": r["ETag"]})
                    n += 1
            kw: dict[str, Any] = {"Bucket": self.bucket, "Key": k, "UploadId": upload_id,
                                  "MultipartUpload": {"Parts": parts}}
            if if_none_match:
                kw["IfNoneMatch"] = "*"
            tries = [0]
            try:
                resp = self._call("complete_multipart_upload", tries, **kw)
            except bex.ClientError as exc:
                if _code(exc) in _CONFLICT_CODES or _status(exc) in (409, 412):
                    if tries[0] > 1 and (landed := self._landed(k, write_id)):
                        return landed
                    raise Conflict(f"{key}: already exists") from None
                raise
            except _ServerError as exc:
                if exc.status != 500 or not if_none_match or \
                        (landed := self._decided_by_object(k, key, write_id, True)) is None:
                    raise
                return landed
            # RGW answers a completed upload with an empty ETag: ask for the stored one
            return _etag(resp) or self.head(key) or ""
        except BaseException:
            try:
                self._call("abort_multipart_upload", Bucket=self.bucket, Key=k, UploadId=upload_id)
            except Exception:
                pass
            raise

    def _adapt(self) -> None:
        """Before this instance's first request whose form depends on the server (a CAS, a
        listing cut by ``start_after``/``limit``, a large create-if-absent), learn the bucket's
        capabilities: one GET of the recorded probe per store instance (the probe itself only for a
        bucket never probed), so every command and every step's ``dagcraft agent …`` speaks
        the form the server accepts, not only those that ``require`` it. The probe's own
        writes come back here and use the defaults (per-thread guard)."""
        if self.capabilities is not None or getattr(self._adapting, "on", False):
            return
        from dagcraft.primitives import capabilities

        self._adapting.on = True
        try:
            capabilities.load(self)
        finally:
            self._adapting.on = False

    def apply_capabilities(self, caps: Capabilities) -> None:
        """Adapt to the bucket's probed behaviour: the If-Match form it accepts, whether a
        multipart create-if-absent is enforced, whether listings may be cut server side."""
        self.capabilities = caps
        self._quote_if_match = caps.if_match_quoted or not caps.if_match_unquoted
        self._multipart_conditional = caps.multipart_create_if_absent
        self._list_server_side = caps.list_server_side

    def raw(self, op: str, key: str, **kw: Any) -> tuple[int, dict[str, Any]]:
        """One client call ``op`` on store key ``key`` (the prefix for ``list_objects_v2``,
        whose response gains ``Keys``: the store keys listed): no error mapping and only
        5xx retried, so the capability probe measures the server itself. Returns (HTTP
        status, response). Unreachable endpoint: StoreUnavailable."""
        base = f"{self.prefix}/" if self.prefix else ""
        args: dict[str, Any] = {"Bucket": self.bucket, **kw}
        if op == "list_objects_v2":
            args["Prefix"] = base + key
            if "StartAfter" in kw:
                args["StartAfter"] = base + kw["StartAfter"]
        else:
            args["Key"] = self._key(key)
        st, resp = 500, {}
        for _ in range(3):  # a 5xx is the server's trouble, not its answer: ask again
            try:
                resp = getattr(self.client, op)(**args)
                st = int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 200))
            except bex.ClientError as exc:
                if _code(exc) == "NoSuchBucket" or _code(exc) in _AUTH:
                    self._call(op, **args)  # raises the one-line StoreUnavailable
                    raise
                st, resp = _status(exc) or 500, dict(exc.response)
            except (bex.BotoCoreError,) + _BODY_ERRORS as exc:
                raise StoreUnavailable(f"{self.where}: {self._what(op, args)}: cannot reach endpoint "
                                       f"({type(exc).__name__})") from None
            if st < 500:
                break
        if op == "list_objects_v2":
            resp["Keys"] = [c["Key"][len(base):] for c in resp.get("Contents", [])]
        return st, resp

    def open_read(self, key: str) -> BinaryIO:
        k = self._key(key)
        try:
            resp = self._call("get_object", Bucket=self.bucket, Key=k)
        except bex.ClientError as exc:
            if _code(exc) in _MISSING:
                raise NotFound(f"{key}: not found") from None
            raise
        body: BinaryIO = resp["Body"]  # botocore StreamingBody: read(n), close(), iter_chunks()
        return body

    def head(self, key: str) -> str | None:
        """Etag of ``key`` or None (1 HEAD): cheap existence check for large blobs."""
        k = self._key(key)
        try:
            return _etag(self._call("head_object", Bucket=self.bucket, Key=k))
        except bex.ClientError as exc:
            if _code(exc) in _MISSING or _status(exc) == 404:
                return None
            raise

    def _missing_bucket(self) -> str:
        """Why a missing bucket fails, with the command that creates it (dagcraft never
        creates buckets: where and how is the operator's choice)."""
        mb = ["aws", "s3", "mb", f"s3://{self.bucket}"]
        if self.endpoint_url:
            mb += ["--endpoint-url", _safe_endpoint(self.endpoint_url)]
        return f"bucket {self.bucket!r} does not exist; create it with: {shlex.join(mb)}"

    def check_bucket(self) -> None:
        """Raise StoreUnavailable unless the bucket is reachable (1 HEAD bucket)."""
        try:
            self._call("head_bucket", Bucket=self.bucket)
        except bex.ClientError as exc:
            if _status(exc) == 404 or _code(exc) in ("404", "NoSuchBucket"):
                raise StoreUnavailable(f"{self.where}: {self._missing_bucket()}") from None
            if _status(exc) == 403:
                raise StoreUnavailable(f"{self.where}: access denied") from None
            raise
