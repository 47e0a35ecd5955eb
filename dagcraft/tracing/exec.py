"""Traced exec: run one command, stream its output to logs, record it in a trace.

Guarantees:
- The child runs in a **new session / process group** (``start_new_session``); stop requests
  (timeout, ``cancel.set()``, a forwarded SIGINT/SIGTERM) signal the whole group, then SIGKILL
  the group after ``grace`` seconds if it has not exited.
- **Bounded memory** whatever the child prints: the calling thread copies 64 KiB chunks of both pipes
  to the log file (created at the stream's first byte: a silent stream leaves no file) and keeps only a ≤4 KiB preview (first 2000 + last 2000 bytes when longer) and
  a partial-line buffer capped at :data:`LINE_LIMIT` (1 MiB; longer lines are written through in
  pieces and reported to the adapter as unparsed).
- **Redaction before writing**: log lines go through the writer's redactor line by line (see
  :mod:`dagcraft.tracing.redact`); previews are built from redacted bytes; events are redacted by
  the writer. Logs keep the child's raw bytes otherwise (non-UTF-8 survives); previews decode
  with ``errors="replace"``. Terminal echo (``echo=True``) shows the raw stream live.
- Events: ``tool.call`` before the spawn; adapter events (``model.call``, ``tool.*``,
  ``x.agent.*``) while stdout streams; ``step.timeout`` / ``step.cancelled`` when a stop is
  requested; ``tool.result`` after the child and its output pipes are done.
- Signals: SIGINT/SIGTERM received by this process are forwarded to the child's group only when
  called from the main thread (handlers can only be installed there; previous handlers are
  restored afterwards). From worker threads use ``cancel``.
- When the command exits but processes it left in its group still hold its stdout/stderr open,
  they are SIGKILLed after :data:`STRAGGLER_WAIT` seconds so the step can finish.
- A log that cannot be written (ENOSPC, EIO, …) never blocks or kills the child: its pipe is
  still drained (and counted) to the end; the failure is returned in
  :attr:`ExecResult.log_error` and recorded as an ``error`` event before ``tool.result``. The
  call still returns normally: whether a truncated log fails the step is the caller's decision.

The result's fields and the ``tool.result`` payload are described in ``docs/traces.md``.
"""

from __future__ import annotations

import os
import selectors
import shlex
import signal as _signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import BaseModel

from dagcraft.errors import InvalidInput
from dagcraft.tracing.adapters import Adapter, get_adapter
from dagcraft.tracing.redact import LineRedactor, Redactor
from dagcraft.tracing.writer import TraceWriter

CHUNK = 64 * 1024
LINE_LIMIT = 1 << 20
PREVIEW_HEAD = 2000
PREVIEW_TAIL = 2000
STRAGGLER_WAIT = 1.0


