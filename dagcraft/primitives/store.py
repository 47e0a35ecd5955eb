"""The Store protocol: the one interface every backend implements exactly.

Guarantees every backend must give (tested by the shared behavioural suite):
- ``put(..., if_none_match=True)`` succeeds for exactly one of any number of concurrent
  writers of the same absent key; the others get :class:`~dagcraft.errors.Conflict`.
- ``put(..., if_match=etag)`` succeeds only if the object's current etag is ``etag``.
- A reader never sees a partially written object; a crash mid-write leaves old or new.
- ``list`` returns keys in lexicographic order, all of them (paginating as needed).
- ``now()`` is the store's clock (seconds since the epoch, float), the only clock leases
  are judged by.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from dagcraft.errors import Conflict, Superseded

#: keys per LIST request on S3 (ListObjectsV2 returns at most 1,000)
LIST_PAGE = 1000


@runtime_checkable
class Store(Protocol):
    url: str
    #: requests made, by operation name ("get", "put", "list", "delete", "head", ...);
    #: deterministic, so tests can assert request counts per primitive operation. A backend
    #: without pages (local) counts a listing as S3 would bill it: one LIST per LIST_PAGE keys.
    stats: Counter[str]

    def get(self, key: str) -> tuple[bytes, str] | None:
        """Object bytes and etag, or None when absent."""
        ...

    def put(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        """Write ``data``; return the new etag. Raise Conflict when the condition fails."""
        ...

    def list(self, prefix: str, start_after: str | None = None, limit: int | None = None) -> list[str]:
        """Keys under ``prefix`` greater than ``start_after``, sorted, at most ``limit``."""
        ...

    def delete(self, key: str) -> None:
        """Remove a key (garbage collection only; the protocol never depends on it)."""
        ...

    def now(self) -> float:
        """The store's clock, in seconds since the epoch."""
        ...

    def put_file(self, key: str, path: Path, *, if_none_match: bool = False, consume: bool = False) -> str:
        """Stream a local file into ``key`` (multipart on S3); never read whole into memory.
        ``consume``: the caller hands the file over (it will not change it again, and deletes
        it after the call), so a store may take the file itself instead of a copy (the local
        store links it in when it is on the same filesystem)."""
        ...

    def open_read(self, key: str) -> BinaryIO:
        """Stream an object's bytes. Raise NotFound when absent."""
        ...


def cas(store: Store, key: str, data: bytes, etag: str | None) -> str:
    """Compare-and-swap ``key`` from version ``etag`` (None: create if absent) to ``data``;
    returns the new etag. Safe to call again after a try whose outcome is unknown (its
    response was lost in an outage): when the condition fails, the record is re-read, and if
    it already holds exactly ``data`` (records carry a unique write id or revision), the
    earlier try landed and this returns its etag. Otherwise raises :class:`Superseded`
    carrying the record's current bytes and etag, so the caller needs no second read."""
    try:
        if etag is None:
            return store.put(key, data, if_none_match=True)
        return store.put(key, data, if_match=etag)
    except Conflict:
        got = store.get(key)
        if got is not None and got[0] == data:
            return got[1]
        raise Superseded(f"{key}: changed by another writer", current=got) from None
