from __future__ import annotations

import signal
import textwrap
import threading

import pytest
from _tracehelp import DATA, PY

from dagcraft.errors import InvalidInput
from dagcraft.tracing import Redactor, TraceWriter, read_trace, traced_exec, verify
from dagcraft.tracing.exec import PREVIEW_HEAD, PREVIEW_TAIL


@pytest.fixture
def tw(tmp_path):
    w = TraceWriter(tmp_path / "trace.jsonl", "run1", redactor=Redactor(["hunter2-secret"]))
    w.append("run.started")
    yield w
    w.close()


def run(tw, tmp_path, argv, **kw):
    return traced_exec(argv, writer=tw, stdout_log=tmp_path / "out.log", stderr_log=tmp_path / "err.log", **kw)


def test_exit_code_logs_and_events(tw, tmp_path):
    r = run(tw, tmp_path, [PY, "-c", "import sys; print('hello'); print('oops', file=sys.stderr); sys.exit(3)"])
    assert r.exit_code == 3 and r.signal is None and not r.success
    assert r.stdout_preview == "hello\n" and r.stderr_preview == "oops\n"
    assert r.stdout_bytes == 6 and r.stderr_bytes == 5
    assert (tmp_path / "out.log").read_bytes() == b"hello\n"
    evs = read_trace(tmp_path / "trace.jsonl")
    assert [e.kind for e in evs] == ["run.started", "tool.call", "tool.result"]
    p = evs[-1].payload
    for key in ("tool", "command", "argv", "success", "exit_code", "signal", "duration_ms", "stdout_bytes",
                "stderr_bytes", "stdout_preview", "stderr_preview"):
        assert key in p
    assert p["exit_code"] == 3 and p["success"] is False and p["argv"][0] == PY
    assert verify(tmp_path / "trace.jsonl", allow_open=True).ok


