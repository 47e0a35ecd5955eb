"""Watching runs (issue 11): live workers visible, stalled runs said so, `cancel` of a run no
worker serves finishes it, `logs -f` that follows, `status --watch` in place. Real worker
processes where crashes matter; request counts where a cost is added."""

from __future__ import annotations

import io
import json
import queue
import signal
import subprocess
import threading
from collections import Counter
from typing import Any

import pytest
from rich.console import Console

from dagcraft.cli.watch import render, watch
from dagcraft.orchestrator import layout, registry, run_status
from dagcraft.orchestrator.attempt import LOG_SNAPSHOT_S_LOCAL, LOG_SNAPSHOT_S_REMOTE, log_snapshot_interval
from dagcraft.orchestrator.ops import follow_log, list_runs
from dagcraft.primitives import open_store
from tests.orchestrator.helpers import (
    cli,
    drive_inline,
    killpg,
    run_spec,
    spawn_cli,
    steps,
    submit_spec,
    wait_for,
    write_spec,
)

TWO_STEPS = """
    name: stall
    steps:
      - id: first
        run: "touch {started}; exec sleep 120"
      - id: second
        needs: [first]
        run: "true"
"""


def _worker(store_url: str, rid: str, lease_ttl: str = "3") -> subprocess.Popen[str]:
    return spawn_cli("worker", "--store", store_url, "--run", rid, "--exit-when-idle", "--lease-ttl", lease_ttl,
                     "--poll-max", "0.2", "--quiet")


def _workers_json(store_url: str) -> list[dict[str, Any]]:
    res = cli("workers", "--store", store_url, "--json", check=True)
    return json.loads(res.stdout)


# -- registration -------------------------------------------------------------------------------
def test_registration_costs_one_put_per_beat_and_one_delete_at_exit(local_store):
    reg = registry.Registration(local_store, "w1@host:1", beat_s=0.05, only_run="r1",
                                snapshot=lambda: (["r1"], ["r1/a#1"]))
    before = Counter(local_store.stats)
    reg.start()
    started = Counter(local_store.stats)
    started.subtract(before)
    # the first PUT, then the prune: one LIST and one GET per record (its own)
    assert +started == Counter({"put": 1, "list": 1, "get": 1})
    for _ in range(3):  # renewals come from the thread: wait for each, no sleeping
        reg.beaten.clear()
        assert reg.beaten.wait(10)
    reg.stop()
    used = Counter(local_store.stats)
    used.subtract(before)
    assert used["put"] == reg.beats and reg.beats >= 4
    assert used["delete"] == 1 and used["get"] == 1 and used["list"] == 1
    assert local_store.get(reg.key) is None and local_store.list(layout.WORKERS_PREFIX) == []


def test_record_fields_and_liveness_on_the_store_clock(store):
    reg = registry.Registration(store, "w2@host:2", beat_s=10.0, snapshot=lambda: (["r1", "r2"], ["r1/a#1"]))
    reg.beat()
    [(rec, state)] = registry.list_workers(store)
    assert state is registry.WorkerState.LIVE
    assert rec.pid > 0 and rec.host and rec.runs == ["r1", "r2"] and rec.steps == ["r1/a#1"]
    assert rec.beat_at == pytest.approx(store.now(), abs=5)
    assert rec.serves("r-other")  # serves every run
    later = rec.beat_at + registry.GONE_AFTER_BEATS * rec.beat_s + registry.GRACE_S + 0.1
    assert rec.state(later) is registry.WorkerState.GONE
    # a worker serving one run counts only for that one
    one = rec.model_copy(update={"only_run": "r1", "runs": ["r1"]})
    assert one.serves("r1") and not one.serves("r2")
    assert registry.stalled([(one, registry.WorkerState.LIVE)], "r2", "running") == registry.STALLED
    assert registry.stalled([(one, registry.WorkerState.GONE)], "r1", "running") == registry.STALLED
    assert registry.stalled([(one, registry.WorkerState.LIVE)], "r1", "running") is None
    assert registry.stalled([], "r1", "succeeded") is None


def test_long_gone_records_are_pruned_by_the_next_worker(local_store):
    old = registry.WorkerRecord(worker_id="dead@h:9", instance="X", host="h", pid=9, started_at=1.0, beat_at=1.0,
                                beat_s=10)
    local_store.put(layout.worker_record("dead@h:9", "X"), old.model_dump_json().encode())
    reg = registry.Registration(local_store, "new@h:10", beat_s=10.0)
    reg.start()
    try:
        assert [r.worker_id for r, _ in registry.list_workers(local_store)] == ["new@h:10"]
    finally:
        reg.stop()


