"""Artifacts: content-addressed blobs plus small named pointers.

Layout::

    blobs/sha256/<hex>             the content, written If-None-Match (stored once)
    <scope>/artifacts/<name>       pointer (ArtifactPointer JSON); name may contain '/'

Guarantees:
- Files are streamed, never read whole into memory: ``put`` hashes the file in 1 MiB chunks,
  then uploads it with ``Store.put_file`` (multipart above the threshold on S3).
- Identical content is stored once: a blob that already exists is not uploaded again (S3: one
  HEAD first; a Conflict on the If-None-Match write means someone stored it meanwhile — fine).
- ``get`` streams the blob into a temp file next to ``dest`` while hashing, and only renames it
  to ``dest`` when the digest matches: on mismatch it raises IntegrityError and leaves no
  ``dest`` (nor temp file) behind.
- The pointer is written after the blob, so a pointer never names a missing blob; re-putting a
  name overwrites the pointer (last write wins).
- The file must not change while ``put`` runs (the digest is of the content first read);
  ``get`` detects it if it did.
Requests: put = (S3: 1 HEAD) + blob upload (0 if already stored) + 1 PUT pointer; get = 1 GET
pointer + 1 GET blob; list = 1 LIST + 1 GET per artifact.
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
from pathlib import Path

from pydantic import BaseModel

from dagcraft.errors import Conflict, IntegrityError, NotFound
from dagcraft.primitives.keys import validate_key, validate_relpath
from dagcraft.primitives.store import Store
from dagcraft.primitives.ulid import new_ulid

_CHUNK = 1 << 20


class ArtifactPointer(BaseModel):
    name: str
    digest: str  # "sha256:<hex>"
    size: int
    content_type: str
    uploader: str
    created_at: float
    scope: str


def blob_key(digest: str) -> str:
    algo, _, hexd = digest.partition(":")
    return f"blobs/{algo}/{hexd}"


def pointer_key(scope: str, name: str) -> str:
    validate_relpath(name, "artifact name")
    return validate_key(f"{scope}/artifacts/{name}")


def file_digest(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return "sha256:" + h.hexdigest(), size


def put(store: Store, path: Path, *, scope: str, name: str, uploader: str,
        content_type: str | None = None) -> ArtifactPointer:
    """Upload ``path`` as artifact ``name`` in ``scope``; return its pointer."""
    pkey = pointer_key(scope, name)
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"no such file: {path}")
    digest, size = file_digest(path)
    bkey = blob_key(digest)
    head = getattr(store, "head", None)
    if head is None or head(bkey) is None:
        try:
            store.put_file(bkey, path, if_none_match=True)
        except Conflict:
            pass  # already stored by someone: content-addressed, so identical
    ptr = ArtifactPointer(name=name, digest=digest, size=size,
                          content_type=content_type or mimetypes.guess_type(name)[0] or "application/octet-stream",
                          uploader=uploader, created_at=store.now(), scope=scope)
    store.put(pkey, ptr.model_dump_json().encode())
    return ptr


def stat(store: Store, *, scope: str, name: str) -> ArtifactPointer:
    got = store.get(pointer_key(scope, name))
    if got is None:
        raise NotFound(f"artifact {name!r} not found in {scope}")
    return ArtifactPointer.model_validate_json(got[0])


def get(store: Store, *, scope: str, name: str, dest: Path) -> ArtifactPointer:
    """Download artifact ``name`` to ``dest``, verifying its digest (IntegrityError if not)."""
    ptr = stat(store, scope=scope, name=name)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{new_ulid()}.part"
    h = hashlib.sha256()
    try:
        try:
            body = store.open_read(blob_key(ptr.digest))
        except NotFound:
            raise NotFound(f"artifact {name!r}: blob {ptr.digest} missing") from None
        with body, open(tmp, "wb") as out:
            while chunk := body.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
        if "sha256:" + h.hexdigest() != ptr.digest:
            raise IntegrityError(f"artifact {name!r}: content does not match digest {ptr.digest}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return ptr


def list_artifacts(store: Store, scope: str) -> list[ArtifactPointer]:
    """Pointers of all artifacts in ``scope``, sorted by name."""
    base = f"{scope}/artifacts/"
    out = []
    for k in store.list(base):
        got = store.get(k)
        if got is not None:
            out.append(ArtifactPointer.model_validate_json(got[0]))
    return out
