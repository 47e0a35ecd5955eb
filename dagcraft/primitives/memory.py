"""Versioned memory: key → JSON value with a version, plus an immutable history per key.

Layout (``scope`` is ``shared`` or ``runs/<run_id>``)::

    <scope>/memory/<key>                  current record {"value", "writer", "ts", "write_id"}
    <scope>/memory-history/<key>/<ulid>   one immutable entry per successful set

Guarantees:
- ``get`` returns the value and its version (the store etag of the current record); a reader
  never sees a partial value.
- ``set`` without ``if_version`` is last-write-wins. With ``if_version`` it is a compare-and-
  swap: it succeeds only if the current version is ``if_version``, else :class:`Conflict`
  (nothing written). Of concurrent CAS writers with the same base version exactly one wins.
- Every successful set then writes a history entry with If-None-Match (never overwritten).
  The value is authoritative: a crash between the two writes loses only that history entry.
Requests: get = 1 GET; set = 2 PUT; list = 1 LIST per 1000 keys; history = 1 LIST + 1 GET
per entry returned.
"""

from __future__ import annotations

import json
from typing import Any

from dagcraft.errors import Conflict, InvalidInput
from dagcraft.primitives.keys import validate_key, validate_relpath
from dagcraft.primitives.store import Store
from dagcraft.primitives.ulid import new_ulid


def _k(scope: str, key: str) -> str:
    validate_relpath(key, "memory key")
    return validate_key(f"{scope}/memory/{key}")


def _dumps(obj: Any) -> bytes:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"value is not JSON-serializable: {exc}") from None


def get(store: Store, scope: str, key: str) -> tuple[Any, str] | None:
    """(value, version) or None when the key was never set."""
    got = store.get(_k(scope, key))
    if got is None:
        return None
    return json.loads(got[0])["value"], got[1]


def set(store: Store, scope: str, key: str, value: Any, *, writer: str,  # noqa: A001
        if_version: str | None = None) -> str:
    """Set ``key`` to ``value`` (JSON); return the new version. CAS when ``if_version`` given."""
    k = _k(scope, key)
    ts = store.now()
    write_id = new_ulid()
    data = _dumps({"value": value, "writer": writer, "ts": ts, "write_id": write_id})
    try:
        version = store.put(k, data, if_match=if_version) if if_version else store.put(k, data)
    except Conflict:
        raise Conflict(f"memory {key!r}: version mismatch (expected {if_version})") from None
    hist = {"value": value, "writer": writer, "ts": ts, "version": version, "write_id": write_id}
    store.put(f"{scope}/memory-history/{key}/{write_id}", _dumps(hist), if_none_match=True)
    return version


def list_keys(store: Store, scope: str, prefix: str = "") -> list[str]:
    """Memory keys under ``prefix`` (a plain string prefix), sorted."""
    base = f"{scope}/memory/"
    if prefix:
        if "\x00" in prefix or prefix.startswith("/") or ".." in prefix.split("/"):
            raise InvalidInput(f"invalid memory prefix {prefix!r}")
    return [k[len(base):] for k in store.list(base + prefix)]


def history(store: Store, scope: str, key: str, limit: int | None = None) -> list[dict[str, Any]]:
    """History entries of ``key``, oldest first (the last ``limit`` if given)."""
    _k(scope, key)
    keys = store.list(f"{scope}/memory-history/{key}/")
    if limit is not None:
        keys = keys[-limit:] if limit > 0 else []
    out = []
    for hk in keys:
        got = store.get(hk)
        if got is not None:
            out.append(json.loads(got[0]))
    return out
