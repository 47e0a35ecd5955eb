"""The executor: runs one claimed attempt — of a step's command or of its compensation.

Both kinds run through the same code: a heartbeat thread renewing the step's lease, the
traced exec, hand-back on SIGINT, workdir checks, the commit, the trace upload.

Guarantees:
- Every write of the attempt is a holder write of ``transitions.Hold``: once the lease was
  taken over (the attempt was declared lost, the run reset or cancelled), the heartbeat and
  the commit are refused (Fenced) — a fenced attempt never commits. The refusal is recorded
  in the attempt's trace as ``step.fenced``, and a heartbeat that finds the lease taken over
  kills the child's whole process group.
- Store outages are ridden out: the heartbeat, artifact uploads and the commit keep retrying
  with backoff for up to ``WorkerConfig.outage_s`` (the lease cannot be taken over while the
  store is down, and the supervisor waits for holders to renew after an outage); the child
  keeps running meanwhile.
- Only the commit decides the step's status. Logs and the trace are uploaded after it; an
  upload that fails goes to the worker's :class:`Outbox` and is retried until it lands
  (``trace verify RUN`` reports the trace missing until then). The trace is closed
  (``run.finished``) before the commit, and the commit pins its final head (the hash of its
  last line) in the step's history; a refused commit's trace goes on past that point.
- The attempt holds its worker slot (``holds_slot``) until its outcome is committed and its
  worktree and semaphore slots are given back, not through the uploads: the worker may start
  its next attempt while this one's trace is still uploading.
- Attempt numbers are unique per step and kind, so nothing else writes ``attempts/<n>/``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dagcraft.errors import Conflict, DagcraftError, Fenced, InvalidInput, StoreUnavailable
from dagcraft.orchestrator import budget, context, layout, transitions, worktree
from dagcraft.orchestrator.model import (
    CHECK_OUTPUT_BYTES,
    STDERR_TAIL_BYTES,
    STDERR_TAIL_LINES,
    AttemptInfo,
    AttemptKind,
    AttemptStatus,
    ReasonKind,
    StepState,
    StepStatus,
)
from dagcraft.orchestrator.outbox import Outbox
from dagcraft.orchestrator.retry import backoff_delay, should_retry
from dagcraft.orchestrator.scheduler import WorkItem
from dagcraft.orchestrator.scratch import attempt_dir, release_attempt_dir
from dagcraft.orchestrator.timers import Timers
from dagcraft.orchestrator.view import missing_secrets, secret_env_name
from dagcraft.primitives import artifacts
from dagcraft.primitives.keys import validate_relpath
from dagcraft.primitives.local import LocalStore
from dagcraft.primitives.persist import Persistence
from dagcraft.primitives.store import Store
from dagcraft.tracing import ExecResult, Redactor, TraceWriter, traced_exec
from dagcraft.tracing.seal import Signer
from dagcraft.workflows import (
    RenderContext,
    RenderedCommand,
    instance_key,
    render_check,
    render_command,
    render_rollback,
)
from dagcraft.workflows.template import MAX_OUTPUT, RenderCancelled, RenderTimedOut

GLOB_CHARS = set("*?[")
log = logging.getLogger(__name__)


#: how often a running attempt's grown logs are uploaded (``dagcraft logs --follow``): a local
#: write is free; on S3 each costs a PUT, so at most one per log per 3 s while it grows
LOG_SNAPSHOT_S_LOCAL = 0.5
LOG_SNAPSHOT_S_REMOTE = 3.0


def log_snapshot_interval(store: Store) -> float:
    return LOG_SNAPSHOT_S_LOCAL if isinstance(store, LocalStore) else LOG_SNAPSHOT_S_REMOTE


@dataclass
class WorkerConfig:
    store: Store
    store_url: str
    worker_id: str
    lease_ttl: float = 30.0
    tmp_root: Path = field(default_factory=lambda: Path(os.environ.get("TMPDIR", "/tmp")) / "dagcraft")
    echo: bool = False
    grace: float = 5.0
    #: how long an attempt rides out a store outage before giving up its step
    outage_s: float = 300.0
    #: keep each attempt's scratch directory (``--keep-workdirs``); else it is removed after
    #: the attempt, as it may hold the step's outputs and whatever the step wrote there
    keep_workdirs: bool = False
    #: signs the seals of the runs this worker finishes as their supervisor (None: unsigned)
    signer: Signer | None = None
    #: starts an attempt's heartbeat and log threads once it has run long enough to need them
    timers: Timers = field(default_factory=Timers, repr=False, compare=False)

    @property
    def heartbeat_s(self) -> float:
        return self.lease_ttl / 3.0

    @property
    def persist(self) -> Persistence:
        return Persistence(limit_s=self.outage_s, max_wait_s=min(2.0, self.heartbeat_s))


@dataclass(frozen=True)
class Outcome:
    """How an attempt's work ended, before the commit decides what it means for the step."""

    status: AttemptStatus
    reason: str | None = None
    kind: ReasonKind | None = None
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    #: a failure the step's retry policy may retry (False: retrying cannot help)
    retryable: bool = False
    outputs: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    cached_from: str | None = None
    logs: tuple[Path, ...] = ()
    #: the step's `check:` run, when one ran: its exit code and the end of its output
    check_exit_code: int | None = None
    check_output: str | None = None


def _nul_free(name: str, value: Any) -> None:
    if isinstance(value, str) and "\x00" in value:
        raise InvalidInput(f"output {name!r} contains a NUL byte")
    if isinstance(value, list):
        for v in value:
            _nul_free(name, v)
    elif isinstance(value, dict):
        for k, v in value.items():
            _nul_free(name, k)
            _nul_free(name, v)


