"""Worker-level behaviour with real processes: serving every run, finally steps, pool restart
of a dead worker, SIGTERM drain, logs --follow."""

from __future__ import annotations

import os
import signal
import time

from dagcraft.orchestrator import run_status
from dagcraft.primitives import open_store
from tests.orchestrator.helpers import cli, killpg, spawn_cli, steps, wait_for, write_spec


def test_one_worker_serves_every_run_in_the_store(tmp_path):
    store_url = str(tmp_path / "store")
    ids = []
    for i in range(2):
        spec = write_spec(tmp_path, f"""
            name: multi{i}
            steps:
              - id: only
                run: "echo {i}"
        """, name=f"p{i}.yaml")
        ids.append(cli("submit", str(spec), "--store", store_url, check=True).stdout.strip())
    w = cli("worker", "--store", store_url, "--exit-when-idle", "--poll-max", "0.1", "--quiet", timeout=120)
    assert w.returncode == 0, w.stderr
    store = open_store(store_url)
    assert [run_status(store, r)["status"] for r in ids] == ["succeeded", "succeeded"]


def test_finally_steps_run_after_failure(tmp_path):
    mark = tmp_path / "cleaned"
    spec = write_spec(tmp_path, f"""
        name: fin
        steps:
          - id: boom
            run: "exit 2"
        finally:
          - id: cleanup
            run: "touch {mark}"
    """)
    store_url = str(tmp_path / "store")
    res = cli("run", str(spec), "--store", store_url, "--workers", "1", "--run-id", "fin-1", "--no-report")
    assert res.returncode == 1
    assert mark.exists()
    by = steps(run_status(open_store(store_url), "fin-1"))
    assert by["boom"]["status"] == "failed" and by["cleanup"]["status"] == "succeeded"


def test_pool_restarts_a_worker_killed_mid_step(tmp_path):
    store_url = str(tmp_path / "store")
    started = tmp_path / "started"
    spec = write_spec(tmp_path, f"""
        name: restart
        steps:
          - id: slow
            run: "echo $DAGCRAFT_ATTEMPT >> {started}; sleep 1"
    """)
    run = spawn_cli("run", str(spec), "--store", store_url, "--workers", "1", "--lease-ttl", "2",
                    "--run-id", "restart-1", "--no-report")
    store = open_store(store_url)
    try:
        wait_for(lambda: started.exists(), what="attempt 1")
        worker = run_status(store, "restart-1")["steps"][0]["worker"]
        os.kill(int(worker.rsplit(":", 1)[1]), signal.SIGKILL)  # the pool's only worker dies
        run.wait(timeout=120)
    finally:
        killpg(run)
    assert run.returncode == 0, run.stderr.read()
    by = steps(run_status(store, "restart-1"))
    assert by["slow"]["status"] == "succeeded" and by["slow"]["attempt"] == 2


def test_sigterm_drains_the_running_step(tmp_path):
    store_url = str(tmp_path / "store")
    started = tmp_path / "started"
    spec = write_spec(tmp_path, f"""
        name: drain
        steps:
          - id: a
            run: "touch {started}; sleep 1"
          - id: b
            needs: [a]
            run: "true"
    """)
    rid = cli("submit", str(spec), "--store", store_url, check=True).stdout.strip()
    w = spawn_cli("worker", "--store", store_url, "--run", rid, "--poll-max", "0.1", "--quiet")
    try:
        wait_for(lambda: started.exists(), what="step a to start")
        os.kill(w.pid, signal.SIGTERM)
        w.wait(timeout=60)
    finally:
        killpg(w)
    assert w.returncode == 0
    by = steps(run_status(open_store(store_url), rid))
    assert by["a"]["status"] == "succeeded"  # finished, not abandoned
    assert by["b"]["status"] == "pending"  # nothing new was claimed while draining


def test_logs_follow_streams_until_the_attempt_ends(tmp_path):
    store_url = str(tmp_path / "store")
    spec = write_spec(tmp_path, """
        name: follow
        steps:
          - id: chatty
            run: "for i in 1 2 3 4 5 6; do echo line-$i; sleep 0.5; done"
    """)
    run = spawn_cli("run", str(spec), "--store", store_url, "--workers", "1", "--lease-ttl", "1.5",
                    "--run-id", "follow-1", "--no-report")
    store = open_store(store_url)
    try:
        wait_for(lambda: steps(run_status(store, "follow-1"))["chatty"]["status"] == "running"
                 # control.json is the submit's last write: before it the run is not visible
                 if store.get("runs/follow-1/control.json") else False, what="the step to run")
        t0 = time.monotonic()
        res = cli("logs", "follow-1", "chatty", "--follow", "--store", store_url, timeout=60)
        run.wait(timeout=60)
    finally:
        killpg(run)
    assert res.returncode == 0
    assert res.stdout.split() == [f"line-{i}" for i in range(1, 7)]
    assert time.monotonic() - t0 > 1.0  # it waited for the step rather than returning at once
