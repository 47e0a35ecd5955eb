"""Reading and verifying trace files.

:func:`read_trace` is tolerant: it skips a torn last line (a crash mid-write) and reads
traceframe files (no ``prev``). A malformed line anywhere else is an InvalidInput naming it.

:func:`verify` checks, and names the first bad line:
- every line is a JSON event with ``version`` 1 and the required fields;
- one ``run_id``; unique ``event_id``; strictly increasing ``seq`` (gap-free once chained);
- ``run.started`` first and ``run.finished`` last (the latter unless ``allow_open``);
- non-decreasing ``ts_ms``;
- the hash chain: the first line has ``prev: null`` and each later line's ``prev`` is the
  SHA-256 of the previous line's exact bytes. An edited line breaks the *next* line's ``prev``,
  a removed, inserted or reordered line breaks ``prev`` where it happened; the report names the
  line where the chain first fails. An edit of the very last line cannot be seen by a chain; pin
  :attr:`VerifyReport.head` (the last line's hash) elsewhere (the orchestrator keeps it in the
  step state) and pass it as ``expect_head`` to close that gap.
- every ``kind`` is a known kind or ``x.<name>`` (the writer refuses anything else).
A torn tail is reported as such (``torn_tail`` = its line number), not as tampering. Files with no
``prev`` anywhere are "unchained": consistent, but without tamper evidence. The outcome is one
:class:`TraceStatus` (``VerifyReport.status``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import BinaryIO

from pydantic import BaseModel

from dagcraft.errors import InvalidInput, NotFound
from dagcraft.tracing.event import VERSION, TraceEvent, parse_line, validate_kind


def _open(path: Path | str) -> BinaryIO:
    p = Path(path)
    try:
        return p.open("rb")
    except FileNotFoundError:
        raise NotFound(f"trace file not found: {p}") from None
    except IsADirectoryError:
        raise InvalidInput(f"{p} is a directory, not a trace file") from None
    except OSError as exc:
        raise InvalidInput(f"cannot read trace file {p}: {exc.strerror}") from None


def iter_lines(path: Path | str) -> Iterator[tuple[int, bytes, bool]]:
    """Yield (line_no, bytes without newline, terminated) for each line, streaming."""
    with _open(path) as f:
        for no, raw in enumerate(f, 1):
            if raw.endswith(b"\n"):
                yield no, raw[:-1], True
            else:
                yield no, raw, False


def iter_trace(path: Path | str) -> Iterator[TraceEvent]:
    """Stream events; see :func:`read_trace` for the tolerance rules."""
    for no, line, terminated in iter_lines(path):
        if not line.strip():
            continue
        try:
            ev, _ = parse_line(line)
        except ValueError as exc:
            if not terminated:
                return  # torn tail of a crashed writer: everything before it is still good
            raise InvalidInput(f"{path}:{no}: not a valid trace event ({exc})") from None
        yield ev


def read_trace(path: Path | str) -> list[TraceEvent]:
    """All events of a trace file (tolerant of a torn tail and of traceframe files)."""
    return list(iter_trace(path))


class TraceStatus(str, Enum):
    """The outcome of verifying a trace (or a run's seal). Exactly one per report: the first
    problem found decides it. ``ok`` and ``unchained`` pass; every other status fails."""

    __hash__ = str.__hash__

    OK = "ok"
    #: a traceframe file with no hash chain: consistent, but not tamper-evident
    UNCHAINED = "unchained"
    #: no ``run.finished`` yet (a trace still being written, a run not finished)
    OPEN = "open"
    #: a partial last line from a writer that crashed mid-write (not tampering)
    TORN_TAIL = "torn tail"
    #: not a well-formed trace: a line that is not an event, a missing field, an unknown kind,
    #: another version, no ``run.started`` first, an empty file
    INVALID = "invalid"
    #: the hash chain (or seq, order, ids) is broken: a line was edited, removed or inserted
    TAMPERED = "tampered"
    #: the chain is intact but its last line is not the head the step's commit pinned: the
    #: trace was rewritten and re-chained, its last line edited, or lines cut or added at the end
    HEAD_MISMATCH = "head mismatch"
    #: a committed attempt's trace is not in the store
    MISSING = "missing"
    #: the run's seal does not match its steps' committed heads (a step state was rewritten)
    SEAL_MISMATCH = "seal mismatch"
    #: a finished run carries no seal
    UNSEALED = "unsealed"
    #: a public key was given but the run's seal carries no signature
    UNSIGNED = "unsigned"
    #: the seal's signature does not verify with the given public key
    BAD_SIGNATURE = "bad signature"

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


PASSING: frozenset[TraceStatus] = frozenset({TraceStatus.OK, TraceStatus.UNCHAINED})


class VerifyReport(BaseModel):
    path: str
    ok: bool
    status: TraceStatus = TraceStatus.OK
    events: int = 0
    run_id: str | None = None
    chained: bool = False
    #: first line that carries ``prev`` (1 when fully chained; None when unchained)
    chained_from: int | None = None
    torn_tail: int | None = None
    first_bad_line: int | None = None
    problems: list[str] = []
    #: SHA-256 of the last complete line (pin it elsewhere to detect an edit of the last line)
    head: str | None = None
    #: the head it was checked against (None: nothing pinned it)
    expected_head: str | None = None
    finished: bool = False

    def fail(self, status: TraceStatus, problem: str, line: int | None = None) -> None:
        """Record a problem; the first one decides the status."""
        if not self.problems:
            self.status = status
            if line is not None:
                self.first_bad_line = line
        self.problems.append(f"line {line}: {problem}" if line is not None else problem)
        self.ok = False

    def message(self) -> str:
        if self.problems:
            return f"{self.path}: {self.status}: {self.problems[0]}"
        if self.torn_tail is not None:
            return (f"{self.path}: torn tail at line {self.torn_tail} (a writer crashed mid-write; "
                    f"{self.events} complete events before it verify; repaired on next append)")
        if not self.chained:
            label = "valid (unchained)"
        elif self.chained_from and self.chained_from > 1:
            label = f"valid (chained from line {self.chained_from})"
        else:
            label = "valid" + (", head pinned" if self.expected_head else "")
        return f"{self.path}: {label} ({self.events} events)"


class RunVerifyReport(BaseModel):
    """``trace verify RUN[/STEP[/ATTEMPT]]``: every committed attempt's trace against the head
    its commit pinned, and the run's seal against its steps' committed heads. ``status`` is
    the first failing trace's status, else the seal's."""

    target: str
    ok: bool
    status: TraceStatus = TraceStatus.OK
    run_status: str | None = None
    #: the seal's own verdict (ok, open, unsealed, seal mismatch, unsigned, bad signature)
    seal_status: TraceStatus = TraceStatus.OK
    seal_problem: str | None = None
    digest: str | None = None
    signed: bool = False
    key_id: str | None = None
    #: whether a signature was checked against a public key (False: none was given)
    signature_checked: bool = False
    traces: list[VerifyReport] = []

    def seal_message(self) -> str:
        run = self.target.split("/", 1)[0]
        if self.seal_problem:
            return f"{run}: {self.seal_status}: {self.seal_problem}"
        if self.seal_status == TraceStatus.OPEN:
            return f"{run}: {self.run_status}, not sealed yet (accepted with --allow-open)"
        signed = (f"signature by key {self.key_id} verified" if self.signature_checked
                  else f"signed by key {self.key_id} (not checked: pass --public-key)" if self.signed
                  else "unsigned")
        return f"{run}: sealed ({self.run_status}; digest {(self.digest or '')[:16]}…, {signed})"


def verify(path: Path | str, allow_open: bool = False, *, expect_head: str | None = None,
           require_chain: bool = False) -> VerifyReport:
    """Check a trace file; see the module docstring. Never raises for a bad file's content.

    ``expect_head``: the hash its last line must have (what the step's commit pinned).
    ``require_chain``: every line must be chained (a dagcraft attempt trace always is; an
    unchained prefix could be rewritten freely)."""
    rep = VerifyReport(path=str(path), ok=False, expected_head=expect_head)

    def bad(no: int, msg: str, status: TraceStatus = TraceStatus.TAMPERED) -> None:
        rep.fail(status, msg, no)

    ids: set[str] = set()
    prev_line: bytes | None = None
    prev_seq: int | None = None
    prev_ts: int | None = None
    last_kind: str | None = None
    last_no = 0
    for no, line, terminated in iter_lines(path):
        if rep.problems:
            break  # the first bad line is what matters; later lines are judged relative to it
        try:
            ev, has_prev = parse_line(line)
        except ValueError as exc:
            if not terminated:
                rep.torn_tail = no
                break
            bad(no, f"not a valid trace event ({exc})", TraceStatus.INVALID)
            break
        # a complete JSON line missing only its newline is kept (the writer terminates it too)
        rep.events += 1
        last_no = no
        if ev.version != VERSION:
            bad(no, f"unsupported version {ev.version!r}", TraceStatus.INVALID)
        try:
            validate_kind(ev.kind)
        except InvalidInput as exc:
            # the writer refuses unknown kinds, so dagcraft never wrote this line
            bad(no, str(exc), TraceStatus.INVALID)
        if rep.run_id is None:
            rep.run_id = ev.run_id
        elif ev.run_id != rep.run_id:
            bad(no, f"run_id {ev.run_id!r} differs from {rep.run_id!r}")
        if ev.event_id in ids:
            bad(no, f"duplicate event_id {ev.event_id!r}")
        ids.add(ev.event_id)
        if prev_seq is not None:
            if ev.seq <= prev_seq:
                bad(no, f"seq {ev.seq} not greater than previous {prev_seq} (reordered or inserted line)")
            elif rep.chained and has_prev and ev.seq != prev_seq + 1:
                bad(no, f"seq jumps from {prev_seq} to {ev.seq} (line(s) removed)")
        if prev_ts is not None and ev.ts_ms < prev_ts:
            bad(no, f"ts_ms {ev.ts_ms} earlier than previous {prev_ts}")
        if has_prev:
            if not rep.chained:
                rep.chained, rep.chained_from = True, no
            expected = hashlib.sha256(prev_line).hexdigest() if prev_line is not None else None
            if ev.prev != expected:
                if expected is None:
                    bad(no, "first line has a prev hash (lines before it were removed)")
                elif prev_line is not None and prev_line.endswith(b"\r") \
                        and ev.prev == hashlib.sha256(prev_line[:-1]).hexdigest():
                    # hashes cover the exact bytes: a converted file cannot verify, but say why
                    bad(no, f"line {no - 1} ends with CRLF: the file's line endings were converted "
                            f"(a text-mode copy, git autocrlf?); traces are written with LF only")
                else:
                    bad(no, f"prev hash does not match line {no - 1}: line {no - 1} was edited, or "
                            f"a line was removed, inserted or reordered here")
        elif rep.chained:
            bad(no, "line has no prev hash inside a chained trace (edited or inserted)")
        if no == 1 and ev.kind != "run.started":  # after the chain: a removed first line is tampering
            bad(no, f"first event is {ev.kind!r}, expected 'run.started'", TraceStatus.INVALID)
        prev_line, prev_seq, prev_ts, last_kind = line, ev.seq, ev.ts_ms, ev.kind
    if prev_line is not None:
        rep.head = hashlib.sha256(prev_line).hexdigest()
    rep.finished = last_kind == "run.finished"
    if not rep.problems:
        if rep.events == 0 and rep.torn_tail is None:
            bad(1, "empty trace (no events)", TraceStatus.INVALID)
        elif require_chain and rep.chained_from != 1:
            bad(rep.chained_from or 1, "not hash-chained from its first line (lines before the chain "
                                       "could have been rewritten)")
        elif rep.torn_tail is not None:
            rep.status = TraceStatus.TORN_TAIL
        elif expect_head is not None and rep.head != expect_head:
            bad(last_no or 1, "last line does not hash to the head its commit pinned (the trace was "
                              "rewritten and re-chained, or its end edited, cut or extended)",
                TraceStatus.HEAD_MISMATCH)
        elif not allow_open and not rep.finished and rep.events:
            bad(last_no, f"last event is {last_kind!r}, expected 'run.finished' (use --allow-open "
                         f"for a trace still being written)", TraceStatus.OPEN)
        elif not rep.chained:
            rep.status = TraceStatus.UNCHAINED
    rep.ok = not rep.problems and rep.torn_tail is None
    return rep
