"""Lifecycle guarantees with real worker processes: worker exit codes, and Ctrl-C during a
compensation hands it back instead of recording it as failed."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

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
