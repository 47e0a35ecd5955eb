"""What ``dagcraft status`` shows of a run's steps, computed in one place: for a live run from
its step records, and for a finished run once, by the transition that seals it.

:class:`StatusRows` turns step states, given one at a time in any order, into ``status``'s
rows (one per step, in display order: compiled order, each foreach parent or loop followed
by its children). ``ops.run_status`` feeds it every record of a live run. The transition that
finishes a run (``transitions.set_control(finished=True)``) feeds it the very records it
seals, as it streams them for the seal's digest (:class:`SummaryWriter`), and writes the rows,
with what ``status`` shows of the run record, as one object, ``runs/<run>/status.json``
(:class:`StatusSummary`: a head line, then one row per line as ``status --json`` prints it),
before the CAS that seals the run; the seal records the SHA-256 of its bytes
(``RunSeal.summary``). ``status`` of a sealed run then reads two objects (control and the
summary), not one per step, and ``status --json`` prints the rows without parsing them.

Guarantees:
- A sealed run's ``status`` is the one its step records give: the same rows, built by the
  same code from the records the seal covers (that they are still those records is what
  ``trace verify`` checks). What depends on the reader — the command that
  prints a failed attempt's log (``more``, with the reader's store URL) and durations — is
  filled in when it is read, on both paths (:func:`finish_rows`); the run's status, reason
  and finish time always come from control as read.
- The summary is used only when its bytes hash to the seal's ``summary`` and it names the
  same run, generation, seal digest and number of records; otherwise (missing, overwritten by
  a finisher that lost the race, unreadable, or a run with agents, whose spend is read from
  the ledger) ``status`` reads every record as for a live run. What changes a sealed run's
  step records removes the summary first (resume, retry: ``ops.drop_summary``) or unseals
  control first (rollback), and reopening rewrites control without the seal: a stale summary
  is never read, even when such a command dies halfway.
- Writing it is best effort, one PUT: a store error leaves the seal without ``summary``,
  never a run unfinished. Its bytes depend only on the records (not on the writer, its clock or its store
  URL), so workers racing to finish a run write the same summary.
- The sealing worker holds where each step's encoded row is in an anonymous temp file (rows
  spill there as they are made; it is gone when closed, or when the worker dies) and the
  records of foreach parents and loops only, never every record or every row.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shlex
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, Protocol, TypeVar

from pydantic import BaseModel, Field

from dagcraft.errors import DagcraftError
from dagcraft.orchestrator import layout
from dagcraft.orchestrator.model import (
    TERMINAL,
    AttemptKind,
    AttemptStatus,
    StepState,
    StepStatus,
    first_claim,
)
from dagcraft.orchestrator.spill import Spill
from dagcraft.primitives.store import Store

if TYPE_CHECKING:
    from dagcraft.orchestrator.view import LocalView

SUMMARY_VERSION = 1
#: a row's failed attempt whose log ``more`` names, until :func:`finish_rows` replaces it
_LOG_ATTEMPT = "log_attempt"


class _Spanned(Protocol):
    """What a step's children contribute to its row (a StepState, or a :class:`_Kid`)."""

    @property
    def status(self) -> StepStatus: ...
    @property
    def started_at(self) -> float | None: ...
    @property
    def finished_at(self) -> float | None: ...
    @property
    def definition(self) -> dict[str, Any] | None: ...


class _Kid(NamedTuple):
    status: StepStatus
    started_at: float | None
    finished_at: float | None
    definition: dict[str, Any] | None


def logs_command(store: Store, run_id: str, step: str, attempt: int | str, stream: str = "stderr") -> str:
    """The exact command that prints an attempt's whole log (quoted for a POSIX shell)."""
    return " ".join(shlex.quote(str(a)) for a in ("dagcraft", "logs", f"{run_id}/{step}", "--attempt", attempt,
                                                   "--stream", stream, "--store", store.url))


def step_span(st: StepState, children: Sequence[_Spanned] = ()) -> tuple[float | None, float | None]:
    """(start, end) of a step as every viewer shows it: its current attempt's claim to its
    finish; a foreach parent's span is its children's (first claim to last finish)."""
    if st.children:
        starts = [c.started_at for c in children if c.started_at is not None]
        ends = [c.finished_at for c in children if c.finished_at is not None]
        done = bool(children) and len(ends) == len(children)
        return (min(starts) if starts else None), (max(ends) if done else None)
    return st.started_at, st.finished_at if st.status in TERMINAL else None