def classify_exec(res: ExecResult, argv0: str, timeout_s: float | None) -> tuple[ReasonKind, str] | None:
    """Why a finished command failed, as (kind, text in words), or None when it succeeded.
    The one place exec outcomes are classified; a shell's conventional 127/126 count as
    command not found / not executable too (the shell's own message is in the stderr tail)."""
    if res.timed_out:
        return ReasonKind.TIMED_OUT, f"timed out after {timeout_s:g}s" if timeout_s else "timed out"
    if res.exit_code == 0:
        if res.log_error:
            return ReasonKind.LOG_ERROR, f"could not write the log: {res.log_error}"
        return None
    if res.signal is not None:
        try:
            name = f" ({signal.Signals(res.signal).name})"
        except ValueError:
            name = ""
        return ReasonKind.KILLED, f"killed by signal {res.signal}{name}"
    if res.exit_code == 127:
        if res.error:
            return ReasonKind.COMMAND_NOT_FOUND, f"command not found: {argv0!r} (exit code 127)"
        return ReasonKind.COMMAND_NOT_FOUND, "exit code 127: command not found (see its stderr)"
    if res.exit_code == 126:
        if res.error:
            return ReasonKind.NOT_EXECUTABLE, f"{res.error} (exit code 126)"
        return ReasonKind.NOT_EXECUTABLE, "exit code 126: command not executable (see its stderr)"
    return ReasonKind.EXIT_CODE, f"exit code {res.exit_code}"