def test_in_process_worker_registers_while_running_and_leaves_on_exit(local_store, tmp_path):
    seen: list[list[tuple[registry.WorkerRecord, registry.WorkerState]]] = []
    spec = write_spec(tmp_path, """
        name: reg
        steps:
          - id: a
            run: "true"
    """)
    rid = submit_spec(local_store, spec)
    from dagcraft.orchestrator import WorkerConfig
    from dagcraft.orchestrator.worker import Worker

    cfg = WorkerConfig(store=local_store, store_url=local_store.url, worker_id="reg-test-worker",
                       tmp_root=tmp_path / "work")
    w = Worker(cfg, run_id=rid, exit_when_idle=True, poll_min=0.01, poll_max=0.05,
               on_cycle=lambda _w: seen.append(registry.list_workers(local_store)) if not seen else None)
    assert w.run() == 0
    assert seen and [(r.worker_id, s, r.only_run) for r, s in seen[0]] == [("reg-test-worker", "live", rid)]
    assert registry.list_workers(local_store) == []
    st = run_status(local_store, rid)
    # finished: the worker of the last attempt is kept, with its duration
    assert steps(st)["a"]["worker"] == "reg-test-worker" and steps(st)["a"]["duration_s"] is not None
    assert st["stalled"] is None


# -- stalled runs and cancel with real processes ----------------------------------------------
def test_sigint_leaves_a_stalled_run_that_cancel_finishes(tmp_path):
    store_url = str(tmp_path / "store")
    started = tmp_path / "started"
    spec = write_spec(tmp_path, TWO_STEPS.format(started=started))
    rid = cli("submit", str(spec), "--store", store_url, "--run-id", "stall-int", check=True).stdout.strip()
    w = _worker(store_url, rid)
    try:
        wait_for(started.exists, what="the step to start")
        live = _workers_json(store_url)
        assert [(x["state"], x["pid"], x["only_run"]) for x in live] == [("live", w.pid, rid)]
        st = cli("status", rid, "--store", store_url)
        assert st.returncode == 0 and "stalled" not in st.stdout
        killpg(w, signal.SIGINT)
        assert w.wait(timeout=60) == 130
    finally:
        killpg(w)
    # a clean exit removes the record at once: no waiting for it to go stale
    assert _workers_json(store_url) == []
    st = cli("status", rid, "--store", store_url)
    assert "stalled: no live worker" in st.stdout, st.stdout
    data = json.loads(cli("status", rid, "--store", store_url, "--json").stdout)
    assert data["stalled"] == "no live worker" and data["workers"] == []
    assert "stalled: no live worker" in cli("runs", "--store", store_url).stdout
    assert json.loads(cli("runs", "--store", store_url, "--json").stdout)[0]["stalled"] == "no live worker"
    res = cli("cancel", rid, "--store", store_url)
    assert res.returncode == 0 and res.stdout.strip() == f"run {rid}: cancelled", res.stdout + res.stderr
    st2 = run_status(open_store(store_url), rid)
    assert st2["status"] == "cancelled" and st2["stalled"] is None
    assert {s["step"]: s["status"] for s in st2["steps"]} == {"first": "cancelled", "second": "cancelled"}


def test_kill_9_worker_goes_stale_then_cancel_takes_its_lease_over(tmp_path):
    store_url = str(tmp_path / "store")
    started = tmp_path / "started"
    spec = write_spec(tmp_path, TWO_STEPS.format(started=started))
    rid = cli("submit", str(spec), "--store", store_url, "--run-id", "stall-kill", check=True).stdout.strip()
    w = _worker(store_url, rid)
    try:
        wait_for(started.exists, what="the step to start")
        rec = wait_for(lambda: [x for x in _workers_json(store_url) if x["steps"]], what="its step in its record")
        assert rec[0]["steps"] == [f"{rid}/first#1"] and rec[0]["runs"] == [rid]
        killpg(w, signal.SIGKILL)
        w.wait(timeout=10)
    finally:
        killpg(w)
    # the record stays, and reads as gone once its beats stop (on the store clock)
    wait_for(lambda: [x["state"] for x in _workers_json(store_url)] == ["gone"], timeout=60,
             interval=0.2, what="the killed worker to read as gone")
    assert "stalled: no live worker" in cli("status", rid, "--store", store_url).stdout
    listed = cli("workers", "--store", store_url)
    assert listed.stdout.startswith("gone") and f"pid {w.pid}" in listed.stdout
    res = cli("cancel", rid, "--store", store_url)
    assert res.returncode == 0 and res.stdout.strip() == f"run {rid}: cancelled", res.stdout + res.stderr
    st = steps(run_status(open_store(store_url), rid))
    assert st["first"]["status"] == "cancelled" and st["first"]["reason"] == "lost worker"
    assert st["second"]["status"] == "cancelled"