def loop_summary(st: StepState, kids: Sequence[_Spanned], loop: Mapping[str, Any]) -> dict[str, Any]:
    """A loop step's progress as every viewer shows it: ``iterations`` started so far, its
    ``max_iterations`` and ``on_max``, and ``until`` — true/false as evaluated after the last
    iteration, None while it runs (or when it failed before evaluating it)."""
    started = max((int((k.definition or {}).get("iteration") or 0) for k in kids), default=0)
    return {"iterations": started, "max_iterations": loop.get("max_iterations"), "on_max": loop.get("on_max"),
            "until": st.outputs.get("until") if st.status in TERMINAL else None}


def display_order(order: Sequence[str], known: Iterable[str],
                  children: Callable[[str], Sequence[str]]) -> Iterator[tuple[str, str | None]]:
    """(step id, the parent it is listed under, None at the top level) in compiled ``order``,
    then the ``known`` ids not in it, sorted; each step followed by its ``children``."""
    seen: set[str] = set()
    in_order = set(order)
    for sid in [*order, *sorted(set(known) - in_order)]:
        if sid in seen:
            continue
        seen.add(sid)
        yield sid, None
        for child in children(sid):
            if child not in seen:
                seen.add(child)
                yield child, sid


def ordered_states(order: Sequence[str], states: Mapping[str, StepState]) -> list[tuple[StepState, str | None]]:
    """(state, foreach parent) in compiled order, each parent followed by its children; a step
    without a record reads as pending."""
    out: list[tuple[StepState, str | None]] = []
    for sid, lister in display_order(order, states, lambda s: states[s].children if s in states else []):
        st = states.get(sid) or StepState(step_id=sid)  # built only for a step without a record
        out.append((st, lister if lister is not None else st.parent))
    return out


R = TypeVar("R")


class StatusRows(Generic[R]):
    """``status``'s per-step rows of one run, from its step records given one at a time (in any
    order, each at most once). ``loop_of(step id)``: the compiled loop definition of a loop
    step (``max_iterations``, ``on_max``), else None. Rows are kept as ``pack`` makes them
    (the dict itself by default; the sealing worker keeps their JSON) and returned so by
    :meth:`rows`; a row of a step with children is built by :meth:`rows`, from the children's
    status and times (all that is kept of each record)."""

    def __init__(self, loop_of: Callable[[str], Mapping[str, Any] | None],
                 pack: Callable[[dict[str, Any]], R], unpack: Callable[[R], dict[str, Any]]) -> None:
        self._loop_of = loop_of
        self._pack, self._unpack = pack, unpack
        self._rows: dict[str, tuple[R, str | None, str]] = {}  # step -> (packed row, its parent field, status)
        self._parents: dict[str, StepState] = {}  # steps with children: their row needs the children's
        self._kids: dict[str, _Kid] = {}
        self.first_claim: float | None = None  # of the run: the earliest over its steps
        self.records = 0

    def add(self, st: StepState) -> None:
        self.records += 1
        claim = first_claim(st)
        if claim is not None and (self.first_claim is None or claim < self.first_claim):
            self.first_claim = claim
        if st.parent:  # only a child's row of its parent reads it (its parent may come later)
            iteration = (st.definition or {}).get("iteration")
            self._kids[st.step_id] = _Kid(st.status, st.started_at, st.finished_at,
                                          None if iteration is None else {"iteration": iteration})
        if st.children:
            self._parents[st.step_id] = st
        else:
            self._rows[st.step_id] = (self._pack(self._row(st, st.parent, [])), st.parent, str(st.status))

    def rows(self, order: Sequence[str], shown: list[tuple[str, str, str | None]] | None = None) -> list[R]:
        """Every row in display order (``order``: the compiled order); a step of ``order``
        without a record reads as pending. ``shown`` gets (step, status, parent) of each row."""
        known = [*self._rows, *self._parents]
        out: list[R] = []
        for sid, lister in display_order(order, known,
                                         lambda s: self._parents[s].children if s in self._parents else []):
            if sid in self._parents:
                st = self._parents[sid]
                kids = [self._kids[c] for c in st.children if c in self._kids]
                parent, status = lister if lister is not None else st.parent, str(st.status)
                out.append(self._pack(self._row(st, parent, kids)))
            elif (got := self._rows.get(sid)) is None:
                parent, status = lister, str(StepStatus.PENDING)
                out.append(self._pack(self._row(StepState(step_id=sid), lister, [])))
            elif lister is not None and lister != got[1]:  # listed under a parent it does not name
                parent, status = lister, got[2]
                row = self._unpack(got[0])
                row["parent"] = lister
                out.append(self._pack(row))
            else:
                parent, status = got[1], got[2]
                out.append(got[0])
            if shown is not None:
                shown.append((sid, status, parent))
        return out

    def _row(self, st: StepState, parent: str | None, kids: Sequence[_Kid]) -> dict[str, Any]:
        start, end = step_span(st, kids)
        last = st.history[-1] if st.history else None
        failed_attempt = (last is not None and last.status is not AttemptStatus.SUCCEEDED
                          and last.kind is not AttemptKind.APPROVAL  # a decision has no logs
                          and st.status in (StepStatus.FAILED, StepStatus.RETRYING, StepStatus.CANCELLED))
        item: dict[str, Any] = {
            "step": st.step_id, "status": str(st.status), "attempt": st.attempt,
            # the worker of the current attempt, else of the last one
            "worker": st.worker or (last.worker if last else None),
            "started_at": start, "finished_at": end, "duration_s": None,  # both: finish_rows
            "reason": st.reason, "reason_kind": None if st.reason_kind is None else str(st.reason_kind),
            "exit_code": st.exit_code, "outputs": st.outputs, "artifacts": sorted(st.artifacts),
            "cached_from": st.cached_from, "parent": parent, "children": st.children,
            "stderr_tail": last.stderr_tail if failed_attempt and last is not None else None,
            "more": None, _LOG_ATTEMPT: last.name if failed_attempt and last is not None else None,
            "approval": None if st.approval is None else st.approval.model_dump(mode="json"),
        }
        if st.children:
            cc: dict[str, int] = {}
            for k in kids:
                cc[str(k.status)] = cc.get(str(k.status), 0) + 1
            item["children_counts"] = cc
        item["iteration"] = (st.definition or {}).get("iteration")  # a loop body step's iteration
        loop = self._loop_of(st.step_id)
        if loop:
            item["loop"] = loop_summary(st, kids, loop)
        return item


