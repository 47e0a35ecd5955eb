"""Store outages are ridden out, not turned into failures or re-runs.

A fault-injecting wrapper around the real local store (``tests/faults.py``) fails chosen calls
— before the store sees them, or after it applied them (a lost response) — at each point of
an attempt's life. Every case must end with each step committed once by its first attempt,
its side effect done once, and every committed attempt's trace present and verified.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from dagcraft.orchestrator import WorkerConfig, layout, run_status
from dagcraft.orchestrator.model import AttemptKind, AttemptStatus, StepStatus, load_state
from dagcraft.orchestrator.report import verify_run
from dagcraft.orchestrator.worker import Worker
from dagcraft.primitives.ulid import new_ulid
from tests.faults import FaultyStore
from tests.orchestrator.helpers import steps, submit_spec, wait_for, write_spec

TTL = 3.0  # heartbeat every second; every outage below outlasts the lease


def _worker(store: Any, tmp_path: Path, run_id: str | None, **kw: Any) -> Worker:
    cfg = WorkerConfig(store=store, store_url=store.url, worker_id=f"w-{os.getpid()}", lease_ttl=TTL,
                       tmp_root=tmp_path / "work", grace=1.0, outage_s=kw.pop("outage_s", 60.0))
    return Worker(cfg, run_id=run_id, concurrency=4, exit_when_idle=True, poll_min=0.01, poll_max=0.1, **kw)


def _fault_when(trigger: Path, start: Any, seconds: float) -> threading.Thread:
    """Once the step has created ``trigger``, start the fault (``start()`` returns a handle
    with ``remove``) and lift it ``seconds`` later: the outage's length, not a synchronisation."""
    def run() -> None:
        wait_for(trigger.exists, timeout=60, what="the step to reach its fault point")
        rule = start()
        time.sleep(seconds)
        rule.remove()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


SPEC = """
name: outage
steps:
  - id: a
    run: "touch {trigger}; sleep {sleep}; echo a >> {effects}; echo v=1 >> $DAGCRAFT_OUTPUT"
    outputs: {{values: [v]}}
  - id: b
    needs: [a]
    run: "echo b >> {effects}; echo ${{{{ steps.a.outputs.v }}}}"
"""

CASES = {
    # point of failure: (op, key part, kind, count, outage seconds after the trigger or None: from the start)
    "claim": ("put", "steps/a/state.json", "after", 1, None),
    "heartbeat": ("put", "steps/a/state.json", "before", None, 4.0),
    "commit": ("put", "steps/a/state.json", "after", None, 4.0),
    "log upload": ("put_file", "/stdout.log", "before", 3, None),
    "trace upload": ("put_file", "/trace.jsonl", "before", 3, None),
    "journal append": ("put", "/journal/", "before", None, 3.0),
    "supervisor tick": ("put", "/control.json", "after", 2, None),
}


@pytest.mark.parametrize("point", list(CASES))
def test_outage_is_ridden_out(local_store: Any, tmp_path: Path, point: str) -> None:
    op, key, kind, count, seconds = CASES[point]
    trigger, effects = tmp_path / "trigger", tmp_path / "effects"
    # the heartbeat case needs the command to outlive the outage; the others end right after it
    sleep = 6 if point == "heartbeat" else 0.2
    spec = write_spec(tmp_path, SPEC.format(trigger=trigger, effects=effects, sleep=sleep))
    rid = submit_spec(local_store, spec)
    faulty = FaultyStore(local_store, seed=1)
    if seconds is None:
        faulty.rule(op=op, key_contains=key, kind=kind, count=count)
        fault = None
    else:
        fault = _fault_when(trigger, lambda: faulty.rule(op=op, key_contains=key, kind=kind), seconds)
    assert _worker(faulty, tmp_path, rid).run() == 0
    if fault is not None:
        fault.join()
    assert faulty.injected[(op, kind)] >= 1, "the fault never fired: the test proves nothing"
    st = run_status(local_store, rid)
    assert st["status"] == "succeeded", st
    assert Counter(effects.read_text().split()) == {"a": 1, "b": 1}
    for sid in ("a", "b"):
        state = load_state(local_store.get(layout.step_state(rid, sid))[0])
        assert state.status == StepStatus.SUCCEEDED and state.attempt == 1 and state.lost_attempts == 0
        assert [h.status for h in state.history] == [AttemptStatus.SUCCEEDED]
    reports = verify_run(local_store, rid)
    assert len(reports) == 2 and all(r.ok for r in reports), [r.message() for r in reports]