def stderr_tail(path: Path, lines: int = STDERR_TAIL_LINES, limit: int = STDERR_TAIL_BYTES) -> str | None:
    """The last ``lines`` lines of a log, at most ``limit`` bytes (cut at a line start when it
    can be), or None for a missing or blank log."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            data = f.read(limit)
    except OSError:
        return None
    if size > limit and b"\n" in data[:-1]:
        data = data[data.index(b"\n") + 1:]  # drop the cut first line
    text = data.decode("utf-8", "replace").rstrip()
    kept = text.splitlines()[-lines:]
    while len(kept) > 1 and len("\n".join(kept).encode()) > limit:
        kept.pop(0)  # replacement characters can make the decoded text longer than the bytes
    tail = "\n".join(kept)
    return tail if tail.strip() else None


def check_output(logs: tuple[Path, ...], redact: Callable[[str], str], limit: int = CHECK_OUTPUT_BYTES) -> str:
    """The last ``limit`` bytes of a check's stdout followed by its stderr, redacted before it
    is cut (a secret straddling the cut is never left half-shown)."""
    window = 8 * limit  # read bound: only the end matters
    parts: list[str] = []
    for path in logs:
        try:
            with path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - window))
                data = f.read(window)
        except OSError:
            continue
        if data:
            parts.append(data.decode("utf-8", "replace"))
    text = redact("".join(p if p.endswith("\n") else p + "\n" for p in parts))
    raw = text.encode()
    if len(raw) > limit:
        text = raw[-limit:].decode("utf-8", "ignore")
    return text


def parse_outputs(path: Path) -> dict[str, Any]:
    """``$DAGCRAFT_OUTPUT``: a JSON object, or ``key=value`` lines (values parsed as JSON when
    they are JSON, e.g. ``count=3`` or ``items=["a","b"]``, else kept as strings).

    Raises InvalidInput naming the output when a name or value holds a NUL byte: the step
    fails for good (a rerun would write the same), rather than as a retryable internal error;
    likewise when the file is larger than ``MAX_OUTPUT`` bytes (outputs live in the step state,
    which every status read and scheduler poll loads)."""
    if not path.exists():
        return {}
    size = path.stat().st_size
    if size > MAX_OUTPUT:
        raise InvalidInput(f"outputs are {size} bytes, more than the limit of {MAX_OUTPUT} "
                           "(write big data as an artifact)")
    text = path.read_text("utf-8", "replace").strip()
    if not text:
        return {}
    out: dict[str, Any] = {}
    if text.startswith("{"):
        try:
            data = json.loads(text)
            if isinstance(data, dict):
                out = data
        except json.JSONDecodeError:
            pass
    if not out:
        for line in text.splitlines():
            if not line.strip() or line.lstrip().startswith("#") or "=" not in line:
                continue
            key, _, value = line.partition("=")
            try:
                out[key.strip()] = json.loads(value)
            except json.JSONDecodeError:
                out[key.strip()] = value
    for name, value in out.items():
        if "\x00" in name:
            raise InvalidInput(f"output name {name.replace(chr(0), '<NUL>')!r} contains a NUL byte")
        _nul_free(name, value)
    return out


def collect_artifacts(workdir: Path, patterns: list[str]) -> tuple[list[tuple[str, Path]], list[str]]:
    """Files in ``workdir`` matching the declared globs, as (name, path), and the literal names
    that are missing. A match that is (or lies under) a symlink resolving outside the workdir
    raises InvalidInput naming the artifact: it is never uploaded, and the step fails for good
    rather than succeeding without it. A symlink to a file inside the workdir is collected."""
    root = workdir.resolve()
    found: dict[str, Path] = {}
    missing: list[str] = []
    for pattern in patterns:
        validate_relpath(pattern.replace("*", "x").replace("?", "x"), "artifact pattern")
        literal = not (GLOB_CHARS & set(pattern))
        candidates = [workdir / pattern] if literal else sorted(workdir.glob(pattern))
        matches = []
        for p in candidates:
            if not (p.is_symlink() or p.exists()):
                continue
            real = p.resolve()
            if root not in real.parents:
                where = "outside the workdir" if real.exists() else "nowhere (dangling)"
                raise InvalidInput(f"declared artifact {p.relative_to(workdir).as_posix()!r} is a symlink to "
                                   f"{where}; it is never uploaded")
            if real.is_file():
                matches.append(p)
        if not matches and literal:
            missing.append(pattern)
        for p in matches:
            found[p.relative_to(workdir).as_posix()] = p
    return sorted(found.items()), missing


OnChange = Callable[[StepState, str, "str | None"], None]


class Attempt:
    """One attempt of one step (its command, or its compensation), run on a worker thread."""

    def __init__(self, cfg: WorkerConfig, work: WorkItem, *, on_change: OnChange, outbox: Outbox,
                 on_release: Callable[[], None] | None = None) -> None:
        self.cfg = cfg
        self.w = work
        self.hold = work.hold
        self.kind = work.kind
        self.store = cfg.store
        self.on_change = on_change
        self.outbox = outbox
        #: called once the attempt no longer needs its slot (see holds_slot)
        self.on_release = on_release
        #: True until the attempt's outcome is committed (or refused): the uploads and the
        #: clean-up that follow decide nothing, so the worker may start its next attempt meanwhile
        self.holds_slot = True
        self.n = self.hold.attempt
        self.started_at = self.store.now()
        self.cancel = threading.Event()  # set: kill the child (lease lost, run cancelled, hand back)
        self.cancel_reason: AttemptStatus | None = None
        self._stop_hb = threading.Event()
        #: the heartbeat and log threads, once started (under _keepers_lock, with _stop_hb)
        self._keepers: list[threading.Thread] = []
        self._keepers_lock = threading.Lock()
        self._t0 = time.monotonic()  # when run() began (set again there): the keepers' periods count from it
        self.name = str(self.n) if self.kind is AttemptKind.RUN else f"rollback-{self.n}"
        self.dir = cfg.tmp_root / work.run_id / work.step.id / self.name
        self.trace: TraceWriter | None = None
        #: the attempt's git worktree (``worktree:`` steps), removed in _finish
        self.worktree: worktree.Worktree | None = None
        self._log_sizes: dict[str, int] = {}
        # budgets (agent run attempts only): this attempt's live spend, the rest of the run's
        # spend as last read from the ledger, the limits raised by `resume --budget`, and the
        # limit that stopped the agent (None: none did)
        self._metered = self.kind is AttemptKind.RUN and work.step.agent is not None
        self._spend = budget.Spend(step=work.step.id, attempt=self.n, agent=work.step.agent, worker=cfg.worker_id)
        self._spend_written: budget.Spend | None = None
        self._others = budget.Totals()
        self._raised: dict[str, float] = {}
        self._limited = False
        self._budget_hit: str | None = None
        self._spend_lock = threading.Lock()

    @property
    def label(self) -> str:
        what = "attempt" if self.kind is AttemptKind.RUN else "compensation"
        return f"{self.w.step.id} {what} {self.n}"

    # -- control from the worker -------------------------------------------------------------
    def request_cancel(self, reason: AttemptStatus) -> None:
        """CANCELLED (run cancel), INTERRUPTED (the worker hands the step back) or LOST."""
        if self.cancel_reason is None:
            self.cancel_reason = reason
        self.cancel.set()

    # -- heartbeat ---------------------------------------------------------------------------
    def _waits(self, period: float) -> Iterator[None]:
        """Yields ``period`` s after the start of the attempt (whenever this keeper thread
        started), then ``period`` s after the caller's last turn, until the attempt ends."""
        due = self._t0 + period
        while not self._stop_hb.wait(max(0.0, due - time.monotonic())):
            yield
            due = time.monotonic() + period

    def _start_keepers(self) -> None:
        """Start the heartbeat and log-streaming threads (by :class:`Timers`, once the first of
        their periods is due; never after the attempt ended)."""
        with self._keepers_lock:
            if self._stop_hb.is_set():
                return
            for target, what in ((self._heartbeat, "heartbeat"), (self._stream_logs, "logs")):
                t = threading.Thread(target=target, name=f"{what}-{self.w.step.id}", daemon=True)
                t.start()
                self._keepers.append(t)

    def _stop_keepers(self) -> None:
        with self._keepers_lock:
            self._stop_hb.set()
            keepers = list(self._keepers)
        for t in keepers:
            t.join()

    def _heartbeat(self) -> None:
        for _ in self._waits(self.cfg.heartbeat_s):
            try:
                transitions.heartbeat(self.hold, self.cfg.lease_ttl, stop=self._stop_hb)
            except Fenced as exc:
                self._lose(f"lease taken over: {exc}")
                return
            except StoreUnavailable:
                if self._stop_hb.is_set():
                    return  # the attempt ended while the store was down: the commit takes over
                self._lose(f"store unreachable for {self.cfg.outage_s:g}s")
                return
            for i, sem in enumerate(self.w.semaphores):
                try:
                    self.w.semaphore_leases[i] = sem.renew(self.w.semaphore_leases[i])
                except DagcraftError:
                    pass  # a lost slot only loosens the cap; the step's own lease matters

    def _stream_logs(self) -> None:
        """While the attempt runs, upload its logs every ``log_snapshot_interval`` (0.5 s on a
        local store, 3 s on S3) when they grew, so ``dagcraft logs --follow`` streams them from
        any host. Its own thread: a heartbeat riding out an outage never delays it."""
        for _ in self._waits(log_snapshot_interval(self.store)):
            self._snapshot_logs()
            if self._metered:
                self._sync_spend()

    def _snapshot_logs(self) -> None:
        """Upload each log that grew since its last upload: one PUT per grown log, none when
        nothing changed (best effort; bounded: logs over 8 MiB wait for the end)."""
        for name in ("stdout.log", "stderr.log"):
            p = self.dir / name
            try:
                size = p.stat().st_size
            except FileNotFoundError:
                continue
            if 0 < size <= 8 << 20 and self._log_sizes.get(name) != size:
                self._log_sizes[name] = size
                try:
                    self.store.put_file(f"{self._prefix}/{name}", p)
                except DagcraftError:
                    pass

    # -- budgets -----------------------------------------------------------------------------
    def _read_budget(self) -> None:
        """The limits raised by ``resume --budget`` (control.json) and the rest of the run's
        spend; whether any limit applies to this step at all."""
        got = self.store.get(layout.control(self.w.run_id))
        if got is not None:
            try:
                self._raised = dict(json.loads(got[0]).get("budget") or {})
            except (ValueError, AttributeError):
                self._raised = {}
        step = self.w.step
        scopes = [("run", None), ("agent", step.agent), ("step", step.id)]
        self._limited = any(budget.limit(self.w.wf, self._raised, sc, name, m, step) is not None
                            for sc, name in scopes for m in budget.METRICS)
        if self._limited:
            self._others = budget.totals(budget.ledger(self.store, self.w.run_id), skip=(step.id, self.n))

    def _on_usage(self, usage: dict[str, Any]) -> bool:
        """Called by the traced exec as the agent's usage grows: True stops the agent (its
        process group is killed at once) when run, agent or step spend reaches a limit."""
        agent = self.w.wf.agents.get(self.w.step.agent or "")
        tin, tout, cost, source = budget.spend_of(usage, agent)
        with self._spend_lock:
            self._spend = self._spend.model_copy(update={"tokens_in": tin, "tokens_out": tout, "cost_usd": cost,
                                                         "cost_from": source})
            spend, others = self._spend, self._others
        if not self._limited:
            return False
        hit = budget.exceeded(self.w.wf, self._raised, budget.add(others, spend), self.w.step)
        if hit is None:
            return False
        self._budget_hit = hit
        if self.trace is not None:
            self.trace.append("x.dagcraft.budget_exceeded", {"step": self.w.step.id, "attempt": self.n,
                                                             "reason": hit, "cost_usd": spend.cost_usd,
                                                             "tokens": spend.tokens})
        return True

    def _sync_spend(self, *, final: bool = False) -> None:
        """Write this attempt's spend when it changed (its own key), and re-read the rest of
        the run's (other attempts, other hosts) while a limit applies. Best effort while
        running; the final write rides out an outage like the commit."""
        with self._spend_lock:
            spend = self._spend.model_copy(update={"final": final, "updated_at": self.store.now()})
        try:
            if final or self._spend_written is None or \
                    spend.model_dump(exclude={"updated_at"}) != self._spend_written.model_dump(exclude={"updated_at"}):
                if final:
                    self.cfg.persist.call(lambda: budget.record(self.store, self.w.run_id, spend), what="record spend")
                else:
                    budget.record(self.store, self.w.run_id, spend)
                self._spend_written = spend
            if self._limited and not final:
                others = budget.totals(budget.ledger(self.store, self.w.run_id), skip=(spend.step, spend.attempt))
                with self._spend_lock:
                    self._others = others
        except DagcraftError as exc:
            log.warning("%s/%s: spend not recorded: %s", self.w.run_id, self.label, exc)

    def _lose(self, why: str) -> None:
        if self.trace is not None:
            self.trace.append("step.heartbeat_lost", {"step": self.w.step.id, "attempt": self.n, "reason": why})
        log.warning("%s/%s: %s", self.w.run_id, self.label, why)
        self.request_cancel(AttemptStatus.LOST)

    @property
    def _prefix(self) -> str:
        return layout.attempt_prefix(self.w.run_id, self.w.step.id, self.name)

    # -- main --------------------------------------------------------------------------------
    def run(self) -> StepState:
        self._t0 = time.monotonic()
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
        # private (0700, as is every level up from tmp_root): it holds the step's outputs
        # before redaction and whatever the step writes there; removed at the end of _finish
        attempt_dir(self.dir, self.cfg.tmp_root)
        self.trace = TraceWriter(self.dir / "trace.jsonl", self.w.run_id,
                                 redactor=Redactor(self.w.wf.secret_values()), fsync=False)
        step = self.w.step
        started = {"run": self.w.run_id, "workflow": self.w.run_name, "step": step.id, "attempt": self.n,
                   "worker": self.cfg.worker_id}
        if self.kind is AttemptKind.ROLLBACK:
            started["kind"] = "rollback"
        self.trace.append("run.started", started)
        self.trace.append("step.claimed", {"step": step.id, "attempt": self.n, "worker": self.cfg.worker_id,
                                           "token": self.hold.lease.token, "lease_expires_at": self.hold.lease.expires_at})
        if self.kind is AttemptKind.ROLLBACK:
            self.trace.append("rollback.started", {"step": step.id, "attempt": self.n})
        # a step that ends before its first beat or log snapshot is due (most do) starts no thread
        first_due = min(self.cfg.heartbeat_s, log_snapshot_interval(self.store))
        keepers = self.cfg.timers.after(max(0.0, first_due - (time.monotonic() - self._t0)), self._start_keepers)
        try:
            outcome = self._execute()
        except Exception as exc:  # an engine or store error: the attempt fails, the worker lives
            log.exception("%s/%s: internal error", self.w.run_id, self.label)
            outcome = Outcome(AttemptStatus.FAILED, reason=f"internal error: {type(exc).__name__}: {exc}",
                              kind=ReasonKind.INTERNAL_ERROR, retryable=True)
        finally:
            self.cfg.timers.cancel(keepers)
            self._stop_keepers()
        # before the commit: once the step shows succeeded, no worktree holds its branch, so a
        # downstream step may check it out, delete it or rebase it
        self._remove_worktree(delete_branch=False)
        return self._finish(outcome)

    def _remove_worktree(self, *, delete_branch: bool) -> None:
        if self.worktree is None or self.cfg.keep_workdirs:
            return
        try:
            worktree.remove(self.worktree, delete_branch=delete_branch)
        except (DagcraftError, OSError, subprocess.SubprocessError) as exc:
            log.warning("%s/%s: could not remove worktree %s: %s", self.w.run_id, self.label, self.worktree.path, exc)

    def _execute(self) -> Outcome:
        assert self.trace is not None
        step = self.w.step
        try:
            if step.worktree is not None and self.kind is AttemptKind.RUN:
                self.worktree = worktree.create(step.worktree, step, self.w.ctx, self.n, self.w.spec_dir,
                                                self.dir / "worktree", keep_leftovers=self.cfg.keep_workdirs)
                self.trace.append("x.dagcraft.worktree", {"step": step.id, "attempt": self.n,
                                                          "branch": self.worktree.branch,
                                                          "path": str(self.worktree.path)})
            workdir = context.workdir(step, self.w.ctx, self.w.spec_dir, self.dir / "work",
                                      self.worktree.path if self.worktree else None)
            if self.kind is AttemptKind.ROLLBACK:
                cmd = render_rollback(self.w.wf, step, self.w.ctx, timeout_s=step.timeout_s, cancel=self.cancel)
                if cmd is None:
                    return self._delete_branch(Outcome(AttemptStatus.SUCCEEDED))
                input_digests: list[str] = []
            else:
                art_paths, input_digests = self._materialize(workdir)
                ctx = context.with_artifact_paths(self.w.ctx, self.w.instances, art_paths)
                ctx = context.with_attempt(ctx, self.n, self.hold.state.history)
                # the step's timeout and cancel reach rendering: a render that runs too long fails
                # the attempt as timed out, and cancel stops it
                cmd = render_command(self.w.wf, step, ctx, timeout_s=step.timeout_s, cancel=self.cancel)
        except RenderTimedOut as exc:
            self.trace.append("error", {"step": step.id, "message": str(exc)})
            return Outcome(AttemptStatus.FAILED, reason=f"timed out after {step.timeout_s:g}s: {exc}",
                           timed_out=True, retryable=True)
        except RenderCancelled:
            return self._stopped()
        except (DagcraftError, FileNotFoundError) as exc:
            self.trace.append("error", {"step": step.id, "message": str(exc)})
            return Outcome(AttemptStatus.FAILED, reason=str(exc), kind=ReasonKind.BAD_INPUT)
        cache_key = None
        # a worktree step's result is its branch: a cached one would name another attempt's
        if step.cache and self.kind is AttemptKind.RUN and self.worktree is None:
            cache_key = self._cache_key(cmd, input_digests)
            hit = self._cache_lookup(cache_key)
            if hit is not None:
                return hit
        if self._metered:
            # no agent call starts once a limit that applies to it is reached, on any host
            self._read_budget()
            reached = budget.exceeded(self.w.wf, self._raised, self._others, step) if self._limited else None
            if reached is not None:
                self.trace.append("x.dagcraft.budget_exceeded", {"step": step.id, "attempt": self.n,
                                                                 "reason": reached, "started": False})
                return Outcome(AttemptStatus.FAILED, reason=f"not started: {reached}",
                               kind=ReasonKind.BUDGET_EXCEEDED)
        outcome = self._exec(cmd, workdir)
        if outcome.status is AttemptStatus.SUCCEEDED and self.kind is AttemptKind.RUN and step.check is not None:
            outcome = self._check(ctx, workdir, outcome)
        if outcome.status is AttemptStatus.SUCCEEDED and self.kind is AttemptKind.ROLLBACK:
            outcome = self._delete_branch(outcome)
        if outcome.status is AttemptStatus.SUCCEEDED and self.kind is AttemptKind.RUN:
            outcome = dataclasses.replace(self._results(workdir, outcome), check_exit_code=outcome.check_exit_code,
                                          check_output=outcome.check_output)
            if outcome.status is AttemptStatus.SUCCEEDED:
                outcome = self._commit_worktree(outcome)
            if cache_key is not None and outcome.status is AttemptStatus.SUCCEEDED:
                self._cache_store(cache_key, outcome)
        return outcome

    def _check(self, ctx: RenderContext, workdir: Path, ok: Outcome) -> Outcome:
        """Run the step's ``check`` after its command exited 0: same workdir, env and timeout,
        under the traced exec between ``x.dagcraft.check.started`` and ``.finished``, logged
        to ``check.stdout.log`` / ``check.stderr.log``. A non-zero exit fails the attempt
        (CHECK_FAILED, retryable under the step's ``retries``; ``retry_on`` sees the check's
        exit code and logs); its output's end rides in the outcome for the next attempt."""
        assert self.trace is not None
        step = self.w.step
        try:
            cmd = render_check(self.w.wf, step, ctx, timeout_s=step.timeout_s, cancel=self.cancel)
        except RenderTimedOut as exc:
            return Outcome(AttemptStatus.FAILED, reason=f"check timed out after {step.timeout_s:g}s: {exc}",
                           kind=ReasonKind.TIMED_OUT, timed_out=True, retryable=True)
        except RenderCancelled:
            return self._stopped()
        except DagcraftError as exc:
            self.trace.append("error", {"step": step.id, "message": str(exc)})
            return Outcome(AttemptStatus.FAILED, reason=str(exc), kind=ReasonKind.BAD_INPUT)
        assert cmd is not None
        self.trace.append("x.dagcraft.check.started", {"step": step.id, "attempt": self.n, "argv": cmd.argv})
        res = self._exec(cmd, workdir, log_prefix="check.")
        output = check_output(res.logs, lambda t: str(self._redact(t)))
        passed = res.status is AttemptStatus.SUCCEEDED
        self.trace.append("x.dagcraft.check.finished", {"step": step.id, "attempt": self.n, "passed": passed,
                                                        "exit_code": res.exit_code, "reason": res.reason})
        if passed:
            return dataclasses.replace(ok, check_exit_code=res.exit_code, check_output=output)
        if res.status is not AttemptStatus.FAILED or res.kind in (ReasonKind.TIMED_OUT, ReasonKind.LOG_ERROR):
            text = res.reason if res.status is not AttemptStatus.FAILED else f"check: {res.reason}"
            return dataclasses.replace(res, reason=text, check_exit_code=res.exit_code, check_output=output)
        return dataclasses.replace(res, kind=ReasonKind.CHECK_FAILED, reason=f"check failed: {res.reason}",
                                   retryable=True, check_exit_code=res.exit_code, check_output=output)

    def _exec(self, cmd: RenderedCommand, workdir: Path, *, log_prefix: str = "") -> Outcome:
        """Exec ``cmd`` in ``workdir`` under the traced exec, logged to ``<log_prefix>stdout.log``
        and ``<log_prefix>stderr.log``. The step's own command (no prefix) starts with no
        ``outputs`` file; its check (``check.``) leaves the command's in place."""
        assert self.trace is not None
        if self.cancel.is_set():  # stopped before its command started (a Ctrl-C as it was claimed)
            return self._stopped()
        step = self.w.step
        missing = missing_secrets(self.w.wf, step, rollback=self.kind is AttemptKind.ROLLBACK)
        if missing:  # the placeholder would run in its place; retrying here cannot help
            return Outcome(AttemptStatus.FAILED, retryable=False, kind=ReasonKind.MISSING_SECRET,
                           reason=f"secret parameter {missing[0]!r} is not set on worker {self.cfg.worker_id}: "
                                  f"give it {secret_env_name(missing[0])}, --secret-file or --secret-stdin")
        out_file = self.dir / "outputs"
        if not log_prefix:
            out_file.unlink(missing_ok=True)
        # the worker's environment holds every run's secrets: a step gets one only through its
        # own templates (rendered argv, its env: entries, the template values in cmd.env).
        # The context's env is that environment less the secrets, taken at the claim
        # (LocalView.template_env: decoded again only when the environment changed)
        env = dict(self.w.ctx.env)
        env.update(cmd.env)
        # the step can call `dagcraft agent …` and `dagcraft trace ingest` even when the worker's
        # virtualenv is not activated
        bindir = os.path.dirname(sys.executable)
        if bindir not in env.get("PATH", "").split(os.pathsep):
            env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
        env.update({
            "DAGCRAFT_STORE": self.cfg.store_url,
            "DAGCRAFT_RUN_ID": self.w.run_id,
            "DAGCRAFT_STEP": step.id,
            "DAGCRAFT_ATTEMPT": str(self.n),
            "DAGCRAFT_OUTPUT": str(out_file),
            "DAGCRAFT_TRACE": str(self.dir / "trace.jsonl"),
            "DAGCRAFT_WORKDIR": str(workdir),
        })
        if self.kind is AttemptKind.ROLLBACK:
            env["DAGCRAFT_ROLLBACK"] = "1"
        logs = (self.dir / f"{log_prefix}stdout.log", self.dir / f"{log_prefix}stderr.log")
        metered = self._metered and not log_prefix
        res = traced_exec(cmd.argv, writer=self.trace, env=env, cwd=workdir, stdout_log=logs[0],
                          stderr_log=logs[1], timeout=step.timeout_s, adapter=cmd.adapter,
                          echo=self.cfg.echo, cancel=self.cancel, grace=self.cfg.grace,
                          on_usage=self._on_usage if metered else None)
        base: dict[str, Any] = {"exit_code": res.exit_code, "signal": res.signal, "timed_out": res.timed_out,
                                "logs": logs}
        if metered and self._budget_hit is not None:
            # stopped on a limit: failed for good (retrying would spend more); resumable with a
            # raised limit (`resume --budget`)
            return Outcome(AttemptStatus.FAILED, reason=self._budget_hit, kind=ReasonKind.BUDGET_EXCEEDED, **base)
        if res.cancelled or self.cancel.is_set():
            return self._stopped(**base)
        failed = classify_exec(res, cmd.argv[0] if cmd.argv else "", step.timeout_s)
        if failed is not None:
            return Outcome(AttemptStatus.FAILED, kind=failed[0], reason=failed[1], retryable=True, **base)
        return Outcome(AttemptStatus.SUCCEEDED, **base)

    def _stopped(self, **base: Any) -> Outcome:
        """The outcome of an attempt stopped by :meth:`request_cancel`, for its reason."""
        why = self.cancel_reason or AttemptStatus.CANCELLED
        kind = {AttemptStatus.LOST: ReasonKind.LOST_WORKER,
                AttemptStatus.INTERRUPTED: ReasonKind.INTERRUPTED}.get(why, ReasonKind.CANCELLED)
        return Outcome(why, reason=str(why), kind=kind, **base)

    def _results(self, workdir: Path, ok: Outcome) -> Outcome:
        """Outputs and declared artifacts of a command that exited 0; artifacts are uploaded
        now (riding out outages): they are part of the result the commit publishes."""
        assert self.trace is not None
        step = self.w.step
        base: dict[str, Any] = {"exit_code": ok.exit_code, "signal": ok.signal, "logs": ok.logs}
        try:  # a NUL in an output, an artifact symlinked out of the workdir: fails for good
            # redacted before anything else sees them: the state, the cache, the trace, downstream
            # steps and `status` only ever get "[redacted]" in place of a secret (docs/spec.md)
            outputs = self._redact(parse_outputs(self.dir / "outputs"))
            found, missing_art = collect_artifacts(workdir, step.outputs_artifacts)
        except InvalidInput as exc:
            self.trace.append("error", {"step": step.id, "message": str(exc)})
            return Outcome(AttemptStatus.FAILED, reason=str(exc), kind=ReasonKind.BAD_INPUT, retryable=False, **base)
        for name, value in outputs.items():
            self.trace.append("output.set", {"name": name, "value": value})
        missing_out = [k for k in step.outputs_values if k not in outputs]
        if missing_out:
            return Outcome(AttemptStatus.FAILED, reason=f"missing declared output {missing_out[0]!r}",
                           kind=ReasonKind.MISSING_OUTPUT, retryable=True, **base)
        if missing_art:
            return Outcome(AttemptStatus.FAILED, reason=f"missing declared artifact {missing_art[0]!r}",
                           kind=ReasonKind.MISSING_OUTPUT, retryable=True, **base)
        arts: dict[str, dict[str, Any]] = {}
        scope = layout.step_scope(self.w.run_id, step.id)
        for name, path in found:
            ptr = self.cfg.persist.call(functools.partial(artifacts.put, self.store, path, scope=scope, name=name,
                                                          uploader=self.cfg.worker_id), what=f"upload artifact {name}")
            arts[name] = ptr.model_dump(mode="json")
            self.trace.append("artifact.put", {"name": name, "digest": ptr.digest, "size": ptr.size})
        return Outcome(AttemptStatus.SUCCEEDED, outputs=outputs, artifacts=arts, **base)

    def _commit_worktree(self, ok: Outcome) -> Outcome:
        """``ok`` with the worktree's outputs ``branch`` and ``commit`` (what the command left
        uncommitted is committed first, and the branch pushed when declared). A git failure
        here fails the attempt (retryable: a push can fail on a passing outage)."""
        if self.worktree is None:
            return ok
        assert self.trace is not None
        try:
            outs = worktree.finish(self.worktree, f"dagcraft: {self.w.run_id} {self.w.step.id} attempt {self.n}")
        except (DagcraftError, OSError, subprocess.SubprocessError) as exc:
            self.trace.append("error", {"step": self.w.step.id, "message": f"worktree: {exc}"})
            return Outcome(AttemptStatus.FAILED, reason=f"worktree: {exc}", kind=ReasonKind.INTERNAL_ERROR,
                           retryable=True, exit_code=ok.exit_code, logs=ok.logs)
        outs = self._redact(outs)
        for name, value in outs.items():
            self.trace.append("output.set", {"name": name, "value": value})
        return dataclasses.replace(ok, outputs={**ok.outputs, **outs})

    def _delete_branch(self, ok: Outcome) -> Outcome:
        """Compensation of a ``worktree: {delete_on_rollback: true}`` step, after its rollback
        command succeeded: delete the branch its committed attempt published."""
        spec = self.w.step.worktree
        branch = self.hold.state.outputs.get("branch")
        if spec is None or not spec.delete_on_rollback or not isinstance(branch, str):
            return ok
        assert self.trace is not None
        try:
            worktree.delete_branch(spec, self.w.step, self.w.ctx, self.w.spec_dir, branch)
        except (DagcraftError, OSError, subprocess.SubprocessError) as exc:
            self.trace.append("error", {"step": self.w.step.id, "message": f"worktree: {exc}"})
            return Outcome(AttemptStatus.FAILED, reason=f"worktree: {exc}", kind=ReasonKind.INTERNAL_ERROR,
                           exit_code=ok.exit_code, logs=ok.logs)
        self.trace.append("x.dagcraft.branch_deleted", {"step": self.w.step.id, "branch": branch})
        return ok

    def _materialize(self, workdir: Path) -> tuple[dict[str, dict[str, str]], list[str]]:
        """Download declared inputs, and upstream artifacts when templates mention them.
        Returns local paths per upstream step and the digests read (for the cache key).

        An input from a foreach step is every child's file, at ``<dest>/<instance key>/<name>``
        (a matrix step's instances are separate declarations, laid out so by the compiler).
        An instance that did not succeed may have no file: its place stays empty. A missing
        file of any other step fails the attempt."""
        digests: list[str] = []
        paths: dict[str, dict[str, str]] = {}
        statuses = {i["id"]: i["status"] for e in self.w.ctx.steps.values() for i in e.get("instances", [])}
        for inp in self.w.step.inputs:
            validate_relpath(inp.dest, "input destination")
            src = self.w.wf.steps.get(inp.step)
            if src is not None and src.foreach:
                (workdir / inp.dest).mkdir(parents=True, exist_ok=True)
                targets = [(sid, workdir / inp.dest / instance_key(sid, inp.step) / inp.artifact)
                           for sid in self.w.instances.get(inp.step, [])]
            else:
                targets = [(inp.step, workdir / inp.dest)]
            for sid, dest in targets:
                ptr = self.w.upstream_artifacts.get(sid, {}).get(inp.artifact)
                if ptr is None:
                    if statuses.get(sid, StepStatus.SUCCEEDED) != StepStatus.SUCCEEDED:
                        continue
                    raise FileNotFoundError(f"input artifact {inp.artifact!r} of step {sid!r} not found")
                dest.parent.mkdir(parents=True, exist_ok=True)
                artifacts.get(self.store, scope=ptr["scope"], name=ptr["name"], dest=dest)
                digests.append(f"{sid}:{inp.artifact}:{ptr['digest']}")
        text = json.dumps([self.w.step.run, self.w.step.prompt, self.w.step.env])
        if "artifacts" in text:
            for sid, ptrs in self.w.upstream_artifacts.items():
                for name, ptr in ptrs.items():
                    dest = workdir / ".dagcraft-inputs" / sid / name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    artifacts.get(self.store, scope=ptr["scope"], name=ptr["name"], dest=dest)
                    paths.setdefault(sid, {})[name] = str(dest)
                    digests.append(f"{sid}:{name}:{ptr['digest']}")
        return paths, sorted(digests)

    def _redact(self, obj: Any) -> Any:
        """``obj`` with the run's secret values and credential shapes replaced by [redacted]."""
        assert self.trace is not None and self.trace.redactor is not None
        return self.trace.redactor.redact(obj)

    # -- cache -------------------------------------------------------------------------------
    def _cache_key(self, cmd: RenderedCommand, input_digests: list[str]) -> str:
        step = self.w.step
        agent = self.w.wf.agents.get(step.agent) if step.agent else None
        material = {
            "argv": cmd.argv, "shell": cmd.shell, "adapter": cmd.adapter,
            "env": dict(sorted(cmd.env.items())), "agent": step.agent,
            "agent_command": agent.command if agent else None,
            "inputs": input_digests, "outputs": [step.outputs_values, step.outputs_artifacts],
        }
        if step.check is not None:  # a result cached under one check is not one that passed another
            material["check"] = step.check
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()

    def _cache_lookup(self, key: str) -> Outcome | None:
        got = self.store.get(layout.cache_entry(key))
        if got is None:
            return None
        try:
            entry = json.loads(got[0])
            if not (isinstance(entry, dict) and isinstance(entry.get("outputs"), dict)
                    and isinstance(entry.get("artifacts"), dict)):
                raise ValueError("not a cache entry")
        except ValueError:
            # a corrupt entry is a miss (reported once per attempt), never a failing step;
            # the fresh result is not cached over it (create-only)
            log.warning("corrupt cache entry %s: ignored", layout.cache_entry(key))
            return None
        assert self.trace is not None
        self.trace.append("x.dagcraft.cache_hit", {"key": key, "from_run": entry.get("run"),
                                                   "from_step": entry.get("step"), "from_attempt": entry.get("attempt")})
        # redacted again: an entry written before redaction, or by hand, never brings one back
        return Outcome(AttemptStatus.SUCCEEDED, outputs=self._redact(entry["outputs"]), artifacts=entry["artifacts"],
                       exit_code=0,
                       cached_from=f"{entry.get('run')}/{entry.get('step')}#{entry.get('attempt')}")

    def _cache_store(self, key: str, outcome: Outcome) -> None:
        body = json.dumps({"run": self.w.run_id, "step": self.w.step.id, "attempt": self.n,
                           "outputs": self._redact(outcome.outputs), "artifacts": outcome.artifacts},
                          sort_keys=True).encode()
        try:
            self.store.put(layout.cache_entry(key), body, if_none_match=True)
        except (Conflict, StoreUnavailable):
            pass  # an identical result is already cached, or the cache is skipped this time

    # -- commit and uploads ------------------------------------------------------------------------
    def _release_slot(self) -> None:
        if self.holds_slot:
            self.holds_slot = False
            if self.on_release is not None:
                self.on_release()

    def _decide(self, outcome: Outcome) -> tuple[Callable[[transitions.Hold, transitions.Ending], StepState],
                                                 StepStatus, float | None]:
        """Which transition commits this outcome, the step status it leads to, and the delay
        before the next attempt (retry_wait only)."""
        step = self.w.step
        if outcome.status is AttemptStatus.INTERRUPTED:
            return (transitions.hand_back,
                    StepStatus.PENDING if self.kind is AttemptKind.RUN else StepStatus.SUCCEEDED, None)
        if self.kind is AttemptKind.ROLLBACK:
            return transitions.compensated, StepStatus.ROLLED_BACK, None
        if outcome.status is AttemptStatus.SUCCEEDED:
            return transitions.succeed, StepStatus.SUCCEEDED, None
        if outcome.status is AttemptStatus.CANCELLED:
            return transitions.cancel, StepStatus.CANCELLED, None
        failures = self.hold.state.failures + 1
        if outcome.retryable and should_retry(step.retries, failures, outcome.exit_code, list(outcome.logs),
                                              outcome.timed_out):
            return transitions.retry_wait, StepStatus.RETRYING, backoff_delay(step.retries, failures)
        return transitions.fail, StepStatus.FAILED, None

    def _close_trace(self, outcome: Outcome, status: str, retry_in: float | None = None) -> None:
        """The attempt's closing events, ending with ``run.finished``."""
        assert self.trace is not None
        step = self.w.step
        if retry_in is not None:
            self.trace.append("step.retry", {"step": step.id, "attempt": self.n, "failures": self.hold.state.failures + 1,
                                             "delay_s": round(retry_in, 3), "reason": outcome.reason})
        elif outcome.status is AttemptStatus.CANCELLED:
            self.trace.append("step.cancelled", {"step": step.id, "attempt": self.n})
        if self.kind is AttemptKind.ROLLBACK:
            self.trace.append("rollback.finished", {"step": step.id, "success": outcome.status is AttemptStatus.SUCCEEDED,
                                                    "exit_code": outcome.exit_code})
        self.trace.append("run.finished", {"status": status, "step": step.id, "attempt": self.n,
                                           "exit_code": outcome.exit_code, "reason": outcome.reason,
                                           "reason_kind": None if outcome.kind is None else str(outcome.kind),
                                           "redactions": self.trace.redactor.count if self.trace.redactor else 0})

    def _finish(self, outcome: Outcome) -> StepState:
        """Close the trace, then commit. The trace is complete (``run.finished`` written)
        before the commit, so the commit's CAS pins its final head (``AttemptInfo.trace_head``).
        An attempt whose commit is refused appends ``step.fenced`` and a second
        ``run.finished`` (status ``fenced``) after it: it is not the committed attempt, and
        nothing pinned its trace."""
        assert self.trace is not None
        step = self.w.step
        committed: StepState | None = None
        if self._metered:
            # final before the commit: once the step shows ended, its spend is in the ledger
            self._sync_spend(final=True)
        if outcome.status is not AttemptStatus.LOST:
            transition, status, retry_in = self._decide(outcome)
            self._close_trace(outcome, str(status), retry_in)
            # the stderr tail rides in the commit, so every viewer shows it without a log read
            tail = None if outcome.status is AttemptStatus.SUCCEEDED else stderr_tail(
                outcome.logs[1] if outcome.kind is ReasonKind.CHECK_FAILED else self.dir / "stderr.log")
            info = AttemptInfo(attempt=self.n, status=outcome.status, kind=self.kind, worker=self.cfg.worker_id,
                               started_at=self.hold.state.started_at if self.kind is AttemptKind.RUN else self.started_at,
                               finished_at=self.store.now(), exit_code=outcome.exit_code, signal=outcome.signal,
                               reason=self._redact(outcome.reason), reason_kind=outcome.kind,
                               stderr_tail=self._redact(tail), trace_head=self.trace.head(),
                               check_exit_code=outcome.check_exit_code,
                               check_output=self._redact(outcome.check_output))
            ending = transitions.Ending(attempt=info, outputs=outcome.outputs, artifacts=outcome.artifacts,
                                        cached_from=outcome.cached_from, retry_in=retry_in)
            try:
                committed = transition(self.hold, ending)
            except Fenced as exc:
                self.trace.append("step.fenced", {"step": step.id, "attempt": self.n, "worker": self.cfg.worker_id,
                                                  "reason": f"lease lost: {exc}", "result_discarded": str(outcome.status)})
            except StoreUnavailable as exc:
                # the store stayed down for the whole outage budget: the lease will expire and
                # the supervisor will declare this attempt lost
                log.error("%s/%s: could not commit: %s", self.w.run_id, self.label, exc)
                self.trace.append("error", {"step": step.id, "message": f"commit failed: {exc}"})
            if committed is not None:
                if self.worktree is None and not self.w.semaphores:
                    # nothing below gives anything back: the change's wake-up is the slot's too
                    self.holds_slot = False
                self.on_change(committed, self.hold.etag, self.hold.journal_key)
            else:
                self.trace.append("run.finished", {"status": "fenced", "step": step.id, "attempt": self.n,
                                                   "exit_code": outcome.exit_code, "reason": outcome.reason})
        else:
            self.trace.append("step.fenced", {"step": step.id, "attempt": self.n, "worker": self.cfg.worker_id,
                                              "reason": "lease lost", "result_discarded": "lost"})
            self._close_trace(outcome, "fenced")
        if not (committed is not None and outcome.status is AttemptStatus.SUCCEEDED):
            self._remove_worktree(delete_branch=True)  # only a committed success publishes its branch
        for sem, lease in zip(self.w.semaphores, self.w.semaphore_leases, strict=True):
            try:
                sem.release(lease)
            except DagcraftError:
                pass  # it expires after its TTL
        # the step's outcome is in the store and its worktree and slots are given back: what is
        # left (closing and uploading the trace and logs, emptying scratch) decides nothing, so
        # the worker's next attempt need not wait for it (on a local store, for its fsyncs)
        self._release_slot()
        self.trace.close()
        # uploaded after the commit, so they never decide the step's status; retried until
        # they land (trace last: `trace verify` reports it missing until then)
        for name in ("stdout.log", "stderr.log", "check.stdout.log", "check.stderr.log", "trace.jsonl"):
            p = self.dir / name
            if p.exists() and p.stat().st_size > 0:  # an empty log costs no request
                # closed for good, and removed just below: the store may take the file itself
                self.outbox.upload(f"{self._prefix}/{name}", p, consume=not self.cfg.keep_workdirs)
        if not self.cfg.keep_workdirs:
            # the outbox queued its own copies of what did not land: nothing here is needed
            # emptied and kept as a spare for the next attempt; the step and run directories
            # above it stay for the run's next attempts, until the worker stops serving it
            release_attempt_dir(self.dir, self.cfg.tmp_root)
        return committed if committed is not None else self.hold.state