def test_cancel_with_a_live_worker_leaves_it_to_the_worker(tmp_path):
    store_url = str(tmp_path / "store")
    started = tmp_path / "started"
    spec = write_spec(tmp_path, TWO_STEPS.format(started=started))
    rid = cli("submit", str(spec), "--store", store_url, "--run-id", "live-c", check=True).stdout.strip()
    w = _worker(store_url, rid)
    try:
        wait_for(started.exists, what="the step to start")
        res = cli("cancel", rid, "--store", store_url)
        assert res.stdout.strip() == f"run {rid}: cancelling"
        assert w.wait(timeout=60) == 1
    finally:
        killpg(w)
    assert run_status(open_store(store_url), rid)["status"] == "cancelled"


# -- logs --follow --------------------------------------------------------------------------------
def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    q: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            q.put(line)
    threading.Thread(target=pump, daemon=True).start()
    return q


@pytest.mark.parametrize("backend", ["local", "s3server"])
def test_logs_follow_waits_for_the_start_and_streams_lines_as_they_come(tmp_path, backend, request):
    if backend == "local":
        store_url = str(tmp_path / "store")
    else:
        from tests.conftest import server_store_url

        store_url = server_store_url(request.getfixturevalue("moto_server"))
    go = tmp_path / "go"
    spec = write_spec(tmp_path, f"""
        name: follow
        steps:
          - id: talk
            run: "echo ready; while [ ! -e {go} ]; do sleep 0.05; done; echo done"
    """)
    rid = cli("submit", str(spec), "--store", store_url, "--run-id", "f-1", check=True).stdout.strip()
    follower = spawn_cli("logs", rid, "talk", "--follow", "--store", store_url)
    w = None
    try:
        lines = _lines(follower)
        assert follower.stderr is not None  # the step has not started: it waits instead of exiting 4
        assert follower.stderr.readline() == f"dagcraft: waiting for {rid}/talk to start\n"
        # a long lease: its heartbeat (every 200 s) is not what uploads the log
        w = _worker(store_url, rid, lease_ttl="600")
        # the step is still running (it waits for `go`): this line was streamed, not uploaded at the end
        assert lines.get(timeout=30) == "ready\n"
        go.touch()
        assert lines.get(timeout=60) == "done\n"
        assert follower.wait(timeout=60) == 0
        assert w.wait(timeout=60) == 0
    finally:
        killpg(follower)
        if w is not None:
            killpg(w)


def test_logs_follow_exits_1_for_a_failed_attempt_and_4_for_no_such_step(tmp_path):
    store_url = str(tmp_path / "store")
    spec = write_spec(tmp_path, """
        name: fails
        steps:
          - id: bad
            run: "echo before-failing; exit 3"
          - id: never
            needs: [bad]
            run: "true"
    """)
    assert cli("run", str(spec), "--store", store_url, "--run-id", "f-2", "--no-report").returncode == 1
    res = cli("logs", "f-2", "bad", "-f", "--store", store_url)
    assert res.returncode == 1 and res.stdout == "before-failing\n"
    assert "f-2/bad: failed" in res.stderr
    skipped = cli("logs", "f-2", "never", "-f", "--store", store_url)
    assert skipped.returncode == 1 and skipped.stdout == "" and "skipped" in skipped.stderr
    missing = cli("logs", "f-2", "nope", "-f", "--store", store_url)
    assert missing.returncode == 4 and missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr


