"""Leases (claims) with a TTL on the store's clock and fencing tokens: the one lease model.

A lease is a :class:`LeaseRecord` (holder, token, expiry). It lives either alone at a key
(the supervisor role, semaphore slots, ``dagcraft agent claim``) or embedded in a larger record
that it protects (a step's state record holds the lease of the attempt that runs it). Both
forms use the same rules, implemented once here:

- **take**: a lease that is absent, released or expired (``expires_at <= store.now()``) may
  be taken, with ``token = old token + 1``; a live one may not (:class:`Conflict`). The write
  that takes it is conditional (If-None-Match when absent, else If-Match on the etag just
  read), so of any number of concurrent takers exactly one wins.
- **fencing**: ``token`` strictly increases on every take, and every later write by a holder
  is a CAS on the etag of the holder's own last write (:func:`write_held`). Once another
  holder took over, or anyone changed the record, the old holder's writes — renewals and
  commits alike — are refused with :class:`Fenced`.
- **lost responses**: a holder's write whose response was lost (an outage) is retried; if the
  retry meets Conflict, :func:`write_held` re-reads the record, and when it holds exactly the
  bytes this holder wrote (every write carries a unique ``write_id``), the write had landed
  and succeeds. Otherwise the holder was fenced.
- Time is only ever the store's clock (``store.now()``), never two workers' clocks compared.
- A holder that crashes stops renewing; its lease expires after ``ttl`` and the next taker
  takes it over. Requests: acquire = 1 GET + 1 PUT; renew = 1 PUT; release = 1 PUT (plus 1
  GET after a lost CAS, to tell a landed write or Fenced from Conflict).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel

from dagcraft.errors import Conflict, Fenced, InvalidInput, NotFound, Superseded
from dagcraft.primitives.keys import validate_key
from dagcraft.primitives.store import Store, cas
from dagcraft.primitives.ulid import new_ulid


class LeaseRecord(BaseModel):
    """The lease itself: who holds it, with which fencing token, until when (store clock)."""

    holder: str
    token: int
    acquired_at: float
    expires_at: float
    released: bool = False
    write_id: str = ""

    def live(self, now: float) -> bool:
        return not self.released and self.expires_at > now

    def expired(self, now: float, grace: float = 0.0) -> bool:
        """Past its expiry by more than ``grace`` (clock granularity) and not released."""
        return not self.released and self.expires_at + grace <= now


@dataclass(frozen=True)
class Lease:
    """A holder's handle: the key of the record holding the lease and the etag of the
    holder's last write to it (the fence every later write is conditional on)."""

    key: str
    holder: str
    token: int
    etag: str
    expires_at: float
    acquired_at: float = 0.0


# -- the rules, on records --------------------------------------------------------------------
def take(prev: LeaseRecord | None, holder: str, now: float, ttl: float) -> LeaseRecord:
    """The record that takes over ``prev`` (None: never held). Conflict if ``prev`` is live."""
    _check_ttl(ttl)
    if prev is not None and prev.live(now):
        raise Conflict(f"held by {prev.holder} (token {prev.token}) for {prev.expires_at - now:.1f}s more")
    return LeaseRecord(holder=holder, token=(prev.token if prev else 0) + 1, acquired_at=now,
                       expires_at=now + ttl, write_id=new_ulid())


def extended(rec: LeaseRecord, now: float, ttl: float) -> LeaseRecord:
    """``rec`` renewed until ``now + ttl``."""
    _check_ttl(ttl)
    return rec.model_copy(update={"expires_at": now + ttl, "write_id": new_ulid()})


def released(rec: LeaseRecord, now: float) -> LeaseRecord:
    """``rec`` given up: takeable at once, its token kept so the next take is higher."""
    return rec.model_copy(update={"expires_at": now, "released": True, "write_id": new_ulid()})


def _check_ttl(ttl: float) -> None:
    if not (ttl >= 0):
        raise InvalidInput(f"invalid ttl {ttl!r}: must be >= 0")