class ExecResult(BaseModel):
    exit_code: int | None
    signal: int | None
    duration_ms: int
    timed_out: bool
    cancelled: bool
    stdout_bytes: int
    stderr_bytes: int
    stdout_preview: str
    stderr_preview: str
    session_id: str | None = None
    result_text: str | None = None
    redactions: int = 0
    usage: dict[str, Any] = {}
    error: str | None = None          # spawn failure (command not found, not executable)
    forwarded_signal: int | None = None
    #: set when stdout/stderr could not be fully logged (e.g. ``"stdout.log: [Errno 28] No space
    #: left on device"``; both logs joined by ``"; "``): the log is truncated although the child
    #: ran to its end (its output was still drained and counted). None when both logs are whole.
    log_error: str | None = None

    @property
    def success(self) -> bool:
        return self.exit_code == 0

    @property
    def shell_exit_code(self) -> int:
        """Exit code as a shell reports it: 128+signal for a signal death."""
        if self.exit_code is not None:
            return self.exit_code
        return 128 + (self.signal or 0)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"[Errno {exc.errno}] {exc.strerror}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _Pump:
    """Copies one pipe to a log file (redacted, line by line), keeps a bounded preview.

    Fed by :func:`traced_exec`'s own loop (``feed`` each chunk read, ``end`` at EOF): no thread
    per pipe. Whatever goes wrong on our side, the pipe is drained to its end so the child never
    blocks on a full pipe (nor dies of SIGPIPE): a log that cannot be opened or written (ENOSPC,
    EIO) stops only the logging, and the first such error is kept in :attr:`log_error`; any other
    error (a bug in a callback) is kept in :attr:`error`, and the rest of the output is only
    counted.
    """

    def __init__(self, pipe: Any, log: Path, redactor: Redactor, echo_to: Any | None,
                 on_line: Callable[[bytes], None] | None, on_overlong: Callable[[int, bytes], None] | None) -> None:
        self.pipe, self.log, self.echo_to = pipe, log, echo_to
        self.fd: int = pipe.fileno()
        self.lr = LineRedactor(redactor)
        self.on_line, self.on_overlong = on_line, on_overlong
        self.nbytes = 0
        self._buf = b""  # the partial line so far
        self._first = bytearray()
        self._last = bytearray()
        self._logged = 0
        self._overlong: tuple[int, bytes] | None = None   # (bytes so far, head) of a cut line
        self._f: BinaryIO | None = None
        self._opened = False  # the log file is created at the first byte: a silent stream makes none
        self.ended = False
        #: first error opening, writing or closing the log file (the log is incomplete)
        self.log_error: OSError | None = None
        #: any other error; output after it was drained and counted but not processed
        self.error: BaseException | None = None

    def _open_log(self) -> BinaryIO:
        return open(self.log, "wb")

    def _log_failed(self, exc: OSError) -> None:
        if self.log_error is None:
            self.log_error = exc
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass  # the buffered bytes that failed to write fail again: already recorded

    def _write(self, data: bytes) -> None:
        if not self._opened:
            # created only once there is something to log: a file made and deleted for every
            # silent stream costs an inode each time (slow on ext4 without a journal, where
            # the allocator skips recently freed inodes one by one)
            self._opened = True
            try:
                self._f = self._open_log()
            except OSError as exc:
                self._log_failed(exc)
        if self._f is not None:
            try:
                self._f.write(data)
            except OSError as exc:
                self._log_failed(exc)

    def _flush(self) -> None:
        if self._f is not None:
            try:
                self._f.flush()
            except OSError as exc:
                self._log_failed(exc)

    def _out(self, data: bytes) -> None:
        if not data:
            return
        self._write(data)
        self._logged += len(data)
        if len(self._first) < PREVIEW_HEAD + PREVIEW_TAIL:
            self._first += data[: PREVIEW_HEAD + PREVIEW_TAIL - len(self._first)]
        self._last += data[-PREVIEW_TAIL:]
        if len(self._last) > 4 * PREVIEW_TAIL:
            del self._last[:-PREVIEW_TAIL]

    def _line(self, line: bytes) -> None:
        self._out(self.lr.feed(line))
        if self._overlong is not None:
            n, head = self._overlong
            self._overlong = None
            if self.on_overlong:
                self.on_overlong(n + len(line), head)
        elif self.on_line:
            self.on_line(line.rstrip(b"\n").rstrip(b"\r"))

    def feed(self, chunk: bytes) -> None:
        """One chunk read from the pipe (never empty)."""
        self.nbytes += len(chunk)
        if self.error is not None:
            return  # drained and counted only
        try:
            self._copy(chunk)
        except Exception as exc:  # surfaced by traced_exec; never stops the draining
            self.error = exc

    def end(self) -> None:
        """The pipe reached EOF (or is abandoned): log the last line, close the log and the pipe."""
        if self.ended:
            return
        self.ended = True
        try:
            if self.error is None:
                if self._buf:
                    self._line(self._buf)  # final unterminated line
                elif self._overlong is not None and self.on_overlong:
                    self.on_overlong(*self._overlong)
                self._flush()
        except Exception as exc:
            self.error = exc
        finally:
            f, self._f = self._f, None
            if f is not None:
                try:
                    f.close()
                except OSError as exc:
                    self.log_error = self.log_error or exc
            try:
                self.pipe.close()
            except OSError:
                pass

    def _copy(self, chunk: bytes) -> None:
        if self.echo_to is not None:
            try:
                self.echo_to.write(chunk)
                self.echo_to.flush()
            except (OSError, ValueError):
                self.echo_to = None  # terminal went away; keep logging
        parts = (self._buf + chunk).split(b"\n")
        self._buf = parts.pop()
        for p in parts:
            self._line(p + b"\n")
        self._flush()  # live: `dagcraft logs --follow` and cancel checks read the file as it grows
        if len(self._buf) > LINE_LIMIT:
            # overlong line: write it through (redacted as a piece) and stop buffering
            if self._overlong is None:
                self._overlong = (0, self._buf[:1024])
            n, head = self._overlong
            self._overlong = (n + len(self._buf), head)
            self._out(self.lr.r.redact_bytes(self._buf))
            self._buf = b""

    def problem(self) -> str | None:
        """One line naming the log and what went wrong with it, or None."""
        exc = self.log_error or self.error
        return f"{self.log.name}: {_describe(exc)}" if exc is not None else None

    def preview(self) -> str:
        if self._logged <= PREVIEW_HEAD + PREVIEW_TAIL:
            data = bytes(self._first)
        else:
            omitted = self._logged - PREVIEW_HEAD - PREVIEW_TAIL
            data = (bytes(self._first[:PREVIEW_HEAD]) + f"\n[… {omitted} bytes omitted …]\n".encode()
                    + bytes(self._last[-PREVIEW_TAIL:]))
        return data.decode("utf-8", errors="replace")


