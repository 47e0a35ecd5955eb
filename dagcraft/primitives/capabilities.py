"""What a store's server actually does: probed once per bucket, recorded in it, adapted to, enforced.

dagcraft's coordination rests on a few server behaviours (see docs/store.md, "What dagcraft needs
from a bucket"). S3-compatible servers differ on them (Ceph RGW refuses a quoted ``If-Match`` and
ignores ``If-None-Match`` on CompleteMultipartUpload; SeaweedFS lists in tree order), so instead
of assuming, dagcraft measures:

- :func:`probe` runs a fixed set of requests (:data:`PROBE_REQUESTS`, on scratch keys under
  ``_dagcraft/probe/<ulid>/``, deleted afterwards) and returns a :class:`Capabilities` record.
- :func:`load` returns the record for a store: the one its store instance already learned; else the one
  recorded at :data:`RECORD_KEY` (1 GET) when it was written by this :data:`PROTOCOL_VERSION`;
  else a fresh probe, recorded (create-if-absent; a concurrent prober's record wins) when the
  store gives every required guarantee. A failed probe is never recorded, so a transient
  failure cannot brand a bucket. The S3 backend is adapted to the record (``apply_capabilities``).
- :func:`require` is ``load`` + refuse: :class:`StoreUnavailable` (exit 5) with ONE line naming
  what is missing and what to do. ``dagcraft run``, ``submit`` and ``worker`` call it before
  anything else touches the store.

A :class:`~dagcraft.primitives.local.LocalStore` implements every capability by construction:
its record is :meth:`Capabilities.full`, with no request at all.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from dagcraft.errors import Conflict, StoreUnavailable
from dagcraft.primitives.store import Store
from dagcraft.primitives.ulid import new_ulid

#: bump when dagcraft starts relying on a capability the recorded probe did not measure
PROTOCOL_VERSION = 1
RECORD_KEY = "_dagcraft/capabilities.json"
PROBE_PREFIX = "_dagcraft/probe/"
#: requests one S3 probe makes, by kind (fixed: asserted by the tests)
PROBE_REQUESTS = {"put": 8, "multipart_create": 1, "multipart_part": 1, "multipart_complete": 1,
                  "multipart_abort": 1, "list": 2, "delete": 5, "head": 1}


class Capabilities(BaseModel):
    """What one bucket (store URL) was measured to do. Crosses process boundaries as the JSON
    at :data:`RECORD_KEY`."""

    protocol: int = PROTOCOL_VERSION
    #: ``put(if_none_match=True)`` on an existing key is refused
    create_if_absent: bool
    #: ``If-Match: "<etag>"`` (quoted, as RFC 9110 and AWS spell it) with the current etag is accepted
    if_match_quoted: bool
    #: ``If-Match: <etag>`` (unquoted) with the current etag is accepted
    if_match_unquoted: bool
    #: a compare-and-swap with a stale etag is refused (in the accepted form)
    cas_refuses_stale: bool
    #: HTTP status of If-Match on a missing key (AWS: 404; some servers: 412); both are Conflict
    if_match_missing_status: int = 0
    #: CompleteMultipartUpload with ``If-None-Match: *`` on an existing key is refused
    multipart_create_if_absent: bool
    #: LIST returns keys in UTF-8 byte order
    list_byte_order: bool
    #: ``start_after`` never returns a key <= it
    start_after_exact: bool
    #: ``start_after`` never skips a key > it
    start_after_complete: bool
    #: DeleteObject with a stale ``If-Match`` is refused
    conditional_delete: bool

    @classmethod
    def full(cls) -> Capabilities:
        """Every capability (LocalStore: implemented by construction, never probed)."""
        return cls(create_if_absent=True, if_match_quoted=True, if_match_unquoted=True, cas_refuses_stale=True,
                   if_match_missing_status=412, multipart_create_if_absent=True, list_byte_order=True,
                   start_after_exact=True, start_after_complete=True, conditional_delete=True)

    def missing(self) -> list[str]:
        """The required guarantees this store lacks (empty: dagcraft can coordinate on it).
        Everything else is adapted to (see docs/store.md)."""
        out = []
        if not self.create_if_absent:
            out.append("conditional create (PUT If-None-Match: * on an existing key was not refused)")
        if not (self.if_match_quoted or self.if_match_unquoted):
            out.append("compare-and-swap (PUT If-Match with the current etag was refused, quoted and unquoted)")
        elif not self.cas_refuses_stale:
            out.append("compare-and-swap (PUT If-Match with a stale etag was not refused)")
        return out

    @property
    def list_server_side(self) -> bool:
        """Whether ``start_after``/``limit`` may be sent to the server (else: list everything
        under the prefix and cut client side)."""
        return self.list_byte_order and self.start_after_complete


def _remedy(store: Store) -> str:
    return (f"dagcraft cannot coordinate workers on it; use a server that enforces S3 conditional "
            f"writes (If-None-Match and If-Match on PUT, as AWS S3 and MinIO do) or a local directory, "
            f"then probe again with: dagcraft store check {store.url}")


def _raw(store: Store) -> Any:
    """The store's probe transport (``S3Store.raw``), or None for a store that needs no probe."""
    return getattr(store, "raw", None)


def load(store: Store, *, reprobe: bool = False) -> Capabilities:
    """The store's capabilities (see the module docstring for the order of sources), applied
    to the store. Raises StoreUnavailable when the store cannot be reached."""
    raw = _raw(store)
    if raw is None:
        return Capabilities.full()
    # held by the store instance that learned them (no process-wide cache: a store opened
    # again, as by another process, reads the record again)
    cached: Capabilities | None = None if reprobe else getattr(store, "capabilities", None)
    if cached is None:
        got = store.get(RECORD_KEY)
        rec = _parse(got[0]) if got is not None else None
        if rec is None or reprobe:
            rec = probe(store)
            if not rec.missing():
                _record(store, rec, got[1] if got is not None else None)
        cached = rec
    _apply(store, cached)
    return cached


