from __future__ import annotations

import json

import pytest

from dagcraft.errors import Conflict, Fenced
from dagcraft.primitives import lease


def test_acquire_conflict_while_held(store):
    a = lease.acquire(store, "leases/x", "alice", 60)
    assert a.token == 1
    with pytest.raises(Conflict) as ei:
        lease.acquire(store, "leases/x", "bob", 60)
    assert not isinstance(ei.value, Fenced)
    rec, etag = lease.read(store, "leases/x")
    assert rec.holder == "alice" and etag == a.etag


def test_takeover_after_expiry_increments_token_and_fences_old_holder(store):
    a = lease.acquire(store, "leases/x", "alice", 0)  # expires at once (store clock)
    b = lease.acquire(store, "leases/x", "bob", 60)
    assert b.token == a.token + 1
    with pytest.raises(Fenced):
        lease.renew(store, a, 60)
    with pytest.raises(Fenced):
        lease.release(store, a)
    rec, _ = lease.read(store, "leases/x")
    assert rec.holder == "bob" and not rec.released


def test_renew_and_release_then_takeover(store):
    a = lease.acquire(store, "leases/y", "alice", 10)
    a2 = lease.renew(store, a, 100)
    assert a2.expires_at > a.expires_at and a2.token == a.token
    with pytest.raises(Conflict):
        lease.renew(store, a, 10)  # stale etag of our own earlier write: not fenced, but a conflict
    lease.release(store, a2)
    b = lease.acquire(store, "leases/y", "bob", 10)
    assert b.token == 2
    tokens = [b.token]
    for i in range(3):
        lease.release(store, b)
        b = lease.acquire(store, "leases/y", f"h{i}", 10)
        tokens.append(b.token)
    assert tokens == sorted(set(tokens))


def test_stale_holder_commit_is_refused(store):
    """A holder taken over after expiry cannot commit: fenced_commit and fenced_put refuse it."""
    a = lease.acquire(store, "leases/step", "alice", 0)
    store.put("res/state.json", json.dumps({"status": "running"}).encode())
    b = lease.acquire(store, "leases/step", "bob", 60)
    lease.fence(store, b, "res/state.json")   # new holder raises the fence before working
    with pytest.raises(Fenced):
        lease.fenced_commit(store, a, "res/state.json", lambda r: {**r, "status": "succeeded", "by": "alice"})
    with pytest.raises(Fenced):
        lease.fenced_put(store, a, "res/other", b"alice")
    lease.fenced_commit(store, b, "res/state.json", lambda r: {**r, "status": "succeeded", "by": "bob"})
    rec = json.loads(store.get("res/state.json")[0])
    assert rec == {"status": "succeeded", "by": "bob", "fence": b.token}
    assert store.get("res/other") is None


def test_fenced_commit_refused_even_when_lease_record_says_otherwise(store):
    """The resource's own fence refuses a lower token, whatever the lease record says."""
    a = lease.acquire(store, "leases/z", "alice", 0)
    b = lease.acquire(store, "leases/z", "bob", 60)
    lease.fence(store, b, "res/z")
    lease.release(store, b)
    c = lease.acquire(store, "leases/z", "alice", 60)  # alice again, newer token
    assert c.token == 3
    with pytest.raises(Fenced):
        lease.fenced_commit(store, a, "res/z", lambda r: {"x": 1})
    lease.fenced_commit(store, c, "res/z", lambda r: {"x": 2})


def test_request_counts(local_store):
    s = local_store
    s.stats.clear()
    a = lease.acquire(s, "leases/c", "alice", 10)
    assert dict(s.stats) == {"get": 1, "put": 1}
    s.stats.clear()
    a = lease.renew(s, a, 10)
    assert dict(s.stats) == {"put": 1}
    s.stats.clear()
    lease.release(s, a)
    assert dict(s.stats) == {"put": 1}