def live_rows(loop_of: Callable[[str], Mapping[str, Any] | None]) -> StatusRows[dict[str, Any]]:
    """Rows kept as dicts (a live ``status``)."""
    return StatusRows(loop_of, _same, _same)


def _same(row: dict[str, Any]) -> dict[str, Any]:
    return row


def finish_rows(rows: list[dict[str, Any]], store: Store | None, run_id: str, now: float) -> list[dict[str, Any]]:
    """Fill in what depends on the reader, in place, in each row not finished yet: its
    ``duration_s`` (to ``now`` while it runs) and ``more``, the command that prints its failed
    attempt's whole log (``store``: the reader's; None only for rows :func:`settled` says need none)."""
    for row in rows:
        if _LOG_ATTEMPT not in row:
            continue  # finished already (a summary's settled row)
        start, end = row["started_at"], row["finished_at"]
        row["duration_s"] = None if start is None else round(max(0.0, (end or now) - start), 3)
        name = row.pop(_LOG_ATTEMPT)
        assert name is None or store is not None
        row["more"] = None if name is None or store is None else logs_command(store, run_id, row["step"], name)
    return rows


def settled(row: Mapping[str, Any]) -> bool:
    """Whether :func:`finish_rows` fills in ``row`` the same for every reader at any time: it
    names no failed attempt's log and has a duration that no longer grows."""
    return row.get(_LOG_ATTEMPT) is None and (row["started_at"] is None or row["finished_at"] is not None)


#: how ``status --json`` prints one row (``ops.dumps_status``): one encoder, not one per row
encode_row = json.JSONEncoder(sort_keys=True, default=str).encode


def step_counts(shown: Iterable[tuple[str, str, str | None]]) -> dict[str, int]:
    """Submitted steps by status, from (step, status, parent) of each row (foreach children
    are counted in their parent's ``children_counts``)."""
    counts: dict[str, int] = {}
    for _, status, parent in shown:
        if not parent:
            counts[status] = counts.get(status, 0) + 1
    return counts


def waiting_approval(shown: Iterable[tuple[str, str, str | None]]) -> list[str]:
    """The steps whose approval gate waits for a decision."""
    return [sid for sid, status, _ in shown if status == StepStatus.WAITING_APPROVAL]


# -- the summary a sealed run is read from ----------------------------------------------------------
class StatusSummary(BaseModel):
    """The first line of ``runs/<run>/status.json``: what ``status`` shows of a sealed run but
    its control and its rows — the run record's fields it shows (the record never changes) and
    the rows' counts. Each following line is one row, in display order, as ``status --json``
    prints it (:data:`encode_row`); a row that is not :func:`settled` is written before
    :func:`finish_rows`, still carrying ``log_attempt``, and finished by the reader."""

    version: int = SUMMARY_VERSION
    run_id: str
    generation: int
    #: the seal's digest and the number of step records it covers, as the same transition sealed them
    digest: str
    records: int
    name: str
    spec_hash: str
    params: dict[str, Any]
    submitted_at: float
    submitted_by: str
    first_claim_at: float | None = None
    rows: int
    counts: dict[str, int] = Field(default_factory=dict)
    waiting_approval: list[str] = Field(default_factory=list)