def require(store: Store) -> Capabilities:
    """:func:`load`, then refuse a store lacking a required guarantee: StoreUnavailable (exit 5),
    one line naming what is missing and what to do. Nothing else is written."""
    caps = load(store)
    gaps = caps.missing()
    if gaps:
        raise StoreUnavailable(f"store {store.url} lacks {'; '.join(gaps)}: {_remedy(store)}")
    return caps


def _parse(data: bytes) -> Capabilities | None:
    try:
        rec = Capabilities.model_validate_json(data)
    except ValidationError:
        return None  # unreadable or from another dagcraft: probe again
    return rec if rec.protocol == PROTOCOL_VERSION else None


def _record(store: Store, rec: Capabilities, etag: str | None) -> None:
    data = rec.model_dump_json().encode()
    try:
        if etag is None:
            store.put(RECORD_KEY, data, if_none_match=True)
        else:
            store.put(RECORD_KEY, data, if_match=etag)
    except Conflict:
        pass  # a concurrent prober recorded first: same server, same answers


def _apply(store: Store, caps: Capabilities) -> None:
    apply = getattr(store, "apply_capabilities", None)
    if apply is not None:
        apply(caps)


def probe(store: Store) -> Capabilities:
    """Measure the server behind ``store`` with :data:`PROBE_REQUESTS` (a fixed number of
    requests on scratch keys, deleted afterwards). Every request is sent once, without retries
    or error mapping (``S3Store.raw``), so what is measured is the server, not dagcraft's
    handling of it. A store without a probe transport (local) returns :meth:`Capabilities.full`."""
    raw = _raw(store)
    if raw is None:
        return Capabilities.full()
    base = f"{PROBE_PREFIX}{new_ulid()}/"
    # byte order: "a%b/c" < "a-b" < "a/b"; tree order (directories first by name): a/b, a%b/c, a-b
    k_cas, k_dir, k_pct = base + "a-b", base + "a/b", base + "a%b/c"
    k_missing = base + "missing"

    def put(key: str, body: bytes, **cond: str) -> tuple[int, str]:
        st, resp = raw("put_object", key, Body=body, **cond)
        return st, str(resp.get("ETag", "")).strip('"')

    def ok(st: int) -> bool:
        return 200 <= st < 300

    try:
        st, e1 = put(k_cas, b"probe-1", IfNoneMatch="*")
        if not ok(st):
            raise StoreUnavailable(f"store {store.url}: a create-if-absent of a new probe key got HTTP {st}; "
                                   f"{_remedy(store)}")
        st, _ = put(k_cas, b"probe-2", IfNoneMatch="*")
        create_if_absent = st in (409, 412)
        if not create_if_absent:  # the second create landed: learn the etag it left
            _, e1 = put(k_cas, b"probe-1")
        st, e2 = put(k_cas, b"probe-3", IfMatch=f'"{e1}"')
        quoted = ok(st)
        cur = e2 if quoted else e1
        st, e3 = put(k_cas, b"probe-4", IfMatch=cur)
        unquoted = ok(st)
        cur = e3 if unquoted else cur
        stale = e1 if cur != e1 else "0" * 32
        st, _ = put(k_cas, b"probe-5", IfMatch=f'"{stale}"' if quoted or not unquoted else stale)
        refuses_stale = st in (409, 412)
        missing_status, _ = put(k_missing, b"probe-6", IfMatch=f'"{cur}"' if quoted or not unquoted else cur)
        multipart = _probe_multipart(raw, k_cas)
        put(k_dir, b"")
        put(k_pct, b"")
        listed = raw("list_objects_v2", base)[1].get("Keys", [])
        after = raw("list_objects_v2", base, StartAfter=k_pct)[1].get("Keys", [])
        st, _ = raw("delete_object", k_dir, IfMatch='"' + "0" * 32 + '"')
        st_head, _ = raw("head_object", k_dir)
        conditional_delete = st in (409, 412) and ok(st_head)
    finally:
        for k in (k_cas, k_dir, k_pct, k_missing):
            raw("delete_object", k)
    expect = sorted([k_cas, k_dir, k_pct])
    return Capabilities(create_if_absent=create_if_absent, if_match_quoted=quoted, if_match_unquoted=unquoted,
                        cas_refuses_stale=refuses_stale, if_match_missing_status=missing_status,
                        multipart_create_if_absent=multipart,
                        list_byte_order=[k for k in listed if k in expect] == expect,
                        start_after_exact=all(k > k_pct for k in after),
                        start_after_complete=set(expect[1:]) <= set(after),
                        conditional_delete=conditional_delete)


def _probe_multipart(raw: Any, key: str) -> bool:
    """Does CompleteMultipartUpload with If-None-Match: * refuse to replace the existing ``key``?"""
    st, up = raw("create_multipart_upload", key)
    if not 200 <= st < 300:
        return False
    upload_id = up["UploadId"]
    st, part = raw("upload_part", key, UploadId=upload_id, PartNumber=1, Body=b"probe-mp")
    if 200 <= st < 300:
        st, _ = raw("complete_multipart_upload", key, UploadId=upload_id, IfNoneMatch="*",
                    MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part.get("ETag", "")}]})
        if 200 <= st < 300:
            return False  # the upload completed (over the existing key): nothing to abort
    raw("abort_multipart_upload", key, UploadId=upload_id)  # an upload left open is billed storage
    return False if st != 412 and st != 409 else True