class _Watch:
    """One loop that waits, in the calling thread, for whatever comes next: output on either
    pipe (fed to its pump), the child's exit (reaped the moment it happens: ``Popen.wait(timeout)``
    would poll with growing sleeps and add milliseconds to every short step), or a timeout.
    On Linux the exit is a pidfd in the same ``select``, so an exec starts no thread; elsewhere
    one thread blocks in ``wait()`` and the loop looks at it every 50 ms."""

    def __init__(self, proc: subprocess.Popen[bytes], pumps: tuple[_Pump, ...]) -> None:
        self.proc = proc
        self.pumps = {p.fd: p for p in pumps}
        self.exited_at: float | None = None  # monotonic time the child was reaped
        self._reaped = threading.Event()
        self._sel = selectors.DefaultSelector()
        for fd in self.pumps:
            self._sel.register(fd, selectors.EVENT_READ)
        try:
            self._pidfd: int | None = os.pidfd_open(proc.pid)
            self._sel.register(self._pidfd, selectors.EVENT_READ)
        except (AttributeError, OSError):  # not Linux ≥ 5.3
            self._pidfd = None
            threading.Thread(target=self._reap, daemon=True).start()

    def _reap(self) -> None:
        self.proc.wait()
        self._reaped.set()

    @property
    def exited(self) -> bool:
        return self.exited_at is not None

    @property
    def draining(self) -> bool:
        """Some pipe has not reached EOF yet."""
        return any(not p.ended for p in self.pumps.values())

    def step(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` s (None: until something happens) and handle what came."""
        if self._pidfd is None and not self.exited:
            timeout = 0.05 if timeout is None else min(timeout, 0.05)
        for key, _ in self._sel.select(timeout):
            fd = key.fd
            if fd == self._pidfd:
                self._sel.unregister(fd)
                self.proc.wait()
                self.exited_at = time.monotonic()
                continue
            pump = self.pumps[fd]
            chunk = os.read(fd, CHUNK)
            if chunk:
                pump.feed(chunk)
            else:
                self._sel.unregister(fd)
                pump.end()
        if self._pidfd is None and not self.exited and self._reaped.is_set():
            self.exited_at = time.monotonic()

    def close(self) -> None:
        """End every pump (EOF or abandoned) and release the selector and the pidfd."""
        for pump in self.pumps.values():
            pump.end()
        self._sel.close()
        fd, self._pidfd = self._pidfd, None
        if fd is not None:
            os.close(fd)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def traced_exec(argv: list[str], *, writer: TraceWriter, env: dict[str, str] | None = None,
                cwd: Path | None = None, stdout_log: Path, stderr_log: Path, timeout: float | None = None,
                adapter: str = "generic", echo: bool = False, cancel: threading.Event | None = None,
                grace: float = 5.0, on_usage: Callable[[dict[str, Any]], bool] | None = None) -> ExecResult:
    """Run ``argv`` (exec'd directly; wrap shell strings as ``["sh", "-c", s]``) under the trace.

    ``env`` is the child's complete environment (None inherits ours). Returns when the child has
    exited and its output is fully logged. Spawn failures return exit code 127 (not found) or
    126 (not executable) with ``error`` set, mirroring a shell. See the module docstring.

    ``on_usage`` is called (in the calling thread, as stdout is read) with the adapter's running usage after
    every stdout line that changed it; when it returns True the child's whole process group is
    SIGKILLed at once — no grace: what is over a limit must not go on spending — and the
    result is ``cancelled`` (a ``step.cancelled`` event with ``reason: "usage limit"``).
    """
    if not argv or not all(isinstance(a, str) for a in argv):
        raise InvalidInput(f"traced_exec needs a non-empty list of strings, got {argv!r}")
    if timeout is not None and timeout <= 0:
        raise InvalidInput(f"timeout must be positive, got {timeout!r}")
    ad: Adapter = get_adapter(adapter)
    redactor = writer.redactor if writer.redactor is not None else Redactor()
    before = redactor.count
    stdout_log, stderr_log = Path(stdout_log), Path(stderr_log)
    for p in (stdout_log, stderr_log):
        p.parent.mkdir(parents=True, exist_ok=True)
    command = shlex.join(argv)
    tool = os.path.basename(argv[0])
    writer.append("tool.call", {"tool": tool, "command": command, "argv": list(argv),
                                "cwd": str(cwd) if cwd else None, "adapter": adapter, "timeout_s": timeout})
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, cwd=cwd, start_new_session=True, close_fds=True)
    except OSError as exc:
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        msg = f"cannot execute {argv[0]!r}: {exc.strerror or exc}"
        log_problems = []
        try:  # stdout stays absent, as for any silent stream
            stderr_log.write_bytes(redactor.redact_text(msg).encode() + b"\n")
        except OSError as exc:
            log_problems.append(f"{stderr_log.name}: {_describe(exc)}")
        res = ExecResult(exit_code=code, signal=None, duration_ms=int((time.monotonic() - t0) * 1000),
                         timed_out=False, cancelled=False, stdout_bytes=0, stderr_bytes=0,
                         stdout_preview="", stderr_preview=redactor.redact_text(msg), error=msg,
                         redactions=redactor.count - before, log_error="; ".join(log_problems) or None)
        writer.append("error", {"tool": tool, "message": msg})
        for problem in log_problems:
            writer.append("error", {"tool": tool, "message": problem, "reason": "log write failed"})
        writer.append("tool.result", _result_payload(tool, command, argv, res, proc_pid=None))
        return res

    pgid = proc.pid

    def emit(events: list[tuple[str, dict[str, Any]]]) -> None:
        for kind, payload in events:
            try:
                writer.append(kind, payload)
            except Exception:  # a trace write problem must not stop the output pump
                pass

    stopped = threading.Event()  # on_usage asked for the stop

    def on_line(line: bytes) -> None:
        before_usage = dict(ad.usage)
        emit(ad.feed(line))
        if on_usage is not None and not stopped.is_set() and ad.usage != before_usage and on_usage(dict(ad.usage)):
            stopped.set()
            _killpg(pgid, _signal.SIGKILL)
            emit([("step.cancelled", {"pid": proc.pid, "grace_s": 0, "reason": "usage limit"})])

    out_pump = _Pump(proc.stdout, stdout_log, redactor, sys.stdout.buffer if echo else None,
                     on_line, lambda n, head: emit(ad.feed_overlong(n, head)))
    err_pump = _Pump(proc.stderr, stderr_log, redactor, sys.stderr.buffer if echo else None, None, None)

    # Forward SIGINT/SIGTERM to the child group (main thread only: handlers live there).
    forwarded: list[int] = []
    old_handlers: dict[_signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        def forward(signum: int, frame: Any) -> None:
            forwarded.append(signum)
            _killpg(pgid, signum)
        for s in (_signal.SIGINT, _signal.SIGTERM):
            try:
                old_handlers[s] = _signal.signal(s, forward)
            except (ValueError, OSError):
                pass

    watch = _Watch(proc, (out_pump, err_pump))
    timed_out = cancelled = False
    kill_at: float | None = None
    deadline = t0 + timeout if timeout is not None else None
    straggler_kill_at: float | None = None  # once the child exited with its pipes still open
    give_up_at: float | None = None
    try:
        while not watch.exited or watch.draining:
            now = time.monotonic()
            waits: list[float] = []
            if not watch.exited:
                if kill_at is None and not (timed_out or cancelled):
                    if deadline is not None and now >= deadline:
                        timed_out = True
                        writer.append("step.timeout", {"timeout_s": timeout, "pid": proc.pid, "grace_s": grace})
                    elif cancel is not None and cancel.is_set():
                        cancelled = True
                        writer.append("step.cancelled", {"pid": proc.pid, "grace_s": grace})
                    if timed_out or cancelled:
                        _killpg(pgid, _signal.SIGTERM)
                        kill_at = now + grace
                if forwarded and kill_at is None:
                    kill_at = now + grace
                if kill_at is not None and now >= kill_at:
                    _killpg(pgid, _signal.SIGKILL)
                    kill_at = float("inf")
                # wake up for the next thing that can happen; cancel and signals need polling
                if cancel is not None or old_handlers:
                    waits.append(0.05)
                if deadline is not None and not (timed_out or cancelled):
                    waits.append(max(0.0, deadline - now))
                if kill_at is not None and kill_at != float("inf"):
                    waits.append(max(0.0, kill_at - now))
            else:
                # the child is gone but processes it left in its group still hold our pipes:
                # end them so the step can finish; past that, stop reading what escaped the group
                assert watch.exited_at is not None
                if straggler_kill_at is None:
                    straggler_kill_at = watch.exited_at + STRAGGLER_WAIT
                if give_up_at is None and now >= straggler_kill_at:
                    _killpg(pgid, _signal.SIGKILL)
                    give_up_at = now + 5.0
                if give_up_at is not None and now >= give_up_at:
                    break
                waits.append(max(0.0, (give_up_at or straggler_kill_at) - now))
            watch.step(min(waits) if waits else None)
    finally:
        watch.close()
        for s, h in old_handlers.items():
            _signal.signal(s, h)
    cancelled = cancelled or stopped.is_set()
    duration_ms = int(((watch.exited_at or time.monotonic()) - t0) * 1000)
    emit(ad.finish())
    log_problems = [m for m in (out_pump.problem(), err_pump.problem()) if m]
    for problem in log_problems:  # the log is truncated: say so in the trace and the result
        writer.append("error", {"tool": tool, "message": problem, "reason": "log write failed"})
    rc = proc.returncode
    res = ExecResult(
        exit_code=rc if rc >= 0 else None, signal=-rc if rc < 0 else None, duration_ms=duration_ms,
        timed_out=timed_out, cancelled=cancelled, stdout_bytes=out_pump.nbytes, stderr_bytes=err_pump.nbytes,
        stdout_preview=out_pump.preview(), stderr_preview=err_pump.preview(),
        session_id=ad.session_id, result_text=redactor.redact_text(ad.result_text) if ad.result_text else None,
        usage=dict(ad.usage), forwarded_signal=forwarded[0] if forwarded else None,
        log_error="; ".join(log_problems) or None,
    )
    res.redactions = redactor.count - before
    writer.append("tool.result", _result_payload(tool, command, argv, res, proc_pid=proc.pid))
    return res


def _result_payload(tool: str, command: str, argv: list[str], res: ExecResult, proc_pid: int | None) -> dict[str, Any]:
    p: dict[str, Any] = {
        "tool": tool, "command": command, "argv": list(argv), "success": res.success,
        "exit_code": res.exit_code, "signal": res.signal,
        "signal_name": _signal.Signals(res.signal).name if res.signal else None,
        "duration_ms": res.duration_ms, "stdout_bytes": res.stdout_bytes, "stderr_bytes": res.stderr_bytes,
        "stdout_preview": res.stdout_preview, "stderr_preview": res.stderr_preview,
        "timed_out": res.timed_out, "cancelled": res.cancelled, "redactions": res.redactions, "pid": proc_pid,
    }
    if res.session_id:
        p["session_id"] = res.session_id
    if res.usage.get("model_calls"):
        p["usage"] = res.usage
    if res.error:
        p["error"] = res.error
    if res.forwarded_signal:
        p["forwarded_signal"] = res.forwarded_signal
    if res.log_error:
        p["log_error"] = res.log_error
    return p