def _pack_settled(row: dict[str, Any]) -> str:
    if settled(row):
        finish_rows([row], None, "", 0.0)  # needs neither a reader nor a clock
    return encode_row(row)


def _decode(text: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(text)
    return out


class SummaryWriter:
    """Builds a run's :class:`StatusSummary` from the records the seal streams past it
    (:meth:`feed`), then writes it (:meth:`write`)."""

    def __init__(self, view: LocalView) -> None:
        self.view = view
        steps = view.steps

        def loop_of(sid: str) -> Mapping[str, Any] | None:
            loop = steps.attr(sid, "loop") if sid in steps else None
            return None if loop is None else {"max_iterations": loop.max_iterations, "on_max": loop.on_max}

        # rows spill to an anonymous temp file as they are made (the worker keeps where each
        # one is): held as strings, a 10,000-step run's rows added ~7 MiB to the sealing peak
        self._spill = Spill("dagcraft-rows-")

        def pack(row: dict[str, Any]) -> int | bytes:
            return self._spill.add(_pack_settled(row).encode())

        self.rows: StatusRows[int | bytes] = StatusRows(loop_of, pack, lambda at: _decode(self._read(at)))

    def _read(self, at: int | bytes) -> str:
        return self._spill.get(at).decode()

    def close(self) -> None:
        self._spill.close()

    def feed(self, states: Iterable[StepState]) -> Iterator[StepState]:
        """``states``, unchanged, each added to the rows as it passes."""
        for st in states:
            self.rows.add(st)
            yield st

    def write(self, digest: str, records: int) -> str | None:
        """PUT the summary of the records fed (``digest``/``records``: the seal's over them);
        its SHA-256 hex, or None when it was not written (a run with agents: ``status`` reads
        its spend from the ledger, and so its records; a store error)."""
        try:
            return self._write(digest, records)
        finally:
            self.close()

    def _write(self, digest: str, records: int) -> str | None:
        view = self.view
        if view.wf.agents or records != self.rows.records:
            return None
        rec = view.record
        shown: list[tuple[str, str, str | None]] = []
        lines = self.rows.rows(rec.order or list(view.steps), shown)
        head = StatusSummary(run_id=view.run_id, generation=view.control.generation, digest=digest, records=records,
                             name=rec.name, spec_hash=rec.spec_hash, params=rec.params,
                             submitted_at=rec.submitted_at, submitted_by=rec.submitted_by,
                             first_claim_at=self.rows.first_claim, rows=len(lines), counts=step_counts(shown),
                             waiting_approval=waiting_approval(shown))
        h = hashlib.sha256()
        # streamed through a temp file, line by line: joined and encoded in memory, a
        # 10,000-step run's summary added ~12 MiB to the sealing worker's peak
        with tempfile.TemporaryDirectory(prefix="dagcraft-summary-") as tmp:
            path = Path(tmp) / "status.json"
            with open(path, "wb") as f:
                for i, line in enumerate(itertools.chain([head.model_dump_json()], map(self._read, lines))):
                    part = (line if i == 0 else "\n" + line).encode()
                    f.write(part)
                    h.update(part)
            try:  # one try (the store's own retries): an outage is the control write's to ride out
                view.store.put_file(layout.status_summary(view.run_id), path, consume=True)
            except (DagcraftError, OSError):
                return None
        return h.hexdigest()


def read_summary(store: Store, run_id: str, generation: int, digest: str, records: int, sha256: str,
                 now: float) -> tuple[StatusSummary, list[str]] | None:
    """The sealed run's summary and its rows as ``status --json`` prints them (those that
    were not settled finished for this reader at ``now``), when it is the one its seal names
    (see the guarantees above); else None (read the records instead)."""
    got = store.get(layout.status_summary(run_id))
    if got is None or hashlib.sha256(got[0]).hexdigest() != sha256:
        return None
    try:
        first, *lines = got[0].decode("utf-8").split("\n")
        s = StatusSummary.model_validate_json(first)
        if (s.version, s.run_id, s.generation, s.digest, s.records, s.rows) != (
                SUMMARY_VERSION, run_id, generation, digest, records, len(lines)):
            return None
        for i, line in enumerate(lines):
            if f'"{_LOG_ATTEMPT}": ' in line:  # not settled (or an output named so: finishing it is a no-op)
                lines[i] = encode_row(finish_rows([_decode(line)], store, run_id, now)[0])
    except ValueError:  # not UTF-8, not JSON, not a summary
        return None
    return s, lines
