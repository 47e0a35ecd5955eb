"""Memory, mailbox, artifacts, barrier, semaphore — on every backend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from dagcraft.errors import Conflict, Failed, IntegrityError, InvalidInput, NotFound, TimedOut
from dagcraft.primitives import artifacts, barrier, capabilities, mailbox, memory
from dagcraft.primitives.semaphore import Semaphore


# -- memory ---------------------------------------------------------------------------------
def test_memory_set_get_history_list(store):
    assert memory.get(store, "shared", "plan") is None
    v1 = memory.set(store, "shared", "plan", {"steps": [1]}, writer="a")
    assert memory.get(store, "shared", "plan") == ({"steps": [1]}, v1)
    v2 = memory.set(store, "shared", "plan", "two", writer="b")
    memory.set(store, "shared", "notes/x", 3, writer="b")
    assert memory.list_keys(store, "shared") == ["notes/x", "plan"]
    assert memory.list_keys(store, "shared", "no") == ["notes/x"]
    hist = memory.history(store, "shared", "plan")
    assert [h["value"] for h in hist] == [{"steps": [1]}, "two"]
    assert [h["version"] for h in hist] == [v1, v2]


def test_memory_cas_conflict(store):
    v1 = memory.set(store, "runs/r1", "k", 1, writer="a")
    v2 = memory.set(store, "runs/r1", "k", 2, writer="a", if_version=v1)
    with pytest.raises(Conflict):
        memory.set(store, "runs/r1", "k", 3, writer="b", if_version=v1)
    assert memory.get(store, "runs/r1", "k") == (2, v2)
    assert [h["value"] for h in memory.history(store, "runs/r1", "k")] == [1, 2]


@pytest.mark.parametrize("bad", ["../x", "/abs", "a\x00", "a//b", ""])
def test_memory_bad_keys(local_store, bad):
    with pytest.raises(InvalidInput):
        memory.set(local_store, "shared", bad, 1, writer="a")


# -- mailbox --------------------------------------------------------------------------------
def test_mailbox_direct_broadcast_ack(store):
    m1 = mailbox.send(store, "shared", sender="alice", to="bob", body="hi")
    m2 = mailbox.send(store, "shared", sender="alice", to="*", body={"all": True})
    mailbox.send(store, "shared", sender="alice", to="carol", body="not for bob")
    got = mailbox.read(store, "shared", "bob")
    assert [m.id for m in got] == [m1.id, m2.id]
    assert mailbox.read(store, "shared", "bob") == got  # read changes nothing
    assert [m.id for m in mailbox.read(store, "shared", "alice")] == []  # own broadcast skipped
    mailbox.ack(store, "shared", "bob", [m1.id])
    assert [m.id for m in mailbox.read(store, "shared", "bob")] == [m2.id]
    mailbox.ack(store, "shared", "bob", [m2.id])
    assert mailbox.read(store, "shared", "bob") == []
    assert [m.body for m in mailbox.read(store, "shared", "carol")] == [{"all": True}, "not for bob"]


def test_mailbox_late_arrival_within_window_is_delivered(local_store):
    from dagcraft.primitives.ulid import ulid_floor

    s = local_store
    new = mailbox.send(s, "shared", sender="a", to="bob", body="new")
    mailbox.ack(s, "shared", "bob", [new.id])
    # A message whose id is older than the acked one lands late (slow sender clock / slow PUT).
    old_id = ulid_floor(int(new.ts * 1000) - 5000)[:-1] + "1"
    s.put(f"shared/mail/bob/{old_id}", json.dumps(
        {"id": old_id, "sender": "a", "to": "bob", "body": "late", "ts": new.ts - 5}).encode())
    assert [m.body for m in mailbox.read(s, "shared", "bob")] == ["late"]


def test_mailbox_horizon_advances_but_not_past_unacked(local_store):
    s = local_store
    ids = [mailbox.send(s, "shared", sender="a", to="bob", body=i).id for i in range(3)]
    mailbox.ack(s, "shared", "bob", [ids[0], ids[2]], window=0)
    cur = json.loads(s.get("shared/cursors/bob")[0])
    assert cur["horizon"] == ids[0]  # not past the unacked ids[1]
    assert [m.body for m in mailbox.read(s, "shared", "bob")] == [1]
    mailbox.ack(s, "shared", "bob", [ids[1]], window=0)
    assert json.loads(s.get("shared/cursors/bob")[0]) == {"horizon": ids[2], "acked": []}
    assert mailbox.read(s, "shared", "bob") == []


_READER = r"""
import sys
from dagcraft.primitives import open_store, mailbox
s = open_store(sys.argv[1])
msgs = mailbox.read(s, "shared", "bob")
print(" ".join(m.id for m in msgs), flush=True)
sys.stdin.readline()   # killed here, between read and ack
mailbox.ack(s, "shared", "bob", [m.id for m in msgs])
"""


@pytest.mark.parametrize("backend", ["local_store", "s3_server_store",
                                     pytest.param("real_s3_store", marks=pytest.mark.realserver)])
def test_mailbox_reader_killed_between_read_and_ack(request, backend):
    s = request.getfixturevalue(backend)
    m = mailbox.send(s, "shared", sender="alice", to="bob", body="work item")
    p = subprocess.Popen([sys.executable, "-c", _READER, s.url], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().split() == [m.id]
    os.kill(p.pid, signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
    again = mailbox.read(s, "shared", "bob")
    assert [x.id for x in again] == [m.id]
    mailbox.ack(s, "shared", "bob", [m.id])
    assert mailbox.read(s, "shared", "bob") == []


# -- artifacts ------------------------------------------------------------------------------
def test_artifact_roundtrip_dedup_and_list(store, tmp_path):
    f = tmp_path / "plan.md"
    f.write_text("# plan\n" * 100)
    p = artifacts.put(store, f, scope="runs/r/steps/plan", name="plan.md", uploader="a")
    assert p.size == f.stat().st_size and p.digest.startswith("sha256:") and p.content_type == "text/markdown"
    p2 = artifacts.put(store, f, scope="runs/r/steps/plan", name="docs/copy.md", uploader="a")
    assert p2.digest == p.digest
    assert store.list("blobs/") == [artifacts.blob_key(p.digest)]  # stored once
    out = tmp_path / "out" / "plan.md"
    assert artifacts.get(store, scope="runs/r/steps/plan", name="plan.md", dest=out).digest == p.digest
    assert out.read_bytes() == f.read_bytes()
    assert [a.name for a in artifacts.list_artifacts(store, "runs/r/steps/plan")] == ["docs/copy.md", "plan.md"]
    with pytest.raises(NotFound):
        artifacts.get(store, scope="runs/r/steps/plan", name="nope", dest=out)


def test_artifact_digest_mismatch_detected(store, tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"good content")
    p = artifacts.put(store, f, scope="shared", name="a.bin", uploader="a")
    store.put(artifacts.blob_key(p.digest), b"tampered!!!!")  # corrupt the blob
    dest = tmp_path / "dl" / "a.bin"
    with pytest.raises(IntegrityError):
        artifacts.get(store, scope="shared", name="a.bin", dest=dest)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []  # no temp left behind


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../b", "a\x00b"])
def test_artifact_bad_names(local_store, tmp_path, bad):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(InvalidInput):
        artifacts.put(local_store, f, scope="shared", name=bad, uploader="a")


@pytest.mark.parametrize("backend", ["moto_store", pytest.param("real_s3_store", marks=pytest.mark.realserver)])
def test_artifact_multipart_streamed(request, backend, tmp_path):
    s = request.getfixturevalue(backend)
    s.multipart_threshold = 5 << 20
    s.part_size = 5 << 20
    f = tmp_path / "big.bin"
    with open(f, "wb") as out:
        for i in range(11):
            out.write(bytes([i]) * (1 << 20))
    conditional = capabilities.load(s).multipart_create_if_absent  # (may probe: before counting)
    s.stats.clear()
    p = artifacts.put(s, f, scope="shared", name="big.bin", uploader="a")
    if conditional:
        assert s.stats["multipart_part"] == 3 and s.stats["multipart_complete"] == 1
    else:  # Ceph RGW ignores If-None-Match on multipart: one streamed conditional PUT instead
        assert s.stats["multipart_part"] == 0 and s.stats["multipart_complete"] == 0
    dest = tmp_path / "back.bin"
    artifacts.get(s, scope="shared", name="big.bin", dest=dest)
    assert artifacts.file_digest(dest)[0] == p.digest


# -- barrier --------------------------------------------------------------------------------
# The barrier knows no run layout: these tests use their own key scheme and verdicts.
def _key(name):
    return f"gates/{name}"


def _classify(data):
    return {b"open": "ok", b"broken": "failed"}.get(data)  # anything else: not terminal yet


def test_wait_for_satisfied_failed_timeout(store):
    store.put(_key("a"), b"open")
    store.put(_key("b"), b"closed")
    calls = []

    def fake_sleep(d):  # the "other worker" opens b while we wait
        calls.append(d)
        store.put(_key("b"), b"open")

    got = barrier.wait_for(store, ["a", "b", "a"], _key, _classify, timeout=30, sleep=fake_sleep)
    assert got == {"a": b"open", "b": b"open"} and list(got) == ["a", "b"]
    assert len(calls) == 1
    store.put(_key("c"), b"broken")
    with pytest.raises(barrier.Unsatisfied) as ei:
        barrier.wait_for(store, ["a", "c"], _key, _classify, timeout=30)
    assert isinstance(ei.value, Failed) and ei.value.name == "c" and ei.value.data == b"broken"
    store.put(_key("d"), b"closed")
    with pytest.raises(TimedOut, match="d, e"):  # e has no record at all: waited for, not an error
        barrier.wait_for(store, ["d", "e"], _key, _classify, timeout=0.2, initial=0.05)


def test_wait_for_validates_every_name_before_reading(store):
    seen = []

    def key_for(name):
        if name == "bad/name":
            raise InvalidInput("bad name")
        seen.append(name)
        return _key(name)

    with pytest.raises(InvalidInput):
        barrier.wait_for(store, ["a", "bad/name"], key_for, _classify, timeout=0.1)
    assert seen == ["a"]


def _state(store, run, step, status):
    from dagcraft.orchestrator import layout

    store.put(layout.step_state(run, step), json.dumps({"status": status}).encode())


def test_wait_for_steps(store):
    from dagcraft.orchestrator.waiting import wait_for_steps

    _state(store, "r1", "a", "succeeded")
    _state(store, "r1", "b", "running")

    def fake_sleep(d):
        _state(store, "r1", "b", "skipped")

    assert wait_for_steps(store, "r1", ["a", "b"], timeout=30, sleep=fake_sleep) == {"a": "succeeded", "b": "skipped"}
    for bad in ("failed", "cancelled", "rolled_back"):
        _state(store, "r1", "c", bad)
        with pytest.raises(Failed, match=f"upstream step 'c' is {bad}"):
            wait_for_steps(store, "r1", ["a", "c"], timeout=30)
    for pending in ("pending", "retrying", "expanded", "rolling_back"):
        _state(store, "r1", "d", pending)
        with pytest.raises(TimedOut):
            wait_for_steps(store, "r1", ["d"], timeout=0.1, initial=0.02)
    store.put("runs/r1/steps/e/state.json", b"not json")  # unreadable: not terminal
    with pytest.raises(TimedOut):
        wait_for_steps(store, "r1", ["e"], timeout=0.1, initial=0.02)
    with pytest.raises(InvalidInput):
        wait_for_steps(store, "r1", ["a", "../x"], timeout=0.1)


# -- semaphore ------------------------------------------------------------------------------
def test_semaphore_slots(store):
    sem = Semaphore(store, "sem/claude", 2, ttl=60)
    a = sem.try_acquire("a")
    b = sem.try_acquire("b")
    assert a and b and a.key != b.key
    assert sem.try_acquire("c") is None
    with pytest.raises(TimedOut):
        sem.acquire("c", timeout=0.1)
    sem.release(a)
    c = sem.acquire("c", timeout=5)
    assert c.key == a.key and c.token == a.token + 1
    assert sorted(sem.holders()) == ["b", "c"]
