"""The pool's workers are forks of the pool process (issue 12: no re-import per worker), or
new interpreters with DAGCRAFT_WORKER_START=exec: runs, kill -9 of a worker, Ctrl-C and
resume, with real processes on the local store and the moto server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

from dagcraft.orchestrator import layout, run_status
from dagcraft.orchestrator.model import load_state
from dagcraft.orchestrator.pool import ForkedWorker, fork_unsafe_reason
from dagcraft.primitives import open_store
from dagcraft.primitives.ulid import new_ulid
from tests.conftest import server_store_url
from tests.orchestrator.helpers import cli, killpg, spawn_cli, steps, wait_for, write_spec


@pytest.fixture(params=["local", "s3"])
def store_url(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return server_store_url(request.getfixturevalue("moto_server"))


@pytest.fixture(params=["fork", "exec"])
def start(request) -> dict[str, str]:
    """The environment of ``dagcraft run``: the default (fork) or DAGCRAFT_WORKER_START=exec."""
    return {"DAGCRAFT_WORKER_START": "exec"} if request.param == "exec" else {}


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def _ppid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no PPid for {pid}")


def _worker_pid(store, rid: str, step: str) -> int:
    got = store.get(layout.step_state(rid, step))
    assert got is not None
    st = load_state(got[0])
    assert st.status == "running" and st.worker
    return int(st.worker.rsplit(":", 1)[1])


def _assert_started_as(run: subprocess.Popen[str], worker_pid: int, env: dict[str, str]) -> None:
    """A forked worker is the pool's child with the pool's own command line; an exec'd one
    is its child running ``... worker --run ...``."""
    assert _ppid(worker_pid) == run.pid
    if env.get("DAGCRAFT_WORKER_START") == "exec":
        assert b"\0worker\0" in _cmdline(worker_pid)
    else:
        assert _cmdline(worker_pid) == _cmdline(run.pid)


def _blocking_spec(tmp_path: Path, log: Path, release: Path, n_after: int = 3) -> Path:
    """``hold`` (attempt 1 waits for ``release``) then ``n_after`` steps; each step appends
    ``start <step> <attempt>`` and ``done <step> <attempt>`` to ``log``."""
    lines = ["name: forked", "steps:",
             "  - id: hold",
             f"    run: \"echo start hold $DAGCRAFT_ATTEMPT >> {log}; [ $DAGCRAFT_ATTEMPT -gt 1 ] || "
             f"while [ ! -e {release} ]; do sleep 0.05; done; echo done hold $DAGCRAFT_ATTEMPT >> {log}\""]
    for i in range(n_after):
        lines += [f"  - id: s{i}", "    needs: [hold]",
                  f"    run: \"echo start s{i} $DAGCRAFT_ATTEMPT >> {log}; echo done s{i} $DAGCRAFT_ATTEMPT >> {log}\""]
    return write_spec(tmp_path, "\n".join(lines) + "\n")


def _started(log: Path, step: str) -> bool:
    return log.exists() and f"start {step} 1" in log.read_text()


def test_run_with_forked_workers_succeeds(tmp_path, store_url, start):
    log, release = tmp_path / "log", tmp_path / "release"
    spec = _blocking_spec(tmp_path, log, release)
    # stdin a pipe that stays open: a worker must read /dev/null instead, as an exec'd one does
    run = subprocess.Popen([sys.executable, "-m", "dagcraft.cli.main", "run", str(spec), "--store", store_url,
                            "--workers", "3", "--run-id", "fk-1", "--no-report"], env={**os.environ, **start},
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        wait_for(lambda: _started(log, "hold"), what="step hold to start")
        worker = _worker_pid(open_store(store_url), "fk-1", "hold")
        _assert_started_as(run, worker, start)
        assert os.readlink(f"/proc/{worker}/fd/0") == "/dev/null"
        release.touch()
        out, err = run.communicate(timeout=120)
    finally:
        release.touch()
        killpg(run)
    assert run.returncode == 0, out + err
    assert "Traceback" not in err
    st = run_status(open_store(store_url), "fk-1")
    assert st["status"] == "succeeded"
    assert Counter(line for line in log.read_text().splitlines() if line.startswith("done")) == \
        Counter(["done hold 1", "done s0 1", "done s1 1", "done s2 1"])


def test_kill_9_of_a_forked_worker_is_restarted_and_no_step_completes_twice(tmp_path, store_url):
    log, release = tmp_path / "log", tmp_path / "release"
    spec = _blocking_spec(tmp_path, log, release, n_after=4)
    run = spawn_cli("run", str(spec), "--store", store_url, "--workers", "2", "--lease-ttl", "2",
                    "--run-id", "fk-kill", "--no-report")
    store = open_store(store_url)
    try:
        wait_for(lambda: _started(log, "hold"), what="step hold to start")
        victim = _worker_pid(store, "fk-kill", "hold")
        _assert_started_as(run, victim, {})
        os.kill(victim, signal.SIGKILL)  # its step (own session) is orphaned, still blocked
        out, err = run.communicate(timeout=180)
        # the run finished while attempt 1 of hold was still blocked: it never completed
        done = [line for line in log.read_text().splitlines() if line.startswith("done")]
    finally:
        release.touch()  # ends the orphaned attempt 1; its late result is fenced, never counted
        killpg(run)
    assert run.returncode == 0, out + err
    assert sorted(done) == ["done hold 2", "done s0 1", "done s1 1", "done s2 1", "done s3 1"]
    st = run_status(store, "fk-kill")
    assert st["status"] == "succeeded"
    hold = load_state(store.get(layout.step_state("fk-kill", "hold"))[0])
    assert [h.status for h in hold.history] == ["lost", "succeeded"]


def test_ctrl_c_of_the_run_exits_130_and_resume_finishes(tmp_path, start):
    store_url = str(tmp_path / "store")
    log, release = tmp_path / "log", tmp_path / "release"
    spec = _blocking_spec(tmp_path, log, release)
    run = spawn_cli("run", str(spec), "--store", store_url, "--workers", "2", "--run-id", "fk-int",
                    "--no-report", env=start)
    try:
        wait_for(lambda: _started(log, "hold"), what="step hold to start")
        _assert_started_as(run, _worker_pid(open_store(store_url), "fk-int", "hold"), start)
        killpg(run, signal.SIGINT)  # Ctrl-C reaches the whole foreground process group
        out, err = run.communicate(timeout=60)
    finally:
        killpg(run)
    assert run.returncode == 130, out + err
    assert "resume with: dagcraft resume fk-int" in err
    assert "Traceback" not in err
    store = open_store(store_url)
    st = run_status(store, "fk-int")
    assert st["status"] == "running" and steps(st)["hold"]["status"] == "pending"  # handed back
    res = cli("resume", "fk-int", "--store", store_url, "--workers", "2", "--no-report", env=start)
    assert res.returncode == 0, res.stdout + res.stderr
    st = run_status(store, "fk-int")
    assert st["status"] == "succeeded" and steps(st)["hold"]["attempt"] == 2


def test_forked_worker_handle_has_popen_semantics():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: wait for the parent's byte, exit 3; on EOF (parent gone) exit 1
        os.close(w)
        os._exit(3 if os.read(r, 1) else 1)
    os.close(r)
    h = ForkedWorker(pid)
    try:
        assert h.pid == pid and h.poll() is None and h.returncode is None
        with pytest.raises(subprocess.TimeoutExpired):
            h.wait(0.05)
        os.write(w, b"x")
        assert h.wait(30) == 3 and h.returncode == 3 and h.poll() == 3
        h.kill()  # reaped: nothing is sent (its pid may belong to another process by now)
    finally:
        os.close(w)
        if h.returncode is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        # SIGTERM's default action first (an earlier test may have left this process a Python
        # handler, which the child inherits), then tell the parent it may send it
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
        os.close(r)
        os.write(w, b"r")
        while True:
            signal.pause()
    os.close(w)
    h = ForkedWorker(pid)
    try:
        assert os.read(r, 1) == b"r"
        h.terminate()
        assert h.wait(30) == -signal.SIGTERM  # as Popen: minus the signal that killed it
    finally:
        os.close(r)
        if h.returncode is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def test_fork_is_refused_with_another_thread_or_when_exec_is_asked(monkeypatch):
    monkeypatch.delenv("DAGCRAFT_WORKER_START", raising=False)
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        why = fork_unsafe_reason()
        assert why is not None and "threads running" in why
    finally:
        stop.set()
        t.join()
    monkeypatch.setenv("DAGCRAFT_WORKER_START", "exec")
    assert fork_unsafe_reason() == "$DAGCRAFT_WORKER_START=exec"


def test_ulids_of_two_children_forked_in_one_millisecond_differ():
    new_ulid(ts_ms=1_000)  # the parent's sequence, which each child would otherwise continue
    got = []
    for _ in range(2):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            os.write(w, new_ulid(ts_ms=1_000).encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            got.append(f.read())
        os.waitpid(pid, 0)
    assert len(got[0]) == 26 and got[0] != got[1]
