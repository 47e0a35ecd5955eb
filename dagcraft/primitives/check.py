"""``check_store``: prove a backend enforces conditional writes (used by ``dagcraft store check``
and before workers run). Requests: 4 PUT + 1 GET + 1 LIST + 1 DELETE on a probe key."""

from __future__ import annotations

from dagcraft.errors import Conflict
from dagcraft.primitives.store import Store
from dagcraft.primitives.ulid import new_ulid


def check_store(store: Store) -> list[str]:
    """Return what the store fails to enforce (empty list = all good). Raises StoreUnavailable
    when the store cannot be reached at all."""
    key = f"_dagcraft/check/{new_ulid()}"
    problems: list[str] = []
    e1 = store.put(key, b"probe-1", if_none_match=True)
    try:
        store.put(key, b"probe-2", if_none_match=True)
        problems.append("If-None-Match (a second create-if-absent succeeded)")
    except Conflict:
        pass
    cur = store.get(key)
    e_now = cur[1] if cur else e1
    try:
        store.put(key, b"probe-3", if_match="0" * 32 if e_now != "0" * 32 else "1" * 32)
        problems.append("If-Match (a write with a stale etag succeeded)")
    except Conflict:
        pass
    cur = store.get(key)
    try:
        store.put(key, b"probe-4", if_match=cur[1] if cur else e_now)
    except Conflict:
        problems.append("If-Match (a write with the current etag was refused)")
    if key not in store.list("_dagcraft/check/"):
        problems.append("list (a written key is not listed)")
    store.delete(key)
    return problems
