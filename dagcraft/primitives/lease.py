"""Leases (claims) with TTL on the store's clock and fencing tokens.

A lease is one JSON object (a :class:`LeaseRecord`) at a key, never deleted:

- **acquire**: absent → create with If-None-Match (token 1). Present but released or expired
  (``expires_at <= store.now()``) → take over by If-Match CAS on the etag just read, with
  ``token = old token + 1``. Present and live → :class:`Conflict`. Of any number of concurrent
  acquirers exactly one wins (the store's conditional write decides); the others get Conflict.
- **renew** / **release**: If-Match CAS on the etag of the holder's last write. If the record
  changed since, the holder has lost the lease: :class:`Fenced` when another holder took over
  (higher token) or the lease was released, :class:`Conflict` otherwise.
- **fencing token**: ``token`` strictly increases on every takeover, so a later holder always
  has a higher token than any earlier one. A holder that was taken over can never renew or
  release (its CAS fails), and :func:`fenced_commit` refuses its commits.
- Time is only ever the store's clock (``store.now()``: local clock for a local directory,
  clock learned from the S3 ``Date`` header for S3), never a comparison of two workers' clocks.
- A holder that crashes simply stops renewing; its lease expires after ``ttl`` and the next
  acquirer takes it over. Requests: acquire = 1 GET + 1 PUT; renew = 1 PUT; release = 1 PUT
  (plus 1 GET on a lost CAS, to tell Fenced from Conflict).

Fenced commits: a resource protected by a lease should carry the highest token that wrote it
(``fence``). :func:`fenced_commit` reads the resource, refuses with Fenced if its ``fence`` is
higher than the committer's token or the lease record no longer names the committer, and
writes with If-Match on the etag it read — so a stale holder's write is refused even when the
takeover races it, as long as the new holder writes the resource (or calls :func:`fence`)
before doing the work. :func:`fenced_put` is the weaker one-shot check (lease still held
and unexpired, then a conditional put).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from dagcraft.errors import Conflict, Fenced, InvalidInput
from dagcraft.primitives.keys import validate_key
from dagcraft.primitives.store import Store
from dagcraft.primitives.ulid import new_ulid


class LeaseRecord(BaseModel):
    name: str
    holder: str
    token: int
    acquired_at: float
    expires_at: float
    released: bool = False
    write_id: str


@dataclass
class Lease:
    key: str
    holder: str
    token: int
    etag: str
    expires_at: float
    acquired_at: float = 0.0


def _encode(rec: LeaseRecord) -> bytes:
    return rec.model_dump_json().encode()


def read(store: Store, key: str) -> tuple[LeaseRecord, str] | None:
    """The lease record at ``key`` and its etag, or None if it was never acquired."""
    got = store.get(validate_key(key))
    if got is None:
        return None
    data, etag = got
    return LeaseRecord.model_validate_json(data), etag


def is_live(rec: LeaseRecord, now: float) -> bool:
    return not rec.released and rec.expires_at > now


def _check_ttl(ttl: float) -> None:
    if not (ttl >= 0):
        raise InvalidInput(f"invalid ttl {ttl!r}: must be >= 0")


def acquire(store: Store, key: str, holder: str, ttl: float) -> Lease:
    """Acquire the lease at ``key`` for ``ttl`` seconds of store time. Conflict if it is held."""
    validate_key(key)
    _check_ttl(ttl)
    for _ in range(2):
        cur = read(store, key)
        now = store.now()
        if cur is None:
            rec = LeaseRecord(name=key, holder=holder, token=1, acquired_at=now, expires_at=now + ttl,
                              write_id=new_ulid())
            try:
                etag = store.put(key, _encode(rec), if_none_match=True)
            except Conflict:
                continue  # someone created it meanwhile: look again (it may already be released)
            return Lease(key, holder, 1, etag, rec.expires_at, now)
        old, old_etag = cur
        if is_live(old, now):
            raise Conflict(f"{key}: held by {old.holder} (token {old.token}) for {old.expires_at - now:.1f}s more")
        rec = LeaseRecord(name=key, holder=holder, token=old.token + 1, acquired_at=now,
                          expires_at=now + ttl, write_id=new_ulid())
        try:
            etag = store.put(key, _encode(rec), if_match=old_etag)
        except Conflict:
            raise Conflict(f"{key}: taken over by another holder") from None
        return Lease(key, holder, rec.token, etag, rec.expires_at, now)
    raise Conflict(f"{key}: claimed by another holder")


def _not_held(cur: tuple[LeaseRecord, str] | None, lease: Lease) -> str | None:
    """Why ``lease`` is no longer held according to record ``cur`` (None: still held, unless
    it expired — callers judge expiry themselves)."""
    if cur is None:
        return "lease record vanished"
    rec = cur[0]
    if rec.token != lease.token or rec.holder != lease.holder:
        return f"lease taken over by {rec.holder} (token {rec.token} > {lease.token})"
    if rec.released:
        return "lease was released"
    return None


def _lost(store: Store, lease: Lease, action: str) -> Conflict:
    cur = read(store, lease.key)
    why = _not_held(cur, lease)
    if cur is None or why is None:  # vanished, or merely changed: not proof of a takeover
        return Conflict(f"{lease.key}: cannot {action}: {why or 'lease record changed'}")
    return Fenced(f"{lease.key}: cannot {action}: {why}")


def renew(store: Store, lease: Lease, ttl: float) -> Lease:
    """Extend the lease to ``now + ttl``. Fenced if another holder took over."""
    _check_ttl(ttl)
    now = store.now()
    rec = LeaseRecord(name=lease.key, holder=lease.holder, token=lease.token,
                      acquired_at=lease.acquired_at or now, expires_at=now + ttl, write_id=new_ulid())
    try:
        etag = store.put(lease.key, _encode(rec), if_match=lease.etag)
    except Conflict:
        raise _lost(store, lease, "renew") from None
    return Lease(lease.key, lease.holder, lease.token, etag, rec.expires_at, rec.acquired_at)


def release(store: Store, lease: Lease) -> None:
    """Release the lease (it stays as a record that the next acquirer takes over by CAS)."""
    now = store.now()
    rec = LeaseRecord(name=lease.key, holder=lease.holder, token=lease.token,
                      acquired_at=lease.acquired_at or now, expires_at=now, released=True,
                      write_id=new_ulid())
    try:
        store.put(lease.key, _encode(rec), if_match=lease.etag)
    except Conflict:
        raise _lost(store, lease, "release") from None


def current(store: Store, key: str, holder: str) -> Lease:
    """The live lease at ``key`` if ``holder`` holds it (for CLI renew/release across processes)."""
    from dagcraft.errors import NotFound

    cur = read(store, key)
    if cur is None:
        raise NotFound(f"{key}: no such claim")
    rec, etag = cur
    if rec.holder != holder or rec.released:
        raise Fenced(f"{key}: not held by {holder} (holder {rec.holder}, token {rec.token}"
                     f"{', released' if rec.released else ''})")
    return Lease(key, rec.holder, rec.token, etag, rec.expires_at, rec.acquired_at)


def check(store: Store, lease: Lease) -> LeaseRecord:
    """Raise Fenced unless ``lease`` is still held (same token and holder, not released,
    unexpired on the store's clock). One GET."""
    cur = read(store, lease.key)
    why = _not_held(cur, lease)
    if why is not None or cur is None:
        raise Fenced(f"{lease.key}: {why}")
    rec = cur[0]
    if rec.expires_at <= store.now():
        raise Fenced(f"{lease.key}: lease expired")
    return rec


def fenced_put(store: Store, lease: Lease, key: str, data: bytes, *, if_match: str | None = None,
               if_none_match: bool = False) -> str:
    """Check the lease is still held (:func:`check`), then put. Refuses (Fenced) a holder that
    was taken over or expired before the commit; a takeover racing the write itself is only
    caught by :func:`fenced_commit`."""
    check(store, lease)
    return store.put(key, data, if_match=if_match, if_none_match=if_none_match)


def fenced_commit(store: Store, lease: Lease, key: str,
                  update: Callable[[dict[str, Any] | None], dict[str, Any]], *, attempts: int = 5) -> str:
    """Read-modify-write the JSON record at ``key`` under the fence of ``lease``.

    Refused with Fenced when the record's ``fence`` is higher than ``lease.token`` (a newer
    holder already wrote it) or the lease no longer names this holder. The write is a CAS on
    the etag read, and stores ``fence = lease.token``, so any older holder's later commit is
    refused. Returns the new etag.
    """
    for _ in range(attempts):
        got = store.get(key)
        if got is None:
            current_rec, etag = None, None
        else:
            current_rec, etag = json.loads(got[0]), got[1]
        fence_val = int((current_rec or {}).get("fence", 0))
        if fence_val > lease.token:
            raise Fenced(f"{key}: commit refused: fenced by token {fence_val} > {lease.token}")
        check(store, lease)
        new = dict(update(current_rec))
        new["fence"] = lease.token
        data = json.dumps(new, sort_keys=True).encode()
        try:
            if etag is None:
                return store.put(key, data, if_none_match=True)
            return store.put(key, data, if_match=etag)
        except Conflict:
            continue
    raise Conflict(f"{key}: too much contention")


def fence(store: Store, lease: Lease, key: str) -> str:
    """Raise the fence of the record at ``key`` to ``lease.token`` (a new holder does this
    right after a takeover, before working), so older holders' commits are refused."""
    return fenced_commit(store, lease, key, lambda rec: dict(rec or {}))
