"""Run-engine guarantees with real worker processes: exactly-once, crash recovery, fencing,
resume. Workers are ``dagcraft worker`` / ``dagcraft run`` subprocesses."""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

import pytest

from dagcraft.orchestrator import layout, run_status
from dagcraft.orchestrator.model import load_state
from dagcraft.primitives import open_store
from tests.conftest import REALSERVER, server_store_url
from tests.orchestrator.helpers import (
    cli,
    killpg,
    read_trace_events,
    spawn_cli,
    steps,
    wait_for,
    write_spec,
)


def wide_dag_spec(n: int, out: Path) -> str:
    """n steps in layers of 20; each appends its id to ``out`` (the side effect to count)."""
    lines = ["name: wide", "steps:"]
    for i in range(n):
        lines.append(f"  - id: s{i}")
        if i >= 20:
            lines.append(f"    needs: [s{i - 20}]")
        lines.append(f"    run: [sh, -c, 'echo s{i} >> {out}']")
    return "\n".join(lines) + "\n"


def _exactly_once(tmp_path: Path, store_url: str, n: int, workers: int = 4) -> None:
    out = tmp_path / "effects.txt"
    spec = write_spec(tmp_path, wide_dag_spec(n, out))
    rid = cli("submit", str(spec), "--store", store_url, check=True).stdout.strip()
    procs = [spawn_cli("worker", "--store", store_url, "--run", rid, "--exit-when-idle", "--poll-max", "0.2",
                       "--quiet") for _ in range(workers)]
    try:
        for p in procs:
            p.wait(timeout=400)
            assert p.returncode == 0, p.stderr.read() if p.stderr else ""
    finally:
        for p in procs:
            killpg(p)
    counts = Counter(out.read_text().split())
    assert len(counts) == n
    dupes = {k: v for k, v in counts.items() if v != 1}
    assert not dupes, f"steps ran more than once: {dupes}"
    st = run_status(open_store(store_url), rid)
    assert st["status"] == "succeeded"
    claimed_by = {s["step"]: s for s in st["steps"]}
    assert all(s["attempt"] == 1 for s in claimed_by.values())


def test_exactly_once_200_steps_4_workers_local(tmp_path):
    _exactly_once(tmp_path, str(tmp_path / "store"), 200)


def test_exactly_once_200_steps_4_workers_moto_server(tmp_path, moto_server):
    _exactly_once(tmp_path, server_store_url(moto_server), 200)


@pytest.mark.realserver
def test_exactly_once_200_steps_4_workers_real_server(tmp_path, real_s3_url):
    _exactly_once(tmp_path, real_s3_url, 200)


@pytest.fixture(params=["local", "s3", REALSERVER])
def store_url(request, tmp_path) -> str:
    """A fresh store for subprocesses: a local directory, a bucket on the moto server, or a prefix
    on the real server of the real-server tier."""
    if request.param == "local":
        return str(tmp_path / "store")
    if request.param == "realserver":
        return request.getfixturevalue("real_s3_url")
    return server_store_url(request.getfixturevalue("moto_server"))


def _state(store, rid: str, step: str):
    got = store.get(layout.step_state(rid, step))
    return load_state(got[0]) if got else None


def test_kill_9_worker_mid_step_is_recovered(tmp_path, store_url):
    marker = tmp_path / "started"
    release = tmp_path / "release"  # attempt 1 blocks until the test is done with it: no race
    spec = write_spec(tmp_path, f"""
        name: crash
        steps:
          - id: slow
            run: "echo $DAGCRAFT_ATTEMPT >> {marker}; [ $DAGCRAFT_ATTEMPT -gt 1 ] || while [ ! -e {release} ]; do sleep 0.05; done; echo ok"
          - id: after
            needs: [slow]
            run: "true"
    """)
    rid = cli("submit", str(spec), "--store", store_url, check=True).stdout.strip()
    store = open_store(store_url)
    first = spawn_cli("worker", "--store", store_url, "--run", rid, "--exit-when-idle", "--lease-ttl", "2",
                      "--poll-max", "0.2", "--quiet")
    try:
        wait_for(lambda: marker.exists(), what="the step to start")
        st = _state(store, rid, "slow")
        assert st.status == "running" and st.worker.endswith(f":{first.pid}")
        killpg(first, signal.SIGKILL)  # the worker and its step die mid-step
        first.wait(timeout=10)
        second = spawn_cli("worker", "--store", store_url, "--run", rid, "--exit-when-idle", "--lease-ttl", "2",
                           "--poll-max", "0.2", "--quiet")
        second.wait(timeout=120)
        assert second.returncode == 0
    finally:
        release.touch()  # ends the orphaned attempt 1 (its own session outlives the kill)
        killpg(first)
    status = run_status(store, rid)
    assert status["status"] == "succeeded"
    slow = _state(store, rid, "slow")
    assert slow.attempt == 2
    assert [h.status for h in slow.history] == ["lost", "succeeded"]
    assert slow.history[0].reason == "lost worker"


