"""Operations through the CLI with real processes: Ctrl-C + resume, retry-failed, manual
rollback, concurrency caps, logs, trace commands on a run, bad specs."""

from __future__ import annotations

import json
import signal

from dagcraft.orchestrator import run_status
from dagcraft.primitives import open_store
from tests.orchestrator.helpers import cli, killpg, spawn_cli, steps, wait_for, write_spec


def test_bad_spec_exits_2_and_writes_nothing(tmp_path):
    spec = write_spec(tmp_path, """
        name: bad
        steps:
          - id: a
            run: "true"
          - id: b
            needs: [aa]
            run: "true"
    """)
    store = tmp_path / "store"
    proc = cli("run", str(spec), "--store", str(store), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "pipeline.yaml:" in proc.stderr and "needs" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not store.exists()


def test_ctrl_c_hands_back_then_resume(tmp_path):
    store_url = str(tmp_path / "store")
    started = tmp_path / "started"
    spec = write_spec(tmp_path, f"""
        name: interrupt
        steps:
          - id: long
            run: "echo $DAGCRAFT_ATTEMPT >> {started}; sleep 1"
          - id: next
            needs: [long]
            run: "true"
    """)
    run = spawn_cli("run", str(spec), "--store", store_url, "--workers", "1", "--run-id", "int-1", "--no-report")
    try:
        wait_for(lambda: started.exists(), what="the step to start")
        killpg(run, signal.SIGINT)  # Ctrl-C reaches the whole foreground process group
        run.wait(timeout=60)
    finally:
        killpg(run)
    assert run.returncode == 130, run.stderr.read()
    store = open_store(store_url)
    st = run_status(store, "int-1")
    assert st["status"] == "running"
    assert steps(st)["long"]["status"] == "pending"  # handed back, not failed
    res = cli("resume", "int-1", "--store", store_url, "--workers", "1", "--no-report")
    assert res.returncode == 0, res.stderr
    st = run_status(store, "int-1")
    assert st["status"] == "succeeded"
    assert steps(st)["long"]["attempt"] == 2


def test_resume_retry_failed_and_manual_rollback(tmp_path):
    store_url = str(tmp_path / "store")
    flag = tmp_path / "fixed"
    log = tmp_path / "log"
    spec = write_spec(tmp_path, f"""
        name: fixme
        steps:
          - id: ok
            run: "echo do-ok >> {log}"
            rollback: "echo undo-ok >> {log}"
          - id: fragile
            needs: [ok]
            run: "test -f {flag} && echo do-fragile >> {log}"
            rollback: "echo undo-fragile >> {log}"
          - id: after
            needs: [fragile]
            run: "true"
    """)
    first = cli("run", str(spec), "--store", store_url, "--workers", "1", "--run-id", "fix-1", "--no-report")
    assert first.returncode == 1
    store = open_store(store_url)
    assert steps(run_status(store, "fix-1"))["after"]["status"] == "skipped"
    assert cli("resume", "fix-1", "--store", store_url, "--no-report").returncode == 1  # needs --retry-failed
    flag.touch()
    res = cli("resume", "fix-1", "--store", store_url, "--retry-failed", "--workers", "1", "--no-report")
    assert res.returncode == 0, res.stdout + res.stderr
    by = steps(run_status(store, "fix-1"))
    assert by["fragile"]["status"] == by["after"]["status"] == "succeeded"
    assert by["ok"]["attempt"] == 1
    rb = cli("rollback", "fix-1", "--store", store_url, "--workers", "1")
    assert rb.returncode == 1  # a rolled-back run is not a success
    assert log.read_text().split() == ["do-ok", "do-fragile", "undo-fragile", "undo-ok"]
    assert run_status(store, "fix-1")["status"] == "rolled_back"


def test_agent_max_concurrent_holds_across_worker_processes(tmp_path):
    store_url = str(tmp_path / "store")
    events = tmp_path / "events"
    agent = tmp_path / "agent.sh"
    agent.write_text(f"#!/bin/sh\necho start >> {events}\nsleep 0.3\necho end >> {events}\n")
    agent.chmod(0o755)
    spec = write_spec(tmp_path, f"""
        name: capped
        agents:
          solo: {{command: ["{agent}", "${{{{ prompt }}}}"], max_concurrent: 1}}
        steps:
          - id: work
            matrix: {{n: [1, 2, 3, 4]}}
            agent: solo
            prompt: "task ${{{{ matrix.n }}}}"
    """)
    res = cli("run", str(spec), "--store", store_url, "--workers", "3", "--no-report", timeout=120)
    assert res.returncode == 0, res.stderr
    seq = events.read_text().split()
    assert seq == ["start", "end"] * 4, seq  # never two agent processes at once


def test_logs_status_json_and_trace_commands_on_a_run(tmp_path):
    store_url = str(tmp_path / "store")
    spec = write_spec(tmp_path, """
        name: logs
        steps:
          - id: talk
            run: "echo hello-from-step; echo oops >&2"
    """)
    assert cli("run", str(spec), "--store", store_url, "--run-id", "logs-1", "--no-report").returncode == 0
    assert cli("logs", "logs-1", "talk", "--store", store_url).stdout == "hello-from-step\n"
    assert cli("logs", "logs-1", "talk", "--store", store_url, "--stream", "stderr").stdout == "oops\n"
    assert cli("logs", "logs-1", "nope", "--store", store_url).returncode == 4
    data = json.loads(cli("status", "logs-1", "--store", store_url, "--json").stdout)
    assert data["status"] == "succeeded" and data["steps"][0]["step"] == "talk"
    runs = json.loads(cli("runs", "--store", store_url, "--json").stdout)
    assert [r["run_id"] for r in runs] == ["logs-1"]
    verify = cli("trace", "verify", "logs-1/talk", "--store", store_url)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    out = tmp_path / "r.html"
    render = cli("trace", "render", "logs-1", "--html", str(out), "--store", store_url)
    assert render.returncode == 0, render.stderr
    assert "logs-1" in out.read_text()
    assert cli("status", "missing-run", "--store", store_url).returncode == 4
    ledger = json.loads(cli("trace", "ledger", "--all-runs", "--json", "--store", store_url).stdout)
    assert [(e["run_id"], e["step"], e["integrity"]) for e in ledger] == [("logs-1", "talk", "ok")]


def test_cancel_through_cli(tmp_path):
    store_url = str(tmp_path / "store")
    started = tmp_path / "started"
    spec = write_spec(tmp_path, f"""
        name: cancelme
        steps:
          - id: sleeper
            run: "touch {started}; exec sleep 60"
    """)
    run = spawn_cli("run", str(spec), "--store", store_url, "--workers", "1", "--run-id", "c-1", "--no-report")
    try:
        wait_for(lambda: started.exists(), what="the step to start")
        assert cli("cancel", "c-1", "--store", store_url).returncode == 0
        run.wait(timeout=60)
    finally:
        killpg(run)
    assert run.returncode == 1
    assert run_status(open_store(store_url), "c-1")["status"] == "cancelled"


def test_worker_for_a_run_that_was_never_submitted_exits_4_when_told_to_exit_when_idle(tmp_path):
    """``worker --run ID --exit-when-idle`` on a store without that run used to poll forever
    (every step of nothing pending): it has nothing to do and never will, so it says so."""
    store = tmp_path / "store"
    spec = write_spec(tmp_path, "name: p\nsteps:\n  - id: a\n    run: [\"true\"]\n")
    cli("submit", str(spec), "--store", str(store), check=True)
    p = cli("worker", "--store", str(store), "--run", "no-such-run", "--exit-when-idle", timeout=30)
    assert p.returncode == 4, (p.returncode, p.stderr)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]  # the worker's announcement, the error
    assert "'no-such-run' not found" in lines[-1] and "Traceback" not in p.stderr, p.stderr
    assert len(lines) == 2 and lines[0].startswith("worker "), p.stderr


