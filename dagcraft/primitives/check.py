"""``check_store``: measure what a backend does (used by ``dagcraft store check``). Always probes
afresh (:func:`~dagcraft.primitives.capabilities.probe`: a fixed number of requests on scratch
keys) and records the result, so a fixed or upgraded server is re-measured on demand."""

from __future__ import annotations

from dagcraft.primitives import capabilities
from dagcraft.primitives.store import Store
from dagcraft.primitives.ulid import new_ulid


def check_store(store: Store) -> tuple[list[str], capabilities.Capabilities]:
    """(the required guarantees the store lacks — empty: dagcraft can coordinate on it —, the
    measured record). Raises StoreUnavailable when the store cannot be reached at all."""
    caps = capabilities.load(store, reprobe=True)
    if getattr(store, "raw", None) is None:
        _write_round_trip(store)  # a store that needs no probe must still take writes
    return caps.missing(), caps


def _write_round_trip(store: Store) -> None:
    """Create, CAS and delete one scratch key: a read-only or full store fails here with its
    StoreUnavailable (exit 5, naming the operation), not at the first step of a run."""
    key = f"_dagcraft/check/{new_ulid()}"
    etag = store.put(key, b"check-1", if_none_match=True)
    try:
        store.put(key, b"check-2", if_match=etag)
    finally:
        store.delete(key)


def adaptations(caps: capabilities.Capabilities) -> list[str]:
    """What dagcraft does differently on this store (empty on AWS S3 and local), one phrase each."""
    out = []
    if not caps.if_match_quoted and caps.if_match_unquoted:
        out.append("sends If-Match unquoted (the server refuses the quoted form)")
    if not caps.multipart_create_if_absent:
        out.append("creates large objects with one conditional PUT (the server ignores If-None-Match on "
                   "multipart uploads; limit 5 GiB)")
    if not caps.list_server_side:
        out.append("lists whole prefixes and sorts/cuts them itself (the server's LIST order or "
                   "start_after is not byte order)")
    elif not caps.start_after_exact:
        out.append("filters start_after itself (the server returns keys before it)")
    return out