# -- fenced writes ----------------------------------------------------------------------------
def write_held(store: Store, lease: Lease, data: bytes, lease_of: Callable[[bytes], LeaseRecord | None]) -> str:
    """Write ``data`` to ``lease.key`` as the holder of ``lease``: a CAS from the holder's last
    etag (:func:`~.store.cas`, so retrying a write whose response was lost is safe). Returns
    the new etag. Raises :class:`Fenced` when the record moved on — naming the newer holder
    when one took over — so a holder whose lease was taken over can never commit."""
    try:
        return cas(store, lease.key, data, lease.etag)
    except Superseded as exc:
        cur = lease_of(exc.current[0]) if exc.current is not None else None
        if cur is None:
            raise Fenced(f"{lease.key}: lease record gone") from None
        if cur.token != lease.token or cur.holder != lease.holder:
            raise Fenced(f"{lease.key}: taken over by {cur.holder} (token {cur.token} > {lease.token})") from None
        raise Fenced(f"{lease.key}: changed by another writer") from None


def _parse(data: bytes) -> LeaseRecord | None:
    try:
        return LeaseRecord.model_validate_json(data)
    except ValueError:
        return None


# -- leases alone at a key ----------------------------------------------------------------------
def read(store: Store, key: str) -> tuple[LeaseRecord, str] | None:
    """The lease record at ``key`` and its etag, or None if it was never acquired."""
    got = store.get(validate_key(key))
    if got is None:
        return None
    rec = _parse(got[0])
    if rec is None:
        raise Conflict(f"{key}: not a lease record")
    return rec, got[1]


def _handle(key: str, rec: LeaseRecord, etag: str) -> Lease:
    return Lease(key, rec.holder, rec.token, etag, rec.expires_at, rec.acquired_at)


def acquire(store: Store, key: str, holder: str, ttl: float) -> Lease:
    """Acquire the lease at ``key`` for ``ttl`` seconds of store time. Conflict if it is held."""
    validate_key(key)
    for _ in range(2):
        cur = read(store, key)
        try:
            rec = take(cur[0] if cur else None, holder, store.now(), ttl)
        except Conflict as exc:
            raise Conflict(f"{key}: {exc}") from None
        try:
            if cur is None:
                etag = store.put(key, rec.model_dump_json().encode(), if_none_match=True)
            else:
                etag = store.put(key, rec.model_dump_json().encode(), if_match=cur[1])
        except Conflict:
            if cur is None:
                continue  # created meanwhile: look again (it may already be released)
            raise Conflict(f"{key}: taken over by another holder") from None
        return _handle(key, rec, etag)
    raise Conflict(f"{key}: claimed by another holder")


def renew(store: Store, lease: Lease, ttl: float) -> Lease:
    """Extend the lease to ``now + ttl``. Fenced if another holder took over."""
    now = store.now()
    rec = LeaseRecord(holder=lease.holder, token=lease.token, acquired_at=lease.acquired_at or now,
                      expires_at=now, write_id="")
    rec = extended(rec, now, ttl)
    etag = write_held(store, lease, rec.model_dump_json().encode(), _parse)
    return _handle(lease.key, rec, etag)


def release(store: Store, lease: Lease) -> None:
    """Release the lease (it stays as a record that the next acquirer takes over by CAS)."""
    now = store.now()
    rec = released(LeaseRecord(holder=lease.holder, token=lease.token, acquired_at=lease.acquired_at or now,
                               expires_at=now), now)
    write_held(store, lease, rec.model_dump_json().encode(), _parse)


def current(store: Store, key: str, holder: str) -> Lease:
    """The lease at ``key`` if ``holder`` holds it (for CLI renew/release across processes)."""
    cur = read(store, key)
    if cur is None:
        raise NotFound(f"{key}: no such claim")
    rec, etag = cur
    if rec.holder != holder or rec.released:
        raise Fenced(f"{key}: not held by {holder} (holder {rec.holder}, token {rec.token}"
                     f"{', released' if rec.released else ''})")
    return _handle(key, rec, etag)


def check(store: Store, lease: Lease) -> LeaseRecord:
    """Raise Fenced unless ``lease`` is still held (same token and holder, not released,
    unexpired on the store's clock). One GET."""
    cur = read(store, lease.key)
    if cur is None:
        raise Fenced(f"{lease.key}: lease record vanished")
    rec = cur[0]
    if rec.token != lease.token or rec.holder != lease.holder:
        raise Fenced(f"{lease.key}: taken over by {rec.holder} (token {rec.token} > {lease.token})")
    if rec.released:
        raise Fenced(f"{lease.key}: lease was released")
    if rec.expires_at <= store.now():
        raise Fenced(f"{lease.key}: lease expired")
    return rec
