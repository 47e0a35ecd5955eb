"""A worker's slots: an attempt holds one until its outcome is committed, not until its
trace and logs are uploaded (uploads decide nothing: on S3 each is a request's round trip, on
a local store an fsync). Driven by real threads of a real worker on a real local store; the
store's ``put_file`` is held before it runs, so the order is decided by events, not timing."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dagcraft.orchestrator import layout, run_status
from dagcraft.orchestrator.attempt import WorkerConfig
from dagcraft.orchestrator.model import StepStatus
from dagcraft.orchestrator.ops import read_step_state
from dagcraft.orchestrator.worker import Worker
from dagcraft.primitives.local import LocalStore
from tests.orchestrator.helpers import submit_spec, wait_for, write_spec


def _held_uploads(store: LocalStore) -> tuple[threading.Event, list[str], threading.Condition]:
    """Hold every trace upload until the returned gate is set; the keys held so far are listed."""
    gate, held, cond = threading.Event(), [], threading.Condition()
    real = store.put_file

    def put_file(key: str, path: Path, **kw: Any) -> str:
        if key.endswith("/trace.jsonl"):
            with cond:
                held.append(key)
                cond.notify_all()
            assert gate.wait(60), "the test never opened the gate"
        return real(key, path, **kw)

    store.put_file = put_file  # type: ignore[method-assign]
    return gate, held, cond


def _worker(store: LocalStore, rid: str, tmp_path: Path, on_cycle: Callable[[Worker], None] | None = None) -> Worker:
    cfg = WorkerConfig(store=store, store_url=store.url, worker_id=f"slots-{os.getpid()}", lease_ttl=30.0,
                       tmp_root=tmp_path / "work", grace=1.0)
    return Worker(cfg, run_id=rid, concurrency=1, exit_when_idle=True, poll_min=0.01, poll_max=0.05,
                  on_cycle=on_cycle)


def _spec(tmp_path: Path, n: int) -> Path:
    return write_spec(tmp_path, "name: slots\nsteps:\n" + "".join(f'  - {{id: s{i}, run: ["true"]}}\n'
                                                                  for i in range(n)))


def _succeeded(store: LocalStore, rid: str, n: int) -> list[str]:
    return [f"s{i}" for i in range(n) if read_step_state(store, rid, f"s{i}").status == StepStatus.SUCCEEDED]


def test_the_next_attempt_starts_while_the_last_ones_trace_is_still_uploading(tmp_path):
    """One slot, two ready steps: with the first step's trace upload held, the second is
    claimed and committed anyway. Before, the slot was held through the uploads, so the
    second step waited for the first one's upload (this test timed out)."""
    store = LocalStore(tmp_path / "store", fsync=False)
    rid = submit_spec(store, _spec(tmp_path, 2))
    gate, held, cond = _held_uploads(store)
    w = _worker(store, rid, tmp_path)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    try:
        with cond:
            assert cond.wait_for(lambda: len(held) >= 1, 60)
        first = next(sid for sid in ("s0", "s1") if held[0].startswith(layout.attempt_prefix(rid, sid, 1)))
        # the other step runs to its commit while the first one's upload is still held
        done = wait_for(lambda: len(_succeeded(store, rid, 2)) == 2 and _succeeded(store, rid, 2), timeout=60,
                        what="the second step to succeed while the first one's trace upload is held")
        assert first in done and len(held) >= 1
    finally:
        gate.set()
        t.join(60)
    assert not t.is_alive()
    st = run_status(store, rid)
    assert st["status"] == "succeeded"
    # both traces landed once the gate opened: nothing was dropped by giving the slot back early
    for sid in ("s0", "s1"):
        assert store.get(f"{layout.attempt_prefix(rid, sid, 1)}/trace.jsonl") is not None


def test_attempts_waiting_on_uploads_are_bounded_by_the_slots(tmp_path):
    """While uploads are held, one slot lets one more attempt start, not an unbounded number:
    a worker keeps at most ``2 x concurrency`` attempts (so every claimed step has a thread and
    its heartbeat). With both held uploads waiting, the third step is not claimed however many
    cycles the worker makes; it runs once they land."""
    store = LocalStore(tmp_path / "store", fsync=False)
    rid = submit_spec(store, _spec(tmp_path, 3))
    gate, held, cond = _held_uploads(store)
    cycles = threading.Semaphore(0)
    w = _worker(store, rid, tmp_path, on_cycle=lambda _w: cycles.release())
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    try:
        with cond:
            assert cond.wait_for(lambda: len(held) >= 2, 60)
        for _ in range(20):  # twenty more cycles of the worker, each free to claim if it could
            assert cycles.acquire(timeout=60)
        assert len(_succeeded(store, rid, 3)) == 2
        assert w.free_slots() == 0 and len(w.running) == 2
        assert len(held) == 2
    finally:
        gate.set()
        t.join(60)
    assert not t.is_alive()
    assert run_status(store, rid)["status"] == "succeeded"
