"""Lifecycle guarantees with real worker processes: worker exit codes, and Ctrl-C during a
compensation hands it back instead of recording it as failed."""

from __future__ import annotations

import signal
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from dagcraft.orchestrator import layout, run_status
from dagcraft.orchestrator.model import AttemptKind, AttemptStatus, load_state
from dagcraft.primitives import open_store
from tests.orchestrator.helpers import cli, killpg, spawn_cli, wait_for, write_spec


def _worker(store: str, rid: str) -> list[str]:
    return ["worker", "--store", store, "--run", rid, "--exit-when-idle", "--poll-max", "0.1", "--lease-ttl", "3",
            "--quiet"]


def test_worker_serving_one_run_exits_with_its_code(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    ok = write_spec(tmp_path, "name: ok\nsteps:\n  - id: a\n    run: [\"true\"]\n", "ok.yaml")
    bad = write_spec(tmp_path, "name: bad\nsteps:\n  - id: a\n    run: [sh, -c, 'exit 3']\n", "bad.yaml")
    slow = write_spec(tmp_path, f"name: slow\nsteps:\n  - id: a\n    run: [sh, -c, 'touch {tmp_path}/go; sleep 60']\n",
                      "slow.yaml")
    for spec, code in ((ok, 0), (bad, 1)):
        rid = cli("submit", str(spec), "--store", store, check=True).stdout.strip()
        assert cli(*_worker(store, rid)).returncode == code
    rid = cli("submit", str(slow), "--store", store, check=True).stdout.strip()
    proc = spawn_cli(*_worker(store, rid))
    try:
        wait_for((tmp_path / "go").exists, what="the step to start")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130  # interrupted before the run finished: resumable
    finally:
        killpg(proc)
    assert run_status(open_store(store), rid)["steps"][0]["status"] == "pending"  # handed back


def test_ctrl_c_during_a_compensation_hands_it_back(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    effects, started = tmp_path / "effects", tmp_path / "rollback-started"
    spec = write_spec(tmp_path, f"""
name: rb
on_failure: rollback
steps:
  - id: deploy
    run: "echo deploy >> {effects}"
    rollback: "if [ ! -e {started} ]; then touch {started}; sleep 60; fi; echo undo >> {effects}"
  - id: check
    needs: [deploy]
    run: "exit 3"
""")
    rid = cli("submit", str(spec), "--store", store, check=True).stdout.strip()
    first = spawn_cli(*_worker(store, rid))
    try:
        wait_for(started.exists, what="the compensation to start")
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=30) == 130
    finally:
        killpg(first)
    st = load_state(open_store(store).get(layout.step_state(rid, "deploy"))[0])
    assert st.status == "succeeded"  # claimable for compensation again, not a failed compensation
    assert [(h.kind, h.status) for h in st.history][-1] == (AttemptKind.ROLLBACK, AttemptStatus.INTERRUPTED)
    assert cli(*_worker(store, rid)).returncode == 1  # the run ends rolled back: not a success
    final = run_status(open_store(store), rid)
    assert final["status"] == "rolled_back"
    assert Counter(effects.read_text().split()) == {"deploy": 1, "undo": 1}


def test_ctrl_c_while_an_attempt_is_being_started_hands_it_back_without_running_it(tmp_path: Path) -> None:
    """The Ctrl-C (hand_back) lands after the worker submitted an attempt to its thread pool
    but before it recorded it as running: hand_back() did not see it. Before, that attempt
    ran on to its end while the worker waited for it (``dagcraft run``'s pool SIGKILLed such a
    worker after 10 s, leaving the step ``running`` and its process orphaned). Now it is
    handed back, and its command never starts."""
    from dagcraft.orchestrator.attempt import WorkerConfig
    from dagcraft.orchestrator.worker import Worker
    from dagcraft.primitives.local import LocalStore
    from tests.orchestrator.helpers import submit_spec

    ran = tmp_path / "ran"
    store = LocalStore(tmp_path / "store", fsync=False)
    # the step would block for 60 s: the old code fails the test by its outcome, never hangs it
    spec = write_spec(tmp_path, f"name: cc\nsteps:\n  - id: a\n    run: \"touch {ran}; sleep 60\"\n    timeout: 20s\n")
    rid = submit_spec(store, spec)
    cfg = WorkerConfig(store=store, store_url=store.url, worker_id="w", lease_ttl=30.0, tmp_root=tmp_path / "work",
                       grace=1.0)
    w = Worker(cfg, run_id=rid, concurrency=1, exit_when_idle=True, poll_min=0.01, poll_max=0.05)
    assert w.pool is not None
    real_submit = w.pool.submit
    started = threading.Event()

    def submit(fn: Any, *a: Any, **kw: Any) -> Any:
        w.hand_back()  # the signal handler runs here: before the thread and the record exist
        fut = real_submit(fn, *a, **kw)
        started.set()
        return fut

    w.pool.submit = submit  # type: ignore[method-assign]
    assert w.run() == 130  # interrupted: resumable
    assert started.is_set()
    st = load_state(store.get(layout.step_state(rid, "a"))[0])
    assert st.status == "pending"  # handed back, not failed and not left running
    assert [h.status for h in st.history] == [AttemptStatus.INTERRUPTED]
    assert not ran.exists()  # claimed after the Ctrl-C: its command never started
