"""Records that cross process boundaries: the submitted run, run control, step state.

Each is JSON in the store. ``RunRecord`` is written once (If-None-Match) and never changed;
``Control`` and ``StepState`` change only by compare-and-swap on their etag, so two workers can
never both move the same record from the same version.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from enum import Enum
from typing import Any, TypeVar

import pydantic_core
from pydantic import BaseModel, Field, ValidationError

from dagcraft.errors import CorruptRecord
from dagcraft.primitives.lease import LeaseRecord


class _Name(str, Enum):
    """A status that is also its string: compares, hashes, prints and serializes as its value,
    so ``"pending" in OPEN`` and JSON records need no conversion."""

    __hash__ = str.__hash__

    def __str__(self) -> str:
        return str(self._value_)  # not .value, a descriptor lookup per call (40,000 in a status)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class StepStatus(_Name):
    """Where a step is in its lifecycle. Only ``transitions.py`` moves a step between them."""

    PENDING = "pending"  # waiting for its needs, or ready
    RETRYING = "retrying"  # a failed attempt; eligible again once the store clock passes not_before
    RUNNING = "running"  # claimed: attempt n holds the step's lease
    EXPANDED = "expanded"  # a foreach parent whose children run in its place
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # failed for good
    SKIPPED = "skipped"
    CANCELLED = "cancelled"
    ROLLING_BACK = "rolling_back"  # compensation claimed: its attempt holds the step's lease
    ROLLED_BACK = "rolled_back"
    #: an approval gate waits for ``dagcraft approve|reject`` (or its timeout)
    WAITING_APPROVAL = "waiting_approval"


TERMINAL: frozenset[StepStatus] = frozenset({StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.SKIPPED,
                                             StepStatus.CANCELLED, StepStatus.ROLLED_BACK})
#: waiting for a claim (the scheduler looks only at these)
OPEN: frozenset[StepStatus] = frozenset({StepStatus.PENDING, StepStatus.RETRYING})
#: an attempt holds the step's lease (the supervisor looks only at these)
ACTIVE: frozenset[StepStatus] = frozenset({StepStatus.RUNNING, StepStatus.ROLLING_BACK})
#: a journal entry announcing one of these makes readers fetch the whole state: its details
#: (children, retry time, a reset's cleared fields) drive scheduling decisions
DETAIL_STATUSES: frozenset[StepStatus] = frozenset({StepStatus.PENDING, StepStatus.RETRYING, StepStatus.EXPANDED,
                                                    StepStatus.WAITING_APPROVAL})
#: a step in one of these states counts as done for its dependents
DONE_OK: frozenset[StepStatus] = frozenset({StepStatus.SUCCEEDED, StepStatus.ROLLED_BACK, StepStatus.ROLLING_BACK})


class RunStatus(_Name):
    RUNNING = "running"
    CANCELLING = "cancelling"
    ROLLING_BACK = "rolling_back"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ROLLED_BACK = "rolled_back"
    #: a step stopped on a budget limit (exit 6); ``resume --budget`` raises it and continues
    BUDGET_EXCEEDED = "budget_exceeded"


RUN_FINISHED: frozenset[RunStatus] = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED,
                                                RunStatus.ROLLED_BACK, RunStatus.BUDGET_EXCEEDED})


class AttemptKind(_Name):
    RUN = "run"
    ROLLBACK = "rollback"
    APPROVAL = "approval"  # an approval gate's decision: no command, a trace of who decided


class AttemptStatus(_Name):
    """How one attempt ended (a step's history entry)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"  # the run was cancelled while it ran
    INTERRUPTED = "interrupted"  # its worker handed it back (Ctrl-C): not a failure
    LOST = "lost"  # its worker vanished; the supervisor took the lease over
    FENCED = "fenced"  # it finished, but its lease had been taken over: result discarded


class ReasonKind(_Name):
    """Why an attempt (or a step that never started) ended as it did: the one word every
    viewer (run summary, ``status``, the report, the UI) shows next to the reason's text.
    Exec outcomes are classified in one place, ``attempt.classify_exec``."""

    COMMAND_NOT_FOUND = "command_not_found"  # the executable is not on PATH (exit code 127)
    NOT_EXECUTABLE = "not_executable"  # found but not runnable (exit code 126)
    EXIT_CODE = "exit_code"  # the command exited non-zero
    KILLED = "killed_by_signal"  # the command died of a signal it did not ask for
    TIMED_OUT = "timed_out"  # the step's timeout killed it
    MISSING_OUTPUT = "missing_output"  # exited 0 without a declared output or artifact
    MISSING_SECRET = "missing_secret"  # a secret param its templates use is not on this worker
    BAD_INPUT = "bad_input"  # its templates, workdir or input artifacts could not be prepared
    CONDITION_ERROR = "condition_error"  # its `when` or `foreach` could not be evaluated
    LOG_ERROR = "log_error"  # its output could not be logged (disk full …)
    INTERNAL_ERROR = "internal_error"  # a dagcraft or store error while running it
    LOST_WORKER = "lost_worker"  # its worker vanished (lease expired)
    CANCELLED = "cancelled"  # the run was cancelled
    INTERRUPTED = "interrupted"  # its worker handed it back (Ctrl-C)
    CHECK_FAILED = "check_failed"  # its command exited 0, its `check:` did not
    REJECTED = "rejected"  # its approval gate was rejected (by a person, or by its timeout)
    MAX_ITERATIONS = "max_iterations"  # a loop reached max_iterations with `until` false (on_max: fail)
    BUDGET_EXCEEDED = "budget_exceeded"  # a run, agent or step budget limit was reached

    @property
    def words(self) -> str:
        """The kind in plain words (``command not found``)."""
        return str(self.value).replace("_", " ")


#: the last lines of a failed attempt's stderr kept in its committed AttemptInfo, so every
#: viewer shows them without reading the log: at most this many lines and bytes
STDERR_TAIL_LINES = 10
STDERR_TAIL_BYTES = 2048
#: the end of a `check:` run's stdout+stderr kept in its attempt's AttemptInfo (redacted), so
#: the next attempt renders ``attempt.previous.check.output`` on any worker, on any host
CHECK_OUTPUT_BYTES = 8192


class RunRecord(BaseModel):
    """The immutable submitted run: compiled spec snapshot (secret params redacted)."""

    run_id: str
    name: str
    spec_hash: str
    workflow: dict[str, Any]
    #: step ids in the compiled (topological) order; JSON objects do not keep order
    order: list[str] = Field(default_factory=list)
    params: dict[str, Any]
    secret_params: list[str] = Field(default_factory=list)
    spec_dir: str | None = None
    submitted_by: str
    submitted_at: float


class RunSeal(BaseModel):
    """What the transition that finished the run recorded about its steps: the digest of
    :func:`seal_material` (every step's committed result and trace heads), and optionally an
    Ed25519 signature of it (``tracing.seal``). Cleared when the run is reopened."""

    version: int = 1
    digest: str
    #: step records covered (a deleted record changes the digest too)
    steps: int
    #: id of the public key that signed it (None: unsigned)
    key_id: str | None = None
    signature: str | None = None
    #: SHA-256 hex of the status summary (``orchestrator.statusrows``) that the same transition
    #: wrote from the same step records; None when it could not be written. ``status`` reads a
    #: sealed run from the summary only when its bytes hash to this.
    summary: str | None = None


class Control(BaseModel):
    """Run-level status. ``generation`` bumps whenever the run is reopened (resume/retry)."""

    status: RunStatus = RunStatus.RUNNING
    reason: str | None = None
    updated_at: float = 0.0
    finished_at: float | None = None
    generation: int = 0
    #: set by the transition that finishes the run
    seal: RunSeal | None = None
    #: budget limits raised by ``resume --budget`` (key as in ``budget.parse_raise``: ``usd``,
    #: ``agent.coder.tokens``, ``step.implement.usd`` …); each overrides the spec's limit
    budget: dict[str, float] = Field(default_factory=dict)


class AttemptInfo(BaseModel):
    """One finished attempt, appended to the step's history by the transition that ended it."""

    attempt: int
    status: AttemptStatus
    kind: AttemptKind = AttemptKind.RUN
    worker: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    reason: str | None = None
    reason_kind: ReasonKind | None = None
    #: the last lines of its stderr (redacted; at most STDERR_TAIL_LINES / _BYTES) when it did
    #: not succeed; the whole log is at ``attempts/<name>/stderr.log``
    stderr_tail: str | None = None
    #: the exit code of its `check:` (None: no check ran) and the last CHECK_OUTPUT_BYTES of
    #: the check's stdout+stderr, redacted: what ``attempt.previous.check`` shows the next attempt
    check_exit_code: int | None = None
    check_output: str | None = None
    #: SHA-256 of the trace's last line, written by the CAS that commits the attempt: the
    #: trace is complete (``run.finished`` included) before that commit, so this pins its head
    trace_head: str | None = None

    @property
    def name(self) -> str:
        """The attempt's directory name: ``<n>``, ``rollback-<n>`` for a compensation,
        ``approval-<n>`` for a gate's decision."""
        return str(self.attempt) if self.kind == AttemptKind.RUN else f"{self.kind}-{self.attempt}"


class Decision(_Name):
    APPROVED = "approved"
    REJECTED = "rejected"


class ApprovalRecord(BaseModel):
    """A step's approval gate: opened by the scheduler (``await_approval``), decided once by
    ``decide_approval`` (a person, or the timeout's declared default, ``by="timeout"``)."""

    prompt: str = ""
    requested_at: float
    #: store-clock time after which ``on_timeout`` decides (None: waits forever)
    deadline: float | None = None
    on_timeout: Decision = Decision.REJECTED
    decision: Decision | None = None
    decided_by: str | None = None
    decided_at: float | None = None
    comment: str | None = None


class StepState(BaseModel):
    step_id: str
    status: StepStatus = StepStatus.PENDING
    attempt: int = 0  # run attempts started
    rollback_attempt: int = 0  # compensation attempts started
    #: the lease of the attempt that holds the step (running or rolling_back); kept after it
    #: ends (released) so that fencing tokens keep increasing
    lease: LeaseRecord | None = None
    failures: int = 0  # failed attempts, counted against the retry limit
    lost_attempts: int = 0  # attempts whose worker vanished
    not_before: float | None = None
    reason: str | None = None
    reason_kind: ReasonKind | None = None
    exit_code: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    outputs: dict[str, Any] = Field(default_factory=dict)
    artifacts: dict[str, dict[str, Any]] = Field(default_factory=dict)
    cached_from: str | None = None
    #: foreach children, in item order (set when a foreach parent expands)
    children: list[str] = Field(default_factory=list)
    #: a dynamically created step (foreach child) carries its own definition
    definition: dict[str, Any] | None = None
    parent: str | None = None
    #: "done" or "failed" once a compensation has run
    compensation: str | None = None
    history: list[AttemptInfo] = Field(default_factory=list)
    #: its approval gate, once opened (cleared by a reset)
    approval: ApprovalRecord | None = None
    #: bumps on every write so that two writes never produce the same bytes
    rev: int = 0

    @property
    def worker(self) -> str | None:
        """The holder of the step's current attempt (None when no attempt holds it)."""
        if self.status in ACTIVE and self.lease is not None and not self.lease.released:
            return self.lease.holder
        return None

    @property
    def lease_expires_at(self) -> float | None:
        return self.lease.expires_at if self.worker is not None and self.lease is not None else None

    def dump(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()


def seal_material(run_id: str, status: RunStatus, generation: int, states: Iterable[StepState]) -> dict[str, Any]:
    """What a run's seal covers: the run's final status, and per step record its status, a
    hash of its committed outputs and artifacts, and each attempt's status and pinned trace
    head. Computed identically when the run finishes and when ``trace verify`` checks it."""
    steps: list[list[Any]] = []
    # one small entry per state as it comes (``states`` may be read lazily, one at a time),
    # sorted after: the states themselves are never all held at once
    for st in states:
        steps.append(_seal_entry(st))
    steps.sort(key=lambda e: str(e[0]))
    return {"version": 1, "run_id": run_id, "status": str(status), "generation": generation, "steps": steps}


def _seal_entry(st: StepState) -> list[Any]:
    result = hashlib.sha256(json.dumps({"outputs": st.outputs, "artifacts": st.artifacts}, sort_keys=True,
                                       default=str).encode()).hexdigest()
    return [st.step_id, str(st.status), result, [[h.name, str(h.status), h.trace_head] for h in st.history]]


def seal_digest(run_id: str, status: RunStatus, generation: int, states: Iterable[StepState]) -> tuple[str, int]:
    """(``tracing.seal.digest`` of :func:`seal_material`, the number of steps it covers),
    computed as the states come: ``states`` must come in step-id order (as
    ``LocalView.exact_states`` yields them), and neither they nor their entries are held —
    the same digest as the material's, in memory that does not follow the run's size."""
    h = hashlib.sha256()
    # the canonical JSON of the material (sorted keys, no spaces, ASCII), written in pieces
    head = {"generation": generation, "run_id": run_id, "status": str(status)}
    h.update(json.dumps(head, sort_keys=True, separators=(",", ":"), ensure_ascii=True)[:-1].encode("ascii"))
    h.update(b',"steps":[')
    n = 0
    last: str | None = None
    for st in states:
        if last is not None and st.step_id <= last:
            raise ValueError("seal_digest: states must come in step-id order")
        last = st.step_id
        entry = json.dumps(_seal_entry(st), separators=(",", ":"), ensure_ascii=True)
        h.update((b"," if n else b"") + entry.encode("ascii"))
        n += 1
    h.update(b'],"version":1}')
    return h.hexdigest(), n


class RunTiming(BaseModel):
    """A run's duration, defined once for every viewer (run summary, ``status``, report, UI):
    from its first claim to its finish (to ``now`` while it is open), across every
    generation — a resumed run's duration covers its earlier sessions too. The time from
    submission to the first claim (worker start-up, waiting for a worker) is ``queued_s``."""

    submitted_at: float
    first_claim_at: float | None = None
    finished_at: float | None = None
    duration_s: float | None = None
    queued_s: float | None = None


def first_claim(st: StepState) -> float | None:
    """The earliest claim of one step: its running attempt's start and every ended attempt's
    (what :func:`run_timing` takes the minimum of over the run's steps)."""
    starts = [t for t in [st.started_at if st.status in ACTIVE else None, *(h.started_at for h in st.history)]
              if t is not None]
    return min(starts) if starts else None


def run_timing(record: RunRecord, control: Control, states: Iterable[StepState], now: float) -> RunTiming:
    """:class:`RunTiming` of a run from its records (no store reads)."""
    starts = [t for t in map(first_claim, states) if t is not None]
    return timing_of(record.submitted_at, control, min(starts) if starts else None, now)


def timing_of(submitted_at: float, control: Control, first: float | None, now: float) -> RunTiming:
    """:class:`RunTiming` from the run's submission time, its control and its first claim
    (:func:`first_claim` over its steps)."""
    end = control.finished_at if control.status in RUN_FINISHED and control.finished_at else now
    return RunTiming(submitted_at=submitted_at, first_claim_at=first,
                     finished_at=control.finished_at if control.status in RUN_FINISHED else None,
                     duration_s=None if first is None else max(0.0, end - first),
                     queued_s=None if first is None else max(0.0, first - submitted_at))


M = TypeVar("M", bound=BaseModel)


def load_record(model: type[M], data: bytes, key: str = "record", store: str | None = None) -> M:
    """Parse a stored record. A record that is not valid JSON or not a valid ``model`` raises
    :class:`~dagcraft.errors.CorruptRecord` naming ``key`` — never a raw ValidationError."""
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        errs = exc.errors()
        if not errs or errs[0]["type"] == "json_invalid":
            detail = "not valid JSON"
        else:
            loc = ".".join(str(p) for p in errs[0]["loc"]) or model.__name__
            detail = f"not a valid {model.__name__} ({loc}: {errs[0]['msg']})"
        raise CorruptRecord(key, detail[:300].replace("\n", " "), store) from None


def load_state(data: bytes, key: str = "step state", store: str | None = None) -> StepState:
    return load_record(StepState, data, key, store)


def load_control(data: bytes, key: str = "run control", store: str | None = None) -> Control:
    return load_record(Control, data, key, store)


def dump(model: BaseModel) -> bytes:
    return json.dumps(model.model_dump(mode="json"), sort_keys=True).encode()


def dump_run_record(record: RunRecord, workflow_json: bytes) -> bytes:
    """``run.json``: ``record`` with ``workflow_json`` (the compiled workflow, serialised by
    pydantic, in Rust) as its ``workflow``. The same data as :func:`dump` of the whole record
    (key order and spacing aside), in a tenth of the time at 10,000 steps: the workflow is never
    walked as untyped Python data."""
    rest = pydantic_core.to_json(record.model_dump(mode="json", exclude={"workflow"}))
    return b'{"workflow":' + workflow_json + (b"," + rest[1:] if len(rest) > 2 else b"}")


class CorruptNote(BaseModel):
    """``corrupt/<run>``: a worker found a record of the run unreadable and stopped serving it.
    Informational (``runs`` lists the run as ``corrupt``); removed by a resume that finds the
    run readable again."""

    run_id: str
    key: str
    detail: str
    reported_by: str
    reported_at: float