def test_stopped_worker_past_its_lease_is_fenced(tmp_path, store_url):
    marker = tmp_path / "attempts"
    spec = write_spec(tmp_path, f"""
        name: fence
        steps:
          - id: step
            run: "echo $DAGCRAFT_ATTEMPT >> {marker}; sleep 1.5"
    """)
    rid = cli("submit", str(spec), "--store", store_url, check=True).stdout.strip()
    store = open_store(store_url)
    stale = spawn_cli("worker", "--store", store_url, "--run", rid, "--exit-when-idle", "--lease-ttl", "1.5",
                      "--poll-max", "0.2", "--quiet")
    rescuer = None
    try:
        wait_for(lambda: marker.exists(), what="attempt 1 to start")
        os.kill(stale.pid, signal.SIGSTOP)  # the worker freezes; its child keeps running
        rescuer = spawn_cli("worker", "--store", store_url, "--run", rid, "--exit-when-idle", "--lease-ttl", "1.5",
                            "--poll-max", "0.2", "--quiet")
        wait_for(lambda: run_status(store, rid)["status"] == "succeeded", timeout=60, what="rescue to finish")
        os.kill(stale.pid, signal.SIGCONT)
        stale.wait(timeout=60)
        rescuer.wait(timeout=60)
    finally:
        killpg(stale)
        if rescuer is not None:
            killpg(rescuer)
    st = _state(store, rid, "step")
    assert st.status == "succeeded" and st.attempt == 2
    assert st.history[-1].attempt == 2 and st.history[-1].status == "succeeded"
    kinds = [e["kind"] for e in read_trace_events(store, rid, "step", 1)]
    assert "step.fenced" in kinds, kinds
    # closed before its refused commit, then marked fenced; nothing pinned it, and the run verifies
    assert kinds[-2:] == ["step.fenced", "run.finished"] and kinds.count("run.finished") == 2, kinds
    assert cli("trace", "verify", rid, "--store", store_url).returncode == 0
    # the stale attempt's result never landed: no history entry claims attempt 1 succeeded
    assert not any(h.attempt == 1 and h.status == "succeeded" for h in st.history)


def test_kill_whole_run_then_resume(tmp_path):
    store_url = str(tmp_path / "store")
    out = tmp_path / "effects.txt"
    lines = ["name: resumable", "steps:"]
    for i in range(12):
        lines.append(f"  - id: s{i}")
        if i:
            lines.append(f"    needs: [s{i - 1}]")
        lines.append(f"    run: [sh, -c, 'echo s{i} >> {out}; sleep 0.2']")
    spec = write_spec(tmp_path, "\n".join(lines) + "\n")
    run = spawn_cli("run", str(spec), "--store", store_url, "--workers", "2", "--lease-ttl", "2",
                    "--run-id", "resumable-1", "--no-report")
    store = open_store(store_url)
    try:
        wait_for(lambda: out.exists() and len(out.read_text().split()) >= 4, timeout=60, what="4 steps to run")
        killpg(run, signal.SIGKILL)  # every process of the run: pool, workers, steps
        run.wait(timeout=10)
    finally:
        killpg(run)
    before = run_status(store, "resumable-1")
    done_before = {s["step"] for s in before["steps"] if s["status"] == "succeeded"}
    assert before["status"] == "running" and 0 < len(done_before) < 12
    res = cli("resume", "resumable-1", "--store", store_url, "--workers", "2", "--lease-ttl", "2",
              "--no-report", timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    after = run_status(store, "resumable-1")
    assert after["status"] == "succeeded"
    counts = Counter(out.read_text().split())
    assert set(counts) == {f"s{i}" for i in range(12)}
    for sid in done_before:
        assert counts[sid] == 1, f"{sid} succeeded before the crash and ran again"
    assert all(steps(after)[s]["attempt"] == 1 for s in done_before)
