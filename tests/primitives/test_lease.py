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


def _embedded(data: bytes) -> lease.LeaseRecord | None:
    rec = json.loads(data).get("lease")
    return lease.LeaseRecord.model_validate(rec) if rec else None


def _step_record(rec: lease.LeaseRecord, status: str) -> bytes:
    return json.dumps({"status": status, "lease": rec.model_dump()}, sort_keys=True).encode()


def test_stale_holder_commit_is_refused(store):
    """A lease embedded in the record it protects: a holder taken over after expiry cannot
    commit (write_held refuses it with Fenced), the new holder can."""
    now = store.now()
    a_rec = lease.take(None, "alice", now, 0)
    etag = store.put("res/state.json", _step_record(a_rec, "running"), if_none_match=True)
    a = lease.Lease("res/state.json", "alice", a_rec.token, etag, a_rec.expires_at)
    # bob takes over the expired lease by CAS on the record
    b_rec = lease.take(a_rec, "bob", store.now(), 60)
    assert b_rec.token == a_rec.token + 1
    b_etag = store.put("res/state.json", _step_record(b_rec, "running"), if_match=etag)
    with pytest.raises(Fenced) as ei:
        lease.write_held(store, a, _step_record(a_rec, "succeeded"), _embedded)
    assert "bob" in str(ei.value)
    b = lease.Lease("res/state.json", "bob", b_rec.token, b_etag, b_rec.expires_at)
    lease.write_held(store, b, _step_record(b_rec, "succeeded"), _embedded)
    assert json.loads(store.get("res/state.json")[0])["lease"]["holder"] == "bob"


def test_taking_a_live_lease_is_refused():
    rec = lease.take(None, "alice", 100.0, 10)
    with pytest.raises(Conflict):
        lease.take(rec, "bob", 105.0, 10)
    assert lease.take(rec, "bob", 111.0, 10).token == 2
    assert lease.take(lease.released(rec, 101.0), "bob", 101.0, 10).token == 2


def test_write_whose_response_was_lost_is_recognised(store):
    """A retried holder write meets Conflict because its first try landed: the re-read finds
    exactly its bytes, so the write succeeds instead of reporting a false fence."""
    rec = lease.take(None, "alice", store.now(), 60)
    etag = store.put("res/s", _step_record(rec, "running"), if_none_match=True)
    a = lease.Lease("res/s", "alice", rec.token, etag, rec.expires_at)
    data = _step_record(lease.extended(rec, store.now(), 60), "succeeded")
    store.put("res/s", data, if_match=etag)  # the first try, whose response was "lost"
    new_etag = lease.write_held(store, a, data, _embedded)
    assert store.get("res/s") == (data, new_etag)


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