def test_follow_costs_two_gets_per_poll_and_snapshots_only_grown_logs(tmp_path, local_store):
    # one snapshot for a log that grew once, none for a step that prints nothing
    before = Counter(local_store.stats)
    run_spec(local_store, tmp_path, """
        name: quiet
        steps:
          - id: a
            run: "sleep 1.6"
    """, status=False)
    quiet = Counter(local_store.stats)
    quiet.subtract(before)
    before = Counter(local_store.stats)
    rid, _ = run_spec(local_store, tmp_path, """
        name: quiet
        steps:
          - id: a
            run: "echo one-line; sleep 1.6"
    """, status=False)
    talky = Counter(local_store.stats)
    talky.subtract(before)
    # 3 snapshot rounds at 0.5 s: one PUT when the line appeared, plus the final upload
    assert talky["put"] - quiet["put"] == 2, (talky, quiet)
    assert LOG_SNAPSHOT_S_LOCAL <= 1.0 and log_snapshot_interval(local_store) == LOG_SNAPSHOT_S_LOCAL
    assert LOG_SNAPSHOT_S_REMOTE == 3.0
    # following a finished attempt: state, log, trace (the final-upload marker), log
    out: list[bytes] = []
    before = Counter(local_store.stats)
    assert follow_log(local_store, rid, "a", out.append) == "succeeded"
    used = Counter(local_store.stats)
    used.subtract(before)
    assert +used == Counter({"get": 4}) and b"".join(out) == b"one-line\n"


# -- status --watch ------------------------------------------------------------------------------
def _fake_status(status: str, step_status: str) -> dict[str, Any]:
    return {"run_id": "r1", "name": "demo", "status": status, "reason": None, "stalled": None,
            "counts": {step_status: 1},
            "steps": [{"step": "build[x=1]", "status": step_status, "attempt": 2, "worker": "me@host:42",
                       "duration_s": 75.0, "reason": "exit code 3", "parent": None}]}


def test_status_watch_updates_in_place_on_a_tty():
    seq = iter([_fake_status("running", "running"), _fake_status("running", "running"),
                _fake_status("failed", "failed")])
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120)
    printed: list[dict[str, Any]] = []
    final = watch(lambda: next(seq), printed.append, console=console, interval=0.0)
    assert final["status"] == "failed" and printed == []
    out = buf.getvalue()
    # redrawn over itself (cursor up + erase line), not reprinted below
    assert "\x1b[2K" in out and "\x1b[1A" in out
    for col in ("step", "status", "attempt", "worker", "duration", "reason"):
        assert col in out
    assert "build[x=1]" in out and "me@host:42" in out and "1m15s" in out and "exit code 3" in out


def test_status_watch_plain_when_not_a_tty():
    seq = iter([_fake_status("running", "running"), _fake_status("succeeded", "succeeded")])
    buf = io.StringIO()
    printed: list[str] = []
    final = watch(lambda: next(seq), lambda st: printed.append(st["status"]),
                  console=Console(file=buf, force_terminal=False), interval=0.0)
    assert final["status"] == "succeeded" and printed == ["running", "succeeded"]
    assert buf.getvalue() == "\n" and "\x1b" not in buf.getvalue()


def test_render_says_stalled():
    st = _fake_status("running", "pending")
    st["stalled"] = registry.STALLED
    buf = io.StringIO()
    Console(file=buf, width=120).print(render(st))
    assert "stalled: no live worker" in buf.getvalue()


def test_status_json_worker_and_stalled_fields(local_store, tmp_path):
    rid, st = run_spec(local_store, tmp_path, """
        name: fields
        steps:
          - id: a
            run: "true"
    """)
    a = steps(st)["a"]
    assert a["status"] == "succeeded" and a["worker"] and a["worker"].startswith("test-worker-")
    assert st["stalled"] is None and list_runs(local_store)[0]["stalled"] is None
    # an unfinished run nobody serves
    spec = write_spec(tmp_path, "name: idle\nsteps:\n  - id: a\n    run: 'true'\n", name="idle.yaml")
    idle = submit_spec(local_store, spec)
    assert run_status(local_store, idle)["stalled"] == registry.STALLED
    assert {r["run_id"]: r["stalled"] for r in list_runs(local_store)} == {rid: None, idle: registry.STALLED}
    assert local_store.get(layout.control(idle)) is not None
    drive_inline(local_store, idle, tmp_path)


def test_workers_command_on_an_empty_and_a_missing_store(tmp_path):
    store_url = str(tmp_path / "store")
    open_store(store_url)  # created, nobody registered
    res = cli("workers", "--store", store_url)
    assert res.returncode == 0 and res.stdout == f"no workers registered in {tmp_path / 'store'}\n"
    assert json.loads(cli("workers", "--store", store_url, "--json").stdout) == []
    missing = cli("workers", "--store", str(tmp_path / "nope"))
    assert missing.returncode == 4 and missing.stderr.count("\n") == 1 and not (tmp_path / "nope").exists()
