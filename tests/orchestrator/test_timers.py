"""Timers (orchestrator/timers.py) and the attempt keepers they start lazily."""

from __future__ import annotations

import os
import threading

from dagcraft.orchestrator.timers import Timers


def test_due_callbacks_run_once_in_order_and_cancelled_ones_never():
    t = Timers()
    ran: list[str] = []
    done = threading.Event()
    t.after(0.2, lambda: (ran.append("late"), done.set()))
    t.after(0.0, lambda: ran.append("first"))
    h = t.after(0.1, lambda: ran.append("cancelled"))
    t.cancel(h)
    assert done.wait(10)
    assert ran == ["first", "late"]
    assert t.pending() == 0


def test_a_failing_callback_does_not_stop_the_others():
    t = Timers()
    done = threading.Event()
    t.after(0.0, lambda: 1 / 0)
    t.after(0.01, done.set)
    assert done.wait(10)


def test_a_forked_child_gets_its_own_thread():
    t = Timers()
    first = threading.Event()
    t.after(0.0, first.set)
    assert first.wait(10)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the parent's timer thread is not here; after() must start one
        ok = threading.Event()
        t.after(0.0, ok.set)
        os.write(w, b"1" if ok.wait(10) else b"0")
        os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.waitpid(pid, 0)


def test_short_steps_start_no_heartbeat_or_log_thread(tmp_path, thread_starts):
    from dagcraft.primitives.local import LocalStore
    from tests.orchestrator.helpers import drive_inline, submit_spec, write_spec

    store = LocalStore(tmp_path / "store", fsync=False)
    spec = "name: quick\nsteps:\n" + "".join(f"  - id: s{i}\n    run: [\"true\"]\n" for i in range(6))
    rid = submit_spec(store, write_spec(tmp_path, spec))
    st = drive_inline(store, rid, tmp_path, concurrency=1)
    assert st["counts"] == {"succeeded": 6}
    assert not [n for n in thread_starts if n.startswith(("heartbeat-", "logs-"))]


def test_a_long_step_still_heartbeats_and_streams_its_log(tmp_path, thread_starts):
    """lease_ttl 1 s (a beat every 0.33 s) and a 2.5 s step: without its keepers started the
    lease would expire and the step be taken over."""
    from dagcraft.primitives.local import LocalStore
    from tests.orchestrator.helpers import drive_inline, submit_spec, write_spec

    store = LocalStore(tmp_path / "store", fsync=False)
    spec = ('name: slow\nsteps:\n  - id: slow\n    run: ["sh", "-c", "echo started; sleep 2.5; echo done"]\n')
    rid = submit_spec(store, write_spec(tmp_path, spec))
    st = drive_inline(store, rid, tmp_path, concurrency=1, lease_ttl=1.0)
    assert st["counts"] == {"succeeded": 1}
    assert {"heartbeat-slow", "logs-slow"} <= set(thread_starts)
    step = st["steps"][0]
    assert step["attempt"] == 1  # never taken over


def test_the_timers_thread_is_woken_only_when_the_earliest_deadline_moves_earlier():
    """Every step schedules and cancels a heartbeat and a log snapshot; each wake-up of the
    timers' thread was a thread switch on the attempt's path (four per step)."""
    t = Timers()
    wakes = []

    class Counting(threading.Condition):
        def notify(self, n: int = 1) -> None:
            wakes.append(n)
            super().notify(n)

    t._cv = Counting(threading.Lock())
    ran = threading.Event()
    a = t.after(60.0, lambda: None)
    assert len(wakes) == 1  # the first deadline
    t.after(120.0, lambda: None)
    assert len(wakes) == 1  # later than the one it sleeps until: no wake-up
    t.cancel(a)
    t.cancel(a)
    assert len(wakes) == 1 and t.pending() == 1  # cancelled without a wake-up
    t.after(0.0, ran.set)
    assert len(wakes) == 2 and ran.wait(10)  # earlier: woken, and it runs