def test_traces_and_logs_the_run_will_never_have_say_so(tmp_path):
    """``trace summary RUN/STEP`` of a mistyped step said "no traces yet", and ``logs
    --attempt N`` of an attempt never made said "no log (yet)", as if they might come."""
    store = tmp_path / "store"
    spec = write_spec(tmp_path, "name: p\nsteps:\n  - id: a\n    run: [\"true\"]\n")
    rid = cli("submit", str(spec), "--store", str(store), check=True).stdout.strip().splitlines()[-1]
    p = cli("trace", "summary", f"{rid}/zz", "--store", str(store))
    assert p.returncode == 4 and f"step 'zz' not found in run '{rid}'" in p.stderr, p.stderr
    p = cli("trace", "summary", f"{rid}/a", "--store", str(store))  # it exists, it has not run
    assert p.returncode == 4 and "no traces" in p.stderr and "yet" in p.stderr, p.stderr
    cli("worker", "--store", str(store), "--run", rid, "--exit-when-idle", "--quiet", check=True)
    p = cli("logs", rid, "a", "--attempt", "9", "--store", str(store))  # never made: not "(yet)"
    assert p.returncode == 4 and "has no attempt 9 (attempts 1-1)" in p.stderr, p.stderr
    assert cli("logs", rid, "a", "--attempt", "1", "--store", str(store)).returncode == 0