def test_signal_death_recorded(tw, tmp_path):
    r = run(tw, tmp_path, [PY, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    assert r.exit_code is None and r.signal == signal.SIGKILL and r.shell_exit_code == 137
    p = read_trace(tmp_path / "trace.jsonl")[-1].payload
    assert p["signal"] == 9 and p["signal_name"] == "SIGKILL" and p["exit_code"] is None


def test_timeout_terms_group_then_kills(tw, tmp_path):
    # the child ignores SIGTERM and has a grandchild in its group: both must die
    code = textwrap.dedent("""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print("started", flush=True)
        time.sleep(60)
    """)
    r = run(tw, tmp_path, [PY, "-c", code], timeout=1.0, grace=0.3)
    assert r.timed_out and r.signal == signal.SIGKILL
    assert r.duration_ms < 10_000
    kinds = [e.kind for e in read_trace(tmp_path / "trace.jsonl")]
    assert kinds[-2:] == ["step.timeout", "tool.result"]


def test_timeout_term_is_enough_for_polite_child(tw, tmp_path):
    r = run(tw, tmp_path, ["sleep", "30"], timeout=0.2, grace=5)
    assert r.timed_out and r.signal == signal.SIGTERM


def test_cancel_event(tw, tmp_path):
    import os

    cancel = threading.Event()
    result = {}
    fifo = tmp_path / "ready.fifo"
    os.mkfifo(fifo)
    child = f"open({str(fifo)!r}, 'w').write('up'); import time; time.sleep(60)"

    def worker():  # the orchestrator calls traced_exec from worker threads
        result["r"] = run(tw, tmp_path, [PY, "-c", child], cancel=cancel, grace=1)

    t = threading.Thread(target=worker)
    t.start()
    with open(fifo) as f:  # blocks until the child is up: an event, not a sleep
        assert f.read() == "up"
    cancel.set()
    t.join(20)
    assert not t.is_alive()
    r = result["r"]
    assert r.cancelled and not r.timed_out and r.signal == signal.SIGTERM
    assert "step.cancelled" in [e.kind for e in read_trace(tmp_path / "trace.jsonl")]


def test_non_utf8_output(tw, tmp_path):
    r = run(tw, tmp_path, [PY, "-c", "import sys; sys.stdout.buffer.write(b'ok \\xff\\xfe\\x80 end\\n')"])
    assert (tmp_path / "out.log").read_bytes() == b"ok \xff\xfe\x80 end\n"  # raw bytes in the log
    assert r.stdout_preview == "ok \ufffd\ufffd\ufffd end\n"
    assert read_trace(tmp_path / "trace.jsonl")[-1].payload["stdout_preview"] == r.stdout_preview


def test_big_output_bounded_preview(tw, tmp_path):
    n = 3_000_000
    r = run(tw, tmp_path, [PY, "-c", f"import sys; sys.stdout.write('a' * {n} + '\\n' + 'line\\n' * 1000 + 'END')"])
    assert r.exit_code == 0
    assert r.stdout_bytes == n + 1 + 5000 + 3
    assert (tmp_path / "out.log").stat().st_size == r.stdout_bytes
    assert len(r.stdout_preview.encode()) <= PREVIEW_HEAD + PREVIEW_TAIL + 100
    assert r.stdout_preview.startswith("aaaa") and r.stdout_preview.endswith("line\nEND")
    assert "bytes omitted" in r.stdout_preview


def test_logs_and_events_redacted(tw, tmp_path):
    code = ("print('token hunter2-secret here'); print('key AKIAIOSFODNN7EXAMPLE');"
            "print('-----BEGIN RSA PRIVATE KEY-----'); print('MIIEow'); print('-----END RSA PRIVATE KEY-----');"
            "print('after')")
    r = run(tw, tmp_path, [PY, "-c", code, "hunter2-secret"])
    log = (tmp_path / "out.log").read_text()
    assert "hunter2-secret" not in log and "AKIAIOSFODNN7EXAMPLE" not in log and "MIIEow" not in log
    assert log.count("[redacted]") == 3 and log.endswith("after\n")
    assert r.redactions >= 3
    raw = (tmp_path / "trace.jsonl").read_text()
    assert "hunter2-secret" not in raw and "AKIAIOSFODNN7EXAMPLE" not in raw
    assert read_trace(tmp_path / "trace.jsonl")[-1].payload["redactions"] >= 3


def test_claude_adapter_live(tw, tmp_path):
    r = run(tw, tmp_path, ["cat", str(DATA / "claude_stream.jsonl")], adapter="claude")
    assert r.exit_code == 0
    assert r.session_id == "5b1c2d3e-0000-4a1b-9c8d-111122223333"
    assert r.result_text == "Added --json to status; tests pass."
    evs = read_trace(tmp_path / "trace.jsonl")
    kinds = [e.kind for e in evs]
    assert kinds.count("model.call") == 3 and kinds.count("x.agent.unparsed") == 1
    assert kinds[-1] == "tool.result" and evs[-1].payload["usage"]["tokens_out"] == 153


def test_overlong_line_marked_unparsed(tw, tmp_path):
    code = "import sys; sys.stdout.write('{' + 'x' * 3_000_000 + '\\n' + '{\"type\":\"result\",\"result\":\"r\"}\\n')"
    r = run(tw, tmp_path, [PY, "-c", code], adapter="claude")
    assert r.result_text == "r"
    un = [e for e in read_trace(tmp_path / "trace.jsonl") if e.kind == "x.agent.unparsed"]
    assert len(un) == 1 and "exceeds the line bound" in un[0].payload["reason"]


def test_spawn_failures(tw, tmp_path):
    r = run(tw, tmp_path, ["/nonexistent/dagcraft-cmd"])
    assert r.exit_code == 127 and r.error
    kinds = [e.kind for e in read_trace(tmp_path / "trace.jsonl")]
    assert kinds[-3:] == ["tool.call", "error", "tool.result"]
    with pytest.raises(InvalidInput):
        run(tw, tmp_path, [])
    with pytest.raises(InvalidInput):
        run(tw, tmp_path, ["true"], adapter="nope")


def test_straggler_holding_pipe_does_not_hang(tw, tmp_path):
    # the command exits but leaves a background child holding stdout open
    r = run(tw, tmp_path, ["sh", "-c", "sleep 60 & echo done"])
    assert r.exit_code == 0 and r.stdout_preview == "done\n"
    assert r.duration_ms < 5000


# A child that prints ~2 MiB in lines (far more than a pipe buffer holds) and exits 0 only if
# every write reached the pipe: a pump that stopped draining would block it or break its pipe.
CHATTY = "import sys\nfor i in range(20000):\n    sys.stdout.write('%05d ' % i + 'x' * 100 + '\\n')\nsys.exit(0)"
CHATTY_BYTES = 20000 * 107


def test_log_write_error_is_reported_and_the_child_still_finishes(tw, tmp_path):
    import os

    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    from pathlib import Path

    r = traced_exec([PY, "-c", CHATTY], writer=tw, stdout_log=Path("/dev/full"), stderr_log=tmp_path / "err.log")
    assert r.exit_code == 0 and r.stdout_bytes == CHATTY_BYTES  # drained to the end
    assert r.log_error == "full: [Errno 28] No space left on device"
    evs = read_trace(tmp_path / "trace.jsonl")
    errors = [e for e in evs if e.kind == "error"]
    assert [e.payload["message"] for e in errors] == [r.log_error]
    assert evs[-1].kind == "tool.result" and evs[-1].payload["log_error"] == r.log_error
    assert verify(tmp_path / "trace.jsonl", allow_open=True).ok


def test_log_becoming_unwritable_mid_run(tw, tmp_path, monkeypatch):
    import errno
    import io
    import os

    from dagcraft.tracing import exec as exec_mod

    class FillsUp(io.RawIOBase):
        """A log file on a disk that is full after ``room`` bytes."""

        def __init__(self, path, room):
            self.f, self.room = open(path, "wb"), room

        def writable(self):
            return True

        def write(self, b):
            if self.room <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            n = self.f.write(bytes(b)[: self.room])
            self.room -= n
            return n

        def close(self):
            self.f.close()
            super().close()

    real_open = exec_mod._Pump._open_log

    def open_log(self):
        if self.log.name == "out.log":
            return io.BufferedWriter(FillsUp(self.log, 100_000))
        return real_open(self)

    monkeypatch.setattr(exec_mod._Pump, "_open_log", open_log)
    r = run(tw, tmp_path, [PY, "-c", CHATTY])
    assert r.exit_code == 0 and r.stdout_bytes == CHATTY_BYTES
    assert r.log_error == "out.log: [Errno 28] No space left on device"
    assert (tmp_path / "out.log").stat().st_size == 100_000  # the log is truncated, and says so
    assert r.stdout_preview.endswith("19999 " + "x" * 100 + "\n")  # the preview still saw the end
    kinds = [e.kind for e in read_trace(tmp_path / "trace.jsonl")]
    assert kinds[-2:] == ["error", "tool.result"]


def test_logs_written_fine_have_no_log_error(tw, tmp_path):
    r = run(tw, tmp_path, [PY, "-c", CHATTY])
    assert r.exit_code == 0 and r.log_error is None
    assert (tmp_path / "out.log").stat().st_size == CHATTY_BYTES
    assert "log_error" not in read_trace(tmp_path / "trace.jsonl")[-1].payload


def test_a_silent_stream_leaves_no_log_file(tw, tmp_path):
    """A log file is created at its stream's first byte: a step that prints nothing costs no
    file (each one made and deleted per attempt is an inode allocated and freed)."""
    r = run(tw, tmp_path, [PY, "-c", "import sys; print('only err', file=sys.stderr)"])
    assert r.exit_code == 0 and r.stdout_bytes == 0 and r.log_error is None
    assert not (tmp_path / "out.log").exists()
    assert (tmp_path / "err.log").read_bytes() == b"only err\n"
    r = run(tw, tmp_path, ["true"])
    assert r.success and not (tmp_path / "out.log").exists()


def test_an_exec_starts_no_thread(tw, tmp_path, thread_starts):
    """Both pipes and the exit are watched by the calling thread (pidfd + select): a thread
    per pipe cost ~0.15 ms of CPU and up to ms of latency per step."""
    r = run(tw, tmp_path, [PY, "-c", "import sys; print('o' * 100000); print('e', file=sys.stderr)"])
    assert r.exit_code == 0 and r.stdout_bytes == 100001 and r.stderr_bytes == 2
    assert thread_starts == []


def test_without_pidfd_the_exit_is_still_seen(tw, tmp_path, monkeypatch):
    """Where pidfd_open is missing (not Linux ≥ 5.3), one thread waits for the exit instead."""
    from dagcraft.tracing import exec as exec_mod

    def no_pidfd(pid):
        raise OSError("no pidfd here")

    monkeypatch.setattr(exec_mod.os, "pidfd_open", no_pidfd)
    r = run(tw, tmp_path, [PY, "-c", "import sys; print('hi'); sys.exit(4)"])
    assert r.exit_code == 4 and r.stdout_preview == "hi\n"
    r = run(tw, tmp_path, [PY, "-c", "import time; time.sleep(30)"], timeout=0.3, grace=0.2)
    assert r.timed_out and r.signal in (signal.SIGTERM, signal.SIGKILL)