def test_missing_trace_is_reported_until_a_later_worker_uploads_it(local_store: Any, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "name: t\nsteps:\n  - id: a\n    run: [echo, hi]\n")
    rid = submit_spec(local_store, spec)
    faulty = FaultyStore(local_store)
    rule = faulty.rule(op="put_file", key_contains="/trace.jsonl")
    # the first worker gives up waiting for the store before it exits: the trace stays queued
    assert _worker(faulty, tmp_path, rid, outage_s=1.0).run() == 0
    assert run_status(local_store, rid)["status"] == "succeeded"  # the upload decided nothing
    [rep] = verify_run(local_store, rid)
    assert not rep.ok and "missing" in rep.problems[0]
    rule.remove()
    # a later worker on this host (same scratch directory) picks the queued upload up
    _worker(faulty, tmp_path, None).run()
    [rep] = verify_run(local_store, rid)
    assert rep.ok, rep.message()


def test_rollback_longer_than_three_lease_ttls_runs_once(local_store: Any, tmp_path: Path) -> None:
    effects = tmp_path / "effects"
    spec = write_spec(tmp_path, f"""
        name: slow-rollback
        on_failure: rollback
        steps:
          - id: deploy
            run: "echo deploy >> {effects}"
            rollback: "sleep {3 * TTL + 1}; echo undo >> {effects}"
          - id: check
            needs: [deploy]
            run: "exit 3"
    """)
    rid = submit_spec(local_store, spec)
    _worker(local_store, tmp_path, rid).run()
    st = run_status(local_store, rid)
    assert st["status"] == "rolled_back"
    assert Counter(effects.read_text().split()) == {"deploy": 1, "undo": 1}
    state = load_state(local_store.get(layout.step_state(rid, "deploy"))[0])
    rollbacks = [h for h in state.history if h.kind == AttemptKind.ROLLBACK]
    assert [h.status for h in rollbacks] == [AttemptStatus.SUCCEEDED]


def test_when_reads_env_and_workdir_is_rendered(local_store: Any, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, """
        name: ctx
        params:
          sub: {type: string, default: here}
        steps:
          - id: a
            when: "${{ env.HOME != '' }}"
            workdir: "out/${{ params.sub }}"
            run: "pwd > where.txt"
    """)
    rid = submit_spec(local_store, spec)
    _worker(local_store, tmp_path, rid).run()
    st = steps(run_status(local_store, rid))
    assert st["a"]["status"] == "succeeded", st["a"]
    assert (tmp_path / "out" / "here" / "where.txt").read_text().strip() == str((tmp_path / "out" / "here").resolve())
    assert not any("{" in p.name for p in tmp_path.rglob("*")), "a directory named after the raw template"


def test_worker_serving_all_runs_finds_a_run_from_a_host_whose_clock_is_behind(local_store: Any,
                                                                              tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "name: t\nsteps:\n  - id: a\n    run: [echo, hi]\n")
    first = submit_spec(local_store, spec)
    late: dict[str, str] = {}

    def on_cycle(w: Worker) -> None:
        if not late and first in w.finished_runs:
            # a run submitted now by a host 10 s behind: its index entry sorts before the one seen
            rid = submit_spec(local_store, spec, run_id="behind")
            for key in local_store.list(layout.RUNS_INDEX):
                if key.endswith("~behind"):
                    local_store.delete(key)
            local_store.put(layout.runs_index_entry(new_ulid(int(time.time() * 1000) - 10_000), rid), b"",
                            if_none_match=True)
            late["rid"] = rid
        if late and late["rid"] in w.finished_runs:
            w.draining = True

    cfg = WorkerConfig(store=local_store, store_url=local_store.url, worker_id="w", lease_ttl=TTL,
                       tmp_root=tmp_path / "work")
    w = Worker(cfg, concurrency=2, poll_min=0.01, poll_max=0.1, on_cycle=on_cycle)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive()
    assert run_status(local_store, "behind")["status"] == "succeeded"
