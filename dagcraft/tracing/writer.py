"""Append-only, hash-chained trace writer.

Guarantees:
- **Append only.** The file is opened ``O_APPEND``; an existing line is never rewritten. The one
  exception is a torn tail (bytes after the last ``\\n``, left by a writer killed mid-write):
  it is detected on open (:attr:`TraceWriter.torn_tail`, a :class:`TornTailWarning`), and cut off
  under the lock just before the next append, which then records a ``trace.repaired`` event
  carrying the dropped bytes' length and SHA-256 (and the torn line's number): just before the
  appended event, or just after it when the torn line was the file's only line (so that the
  trace still begins with the appended event, normally ``run.started``). A tail that lacks only
  its newline but parses as a complete event is kept and terminated instead of dropped.
- **Several processes / threads may append to one file.** Each append takes an exclusive
  ``fcntl.flock`` (plus a thread lock, because flock is per open file description), re-reads the
  last line under the lock to compute ``prev`` (SHA-256 of that line's bytes) and ``seq`` (its
  seq + 1), and writes the whole line with one ``os.write``. All appenders therefore form one
  chain with strictly increasing, gap-free ``seq`` and non-decreasing ``ts_ms`` (clamped to the
  previous line's time if the clock steps back). flock is advisory and local: do not share a
  trace file over NFS.
- **Durability.** With ``fsync=True`` (the default) every append is ``fsync``-ed before
  :meth:`append` returns, so an event that was returned survives a power loss. ``fsync=False``
  (bulk writers, benchmarks) leaves flushing to the OS; a crash can then lose recent lines but
  still never produces more than one torn line, which the next writer repairs.
- **Redaction.** The payload passes through the :class:`~dagcraft.tracing.redact.Redactor`
  before it is serialized.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagcraft.errors import InvalidInput
from dagcraft.tracing.event import VERSION, TraceEvent, encode_event, new_event_id, validate_kind
from dagcraft.tracing.redact import Redactor


class TornTailWarning(UserWarning):
    """A trace file ended in a partial line (a writer crashed mid-write)."""


@dataclass
class TornTail:
    line: int          # 1-based line number of the torn line
    offset: int        # byte offset where it starts
    size: int          # bytes of the partial line
    sha256: str        # digest of the dropped bytes (recorded in the trace.repaired event)


def _tail(fd: int, size: int) -> tuple[bytes | None, bytes]:
    """Return (last complete line without newline or None, bytes after the last newline)."""
    if size == 0:
        return None, b""
    block = 4096
    buf = b""
    pos = size
    while pos > 0:
        step = min(block, pos)
        pos -= step
        buf = os.pread(fd, step, pos) + buf
        # we need the last '\n' (end of last complete line) and the '\n' before it
        last_nl = buf.rfind(b"\n")
        if last_nl == -1:
            if pos == 0:
                return None, buf
            block *= 2
            continue
        torn = buf[last_nl + 1:]
        start = buf.rfind(b"\n", 0, last_nl)
        if start == -1 and pos > 0:
            block *= 2
            continue
        return buf[start + 1:last_nl], torn
    return None, buf


def _count_lines(fd: int, upto: int) -> int:
    n, pos = 0, 0
    while pos < upto:
        chunk = os.pread(fd, min(1 << 20, upto - pos), pos)
        if not chunk:
            break
        n += chunk.count(b"\n")
        pos += len(chunk)
    return n


class TraceWriter:
    """Appends events to one trace file. Context manager; see the module docstring."""

    def __init__(self, path: Path | str, run_id: str, *, redactor: Redactor | None = None,
                 fsync: bool = True) -> None:
        if not isinstance(run_id, str) or not run_id:
            raise InvalidInput("trace writer needs a non-empty run_id")
        self.path = Path(path)
        self.run_id = run_id
        # credential shapes are always redacted; pass a Redactor to add exact secret values
        self.redactor = redactor if redactor is not None else Redactor()
        self.fsync = fsync
        self._tlock = threading.Lock()
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise InvalidInput(f"cannot open trace file {self.path}: {exc.strerror}") from None
        # cache of the tail as we last left it, so a lone writer does not re-read every time
        self._known_size = -1
        self._last_line: bytes | None = None
        self._last_seq = 0
        self._last_ts = 0
        self.torn_tail: TornTail | None = None
        self.repaired_torn_tail = False
        other_run = None
        with self._locked():
            size = os.fstat(self._fd).st_size
            last, torn = _tail(self._fd, size)
            if torn and not self._parses(torn):
                self.torn_tail = TornTail(line=_count_lines(self._fd, size) + 1, offset=size - len(torn),
                                          size=len(torn), sha256=hashlib.sha256(torn).hexdigest())
                warnings.warn(f"{self.path}: torn tail at line {self.torn_tail.line} "
                              f"({len(torn)} bytes from a crashed writer); repaired on next append",
                              TornTailWarning, stacklevel=2)
            first = self._first_line(size)
            if first is not None:
                try:
                    rid = json.loads(first).get("run_id")
                except (ValueError, AttributeError):
                    rid = None
                if rid is not None and rid != run_id:
                    other_run = rid
        if other_run is not None:
            self.close()
            raise InvalidInput(f"{self.path} belongs to run {other_run!r}, not {run_id!r}")

    @staticmethod
    def _parses(data: bytes) -> bool:
        try:
            obj = json.loads(data)
        except ValueError:
            return False
        return isinstance(obj, dict) and "seq" in obj and "event_id" in obj

    def _first_line(self, size: int) -> bytes | None:
        data = os.pread(self._fd, min(size, 1 << 16), 0)
        nl = data.find(b"\n")
        return data[:nl] if nl > 0 else (data if data and self._parses(data) else None)

    class _Lock:
        def __init__(self, w: TraceWriter) -> None:
            self.w = w

        def __enter__(self) -> None:
            self.w._tlock.acquire()
            try:
                fcntl.flock(self.w._fd, fcntl.LOCK_EX)
            except BaseException:
                self.w._tlock.release()
                raise

        def __exit__(self, *exc: object) -> None:
            try:
                fcntl.flock(self.w._fd, fcntl.LOCK_UN)
            finally:
                self.w._tlock.release()

    def _locked(self) -> TraceWriter._Lock:
        return TraceWriter._Lock(self)

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)

    def _refresh_tail(self, size: int) -> list[bytes]:
        """Under the lock: load last line/seq/ts; repair a torn tail. Returns extra lines to write
        before the event (a newline terminating a complete-but-unterminated tail)."""
        pre: list[bytes] = []
        last, torn = _tail(self._fd, size)
        repaired: TornTail | None = None
        if torn:
            if self._parses(torn):
                # complete event missing only its newline (e.g. a foreign writer): keep it
                pre.append(b"\n")
                last = torn
            else:
                repaired = TornTail(line=_count_lines(self._fd, size - len(torn)) + 1,
                                    offset=size - len(torn), size=len(torn),
                                    sha256=hashlib.sha256(torn).hexdigest())
                os.ftruncate(self._fd, size - len(torn))
                self.repaired_torn_tail = True
                if self.torn_tail is None:
                    self.torn_tail = repaired
        self._last_line = last
        self._last_seq, self._last_ts = 0, 0
        if last is not None:
            try:
                obj = json.loads(last)
                self._last_seq = int(obj.get("seq", 0))
                self._last_ts = int(obj.get("ts_ms", 0))
            except (ValueError, TypeError, AttributeError):
                # unparseable last line (corrupted file): keep appending; verify will flag it
                self._last_seq = max(self._last_seq, _count_lines(self._fd, os.fstat(self._fd).st_size))
        self._pending_repair = repaired
        return pre

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)  # one write for a regular file unless the disk is full
            view = view[n:]

    def _build(self, kind: str, payload: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        prev = hashlib.sha256(self._last_line).hexdigest() if self._last_line is not None else None
        ts = max(int(time.time() * 1000), self._last_ts)
        d: dict[str, Any] = {"version": VERSION, "run_id": self.run_id, "event_id": new_event_id(), "kind": kind,
             "ts_ms": ts, "seq": self._last_seq + 1, "payload": payload, "prev": prev}
        line = encode_event(d)
        self._last_line, self._last_seq, self._last_ts = line, d["seq"], ts
        return d, line

    def _repaired_line(self, rep: TornTail) -> bytes:
        _, line = self._build("trace.repaired", {
            "line": rep.line, "dropped_bytes": rep.size, "dropped_sha256": rep.sha256,
            "reason": "torn tail from a writer that crashed mid-write"})
        return line

    def append(self, kind: str, payload: dict[str, Any] | None = None) -> TraceEvent:
        """Append one event; returns it as written (after redaction). Durable when fsync=True."""
        validate_kind(kind)
        if payload is None:
            payload = {}
        if not isinstance(payload, dict):
            raise InvalidInput(f"event payload must be an object, got {type(payload).__name__}")
        payload = self.redactor.redact(payload)
        if self._closed:
            raise InvalidInput(f"trace writer for {self.path} is closed")
        with self._locked():
            size = os.fstat(self._fd).st_size
            out: list[bytes] = []
            rep: TornTail | None = None
            if size != self._known_size:
                # someone else appended (or first append): re-read the tail under the lock
                out.extend(self._refresh_tail(size))
                rep = self._pending_repair
            if rep is not None and self._last_line is not None:
                out.append(self._repaired_line(rep) + b"\n")
                rep = None
            d, line = self._build(kind, payload)
            out.append(line + b"\n")
            if rep is not None:
                # the torn line was the file's only line: the repair is recorded right after
                # this event, so that a trace still begins with its own first event (run.started)
                out.append(self._repaired_line(rep) + b"\n")
            data = b"".join(out)
            self._write(data)
            if self.fsync:
                os.fsync(self._fd)
            self._known_size = os.fstat(self._fd).st_size
        return TraceEvent.model_construct(**d)

    def head(self) -> str | None:
        """SHA-256 of the file's last complete line as of now (taken under the lock, so it
        includes other processes' appends): the head a commit pins. None for an empty file."""
        if self._closed:
            raise InvalidInput(f"trace writer for {self.path} is closed")
        with self._locked():
            last, torn = _tail(self._fd, os.fstat(self._fd).st_size)
            if torn and self._parses(torn):
                last = torn  # complete event missing only its newline
        return hashlib.sha256(last).hexdigest() if last is not None else None
