"""Store requests per primitive operation: deterministic, identical on both backends, and the
numbers documented in docs/store.md."""

from __future__ import annotations

import json

import pytest

from dagcraft.errors import Conflict
from dagcraft.primitives import artifacts, barrier, lease, mailbox, memory
from dagcraft.primitives.semaphore import Semaphore


def counted(s, fn):
    s.stats.clear()
    fn()
    return {k: v for k, v in s.stats.items() if v}


@pytest.fixture(params=["local_store", "moto_store"])
def cstore(request):
    return request.getfixturevalue(request.param)


def test_lease_requests(cstore):
    s = cstore
    box = {}
    assert counted(s, lambda: box.update(l=lease.acquire(s, "l/x", "a", 60))) == {"get": 1, "put": 1}
    assert counted(s, lambda: box.update(l=lease.renew(s, box["l"], 60))) == {"put": 1}

    def held():
        with pytest.raises(Conflict):
            lease.acquire(s, "l/x", "b", 60)

    assert counted(s, held) == {"get": 1}
    assert counted(s, lambda: lease.release(s, box["l"])) == {"put": 1}
    assert counted(s, lambda: box.update(l=lease.acquire(s, "l/x", "b", 60))) == {"get": 1, "put": 1}
    stale = box["l"]
    box.update(l=lease.renew(s, box["l"], 60))

    def fenced():
        with pytest.raises(Conflict):
            lease.renew(s, stale, 60)

    assert counted(s, fenced) == {"get": 1, "put": 1}  # the refused CAS, then one read to say why


def test_memory_requests(cstore):
    s = cstore
    assert counted(s, lambda: memory.set(s, "shared", "k", 1, writer="a")) == {"put": 2}
    assert counted(s, lambda: memory.get(s, "shared", "k")) == {"get": 1}
    assert counted(s, lambda: memory.list_keys(s, "shared")) == {"list": 1}
    memory.set(s, "shared", "k", 2, writer="a")
    assert counted(s, lambda: memory.history(s, "shared", "k")) == {"list": 1, "get": 2}


def test_mailbox_requests(cstore):
    s = cstore
    assert counted(s, lambda: mailbox.send(s, "shared", sender="a", to="bob", body="x")) == {"put": 1}
    box = {}
    assert counted(s, lambda: box.update(m=mailbox.read(s, "shared", "bob"))) == {"get": 2, "list": 2}
    assert counted(s, lambda: mailbox.ack(s, "shared", "bob", [m.id for m in box["m"]])) == \
        {"get": 1, "list": 2, "put": 1}
    assert counted(s, lambda: mailbox.read(s, "shared", "bob")) == {"get": 1, "list": 2}


def test_artifact_requests(cstore, tmp_path):
    s = cstore
    f = tmp_path / "f.txt"
    f.write_text("hello")
    assert counted(s, lambda: artifacts.put(s, f, scope="shared", name="f", uploader="a")) == {"head": 1, "put": 2}
    assert counted(s, lambda: artifacts.put(s, f, scope="shared", name="g", uploader="a")) == {"head": 1, "put": 1}
    assert counted(s, lambda: artifacts.get(s, scope="shared", name="f", dest=tmp_path / "o")) == {"get": 2}
    assert counted(s, lambda: artifacts.list_artifacts(s, "shared")) == {"list": 1, "get": 2}


def test_barrier_and_semaphore_requests(cstore):
    s = cstore
    for st in ("a", "b"):
        s.put(f"gates/{st}", json.dumps({"status": "succeeded"}).encode())
    key = lambda x: f"gates/{x}"  # noqa: E731
    ok = lambda data: "ok"  # noqa: E731
    assert counted(s, lambda: barrier.wait_for(s, ["a", "b"], key, ok)) == {"get": 2}
    sem = Semaphore(s, "sem", 3, 60)
    assert counted(s, lambda: sem.try_acquire("a")) == {"get": 1, "put": 1}
