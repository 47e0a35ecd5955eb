"""Run operations: status, listing, cancel, resume, retry-from, rollback, logs.

Each is a CAS on run control and/or step states followed by a journal entry, so it is safe
while workers are running anywhere: a worker that raced it sees a failed CAS and re-reads.
They are interactive: a store failure is reported at once (StoreUnavailable, exit 5), not
ridden out like a worker's writes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dagcraft.errors import Conflict, CorruptRecord, DagcraftError, InvalidInput, NotFound
from dagcraft.orchestrator import journal, layout, registry, statusrows
from dagcraft.orchestrator.model import (
    RUN_FINISHED,
    TERMINAL,
    AttemptKind,
    Control,
    CorruptNote,
    ReasonKind,
    RunRecord,
    RunStatus,
    RunTiming,
    StepState,
    StepStatus,
    dump,
    load_control,
    load_record,
    load_state,
    timing_of,
)
from dagcraft.orchestrator.submission import identity
from dagcraft.primitives.local import LocalStore
from dagcraft.primitives.store import Store
from dagcraft.workflows.gcpause import paused_gc

if TYPE_CHECKING:
    from dagcraft.orchestrator.view import LocalView

# The operations that change a run (cancel, resume, retry, rollback) import the worker's view,
# transitions, supervisor and budget where they run: `status` and `runs` need none of them
# (with what they import, a tenth of a second of every status).


def read_record(store: Store, run_id: str) -> RunRecord:
    key = layout.run_record(run_id)
    got = store.get(key)
    if got is None:
        raise NotFound(f"run {run_id!r} not found in {store.url}")
    return load_record(RunRecord, got[0], key, store.url)


def read_control(store: Store, run_id: str) -> Control:
    """The run's control. NotFound when it was never written: a submit that did not complete
    (run.json alone) is no run."""
    key = layout.control(run_id)
    got = store.get(key)
    if got is None:
        raise NotFound(f"run {run_id!r} not found in {store.url} (its submit did not complete)")
    return load_control(got[0], key, store.url)


def read_step_state(store: Store, run_id: str, step: str) -> StepState:
    """A step's state. A submitted step without a record is pending (submit writes no
    per-step record: a step's record is created by its first transition). NotFound naming
    the run, or the step, when neither exists."""
    key = layout.step_state(run_id, step)
    got = store.get(key)
    if got is not None:
        return load_state(got[0], key, store.url)
    if step in read_record(store, run_id).workflow.get("steps", {}):
        return StepState(step_id=step)
    raise NotFound(f"step {step!r} not found in run {run_id!r}")


def load_states(store: Store, run_id: str, rec: RunRecord | None = None) -> dict[str, StepState]:
    """Every step state that has a record, foreach children included: one GET per submitted
    step (and per child its parent lists), never a LIST of the steps' directories (which also
    hold every attempt's logs and traces). Steps without a record are pending and absent here."""
    rec = rec or read_record(store, run_id)
    defs = rec.workflow.get("steps", {})
    states: dict[str, StepState] = {}
    todo = list(rec.order or defs)
    probe: dict[str, str] = {}  # a foreach child id past its parent's list -> the parent
    while todo:
        keys = [layout.step_state(run_id, sid) for sid in todo]
        todo = []
        for key, got in zip(keys, _get_many(store, keys), strict=True):
            if got is None:
                continue
            st = load_state(got[0], key, store.url)
            states[st.step_id] = st
            todo.extend(c for c in st.children if c not in states)
            parent = probe.pop(st.step_id, None)
            if isinstance(defs.get(st.step_id), dict) and defs[st.step_id].get("foreach"):
                parent = st.step_id
            if parent is not None:
                # children are ``parent[i]``, i = 0, 1, ...; a re-expansion to fewer items
                # retires the rest (skipped, no longer listed): read on until the first gap
                n = len(states[parent].children) if st.step_id == parent else _index_of(st.step_id) + 1
                nxt = f"{parent}[{n}]"
                if nxt not in states:
                    probe[nxt] = parent
                    todo.append(nxt)
    return states


def _index_of(child: str) -> int:
    return int(child.rsplit("[", 1)[1][:-1])


def _get_many(store: Store, keys: list[str]) -> list[tuple[bytes, str] | None]:
    """GETs of ``keys``, in order: in parallel on a remote store (one round trip each), in
    this thread on the local one (microseconds each; threads would only add hand-offs)."""
    if isinstance(store, LocalStore) or len(keys) < 2:
        return [store.get(k) for k in keys]
    with ThreadPoolExecutor(max_workers=16, thread_name_prefix="dagcraft-read") as pool:
        return list(pool.map(store.get, keys))


def compiled_order(rec: RunRecord) -> list[str]:
    """The run's step ids in compiled (topological) order."""
    return rec.order or list(rec.workflow.get("steps", {}))


def ordered_states(rec: RunRecord, states: dict[str, StepState]) -> list[tuple[StepState, str | None]]:
    """(state, foreach parent) in compiled order, each parent followed by its children."""
    return statusrows.ordered_states(compiled_order(rec), states)


def run_status(store: Store, run_id: str) -> dict[str, Any]:
    """Run record summary, control, timing (:class:`RunTiming`) and every step's state (reads
    each step once). ``counts`` counts the steps that were submitted (foreach children are
    counted in their parent's ``children_counts``), so it adds up to the number ``run`` printed
    at submission. A step that did not succeed carries ``reason_kind`` and, when its last
    attempt failed, that attempt's ``stderr_tail`` and ``more`` (the command that prints the
    whole log). A sealed run is read from the status summary its seal names (two GETs, not one
    per step; see ``orchestrator.statusrows``), any other run from its records."""
    return status_result(store, run_id).as_dict()


@dataclass(frozen=True)
class StatusResult:
    """:func:`run_status` of one run: ``fields`` (everything but ``steps``) and its step rows,
    held either as dicts (``rows``) or as the lines ``status --json`` prints (``lines``, a
    sealed run's summary: printed as they are, parsed only for :meth:`as_dict`)."""

    fields: dict[str, Any]
    rows: list[dict[str, Any]] | None = None
    lines: list[str] | None = None

    def as_dict(self) -> dict[str, Any]:
        if self.rows is not None:
            return {**self.fields, "steps": self.rows}
        rows: list[dict[str, Any]] = json.loads(f"[{','.join(self.lines or [])}]")
        return {**self.fields, "steps": rows}

    def to_json(self) -> str:
        """What ``status --json`` prints: :func:`dumps_status` of :meth:`as_dict`."""
        if self.lines is None:
            return dumps_status(self.as_dict())
        return _dumps(self.fields, self.lines)


def status_result(store: Store, run_id: str) -> StatusResult:
    """:func:`run_status` as a :class:`StatusResult`."""
    with paused_gc():  # 10,000 records read at once: see paused_gc
        return _run_status(store, run_id)


def _run_status(store: Store, run_id: str, *, summary: bool = True) -> StatusResult:
    """``summary=False``: from the records even when the run is sealed (what its summary must equal)."""
    try:
        ctl = read_control(store, run_id)
    except NotFound:
        read_record(store, run_id)  # no run at all: say so, not that its submit did not complete
        raise
    sealed = ctl.seal
    if summary and ctl.status in RUN_FINISHED and sealed is not None and sealed.summary is not None:
        now = store.now()
        got = statusrows.read_summary(store, run_id, ctl.generation, sealed.digest, sealed.steps, sealed.summary,
                                      now)
        if got is not None:
            head, lines = got
            return StatusResult(_fields(store, run_id, ctl, head.name, head.submitted_at, head.submitted_by,
                                        head.spec_hash, head.params, head.counts, head.waiting_approval,
                                        timing_of(head.submitted_at, ctl, head.first_claim_at, now), None),
                                lines=lines)
    rec = read_record(store, run_id)
    states = load_states(store, run_id, rec)
    now = store.now()
    defs = rec.workflow.get("steps", {})
    rows = statusrows.live_rows(lambda sid: (defs.get(sid) or {}).get("loop"))
    for st in states.values():
        rows.add(st)
    shown: list[tuple[str, str, str | None]] = []
    steps = statusrows.finish_rows(rows.rows(compiled_order(rec), shown), store, run_id, now)
    return StatusResult(_fields(store, run_id, ctl, rec.name, rec.submitted_at, rec.submitted_by, rec.spec_hash,
                                rec.params, statusrows.step_counts(shown), statusrows.waiting_approval(shown),
                                timing_of(rec.submitted_at, ctl, rows.first_claim, now),
                                spend_summary(store, rec, ctl, states)), rows=steps)


def _fields(store: Store, run_id: str, ctl: Control, name: str, submitted_at: float, submitted_by: str,
            spec_hash: str, params: dict[str, Any], counts: dict[str, int], waiting: list[str], timing: RunTiming,
            budget: dict[str, Any] | None) -> dict[str, Any]:
    workers = registry.list_workers(store) if ctl.status not in RUN_FINISHED else []
    return {"run_id": run_id, "name": name, "status": str(ctl.status), "reason": ctl.reason,
            "stalled": registry.stalled(workers, run_id, ctl.status),
            "workers": [w.worker_id for w in registry.live_serving(workers, run_id)],
            "submitted_at": submitted_at, "submitted_by": submitted_by, "finished_at": ctl.finished_at,
            "duration_s": None if timing.duration_s is None else round(timing.duration_s, 3),
            "timing": timing.model_dump(mode="json"), "generation": ctl.generation,
            "spec_hash": spec_hash, "params": params, "counts": counts,
            "budget": budget,
            # approval gates waiting for `dagcraft approve|reject` (a run left only with these
            # reads as stalled once its workers exited: it waits for a person, then `resume`)
            "waiting_approval": waiting}


def drop_summary(store: Store, run_id: str) -> None:
    """Remove the run's status summary before its step records change (resume, retry): until
    the CAS that reopens the run, control still carries the seal, and ``status`` must read the
    records, not the summary of what they were — also when the command dies halfway."""
    store.delete(layout.status_summary(run_id))


def spend_summary(store: Store, rec: RunRecord, ctl: Control, states: dict[str, StepState]) -> dict[str, Any] | None:
    """Spend per run, agent and step against the limits in force (``budget.summary``), from
    the ledger; None for a workflow without agents (nothing can spend: no request made)."""
    if not rec.workflow.get("agents"):
        return None  # known without validating every step of the workflow (a second, at 10,000)
    from dagcraft.orchestrator import budget
    from dagcraft.orchestrator.view import workflow_of
    from dagcraft.workflows import ConcreteStep

    wf = workflow_of(rec, store.url, with_secrets=False)
    if not wf.agents:
        return None
    steps = dict(wf.steps)
    for sid, st in states.items():
        if st.definition is not None and sid not in steps:
            try:
                steps[sid] = ConcreteStep.model_validate(st.definition)
            except ValueError:
                continue  # reported by the workers that read it; a summary row without limits
    return budget.summary(wf, ctl.budget, budget.ledger(store, rec.run_id), steps)


#: what ``list_runs`` reports as the status of a run whose records cannot be read. Never
#: written to the store: a run is corrupt when its run.json or control.json does not parse.
CORRUPT = "corrupt"


def note_corrupt(store: Store, run_id: str, exc: CorruptRecord, by: str) -> None:
    """Mark ``run_id`` corrupt (``corrupt/<run>``, first report wins). Best effort: the mark
    only informs ``runs``; a store that refuses it changes nothing."""
    note = CorruptNote(run_id=run_id, key=exc.key, detail=exc.detail, reported_by=by, reported_at=store.now())
    try:
        store.put(layout.corrupt_note(run_id), dump(note), if_none_match=True)
    except DagcraftError:
        pass


def raise_if_corrupt(store: Store, run_id: str) -> None:
    """Raise the CorruptRecord a worker marked ``run_id`` with, if any (one GET)."""
    got = store.get(layout.corrupt_note(run_id))
    if got is not None:
        note = load_record(CorruptNote, got[0], layout.corrupt_note(run_id), store.url)
        raise CorruptRecord(note.key, note.detail, store.url)


def corrupt_runs(store: Store) -> dict[str, CorruptNote]:
    """Runs a worker marked corrupt: run id -> its note (one LIST, one GET per marked run)."""
    out: dict[str, CorruptNote] = {}
    for key in store.list(layout.CORRUPT_PREFIX):
        got = store.get(key)
        if got is None:
            continue
        try:
            note = load_record(CorruptNote, got[0], key, store.url)
        except CorruptRecord:
            continue
        out[note.run_id] = note
    return out


def list_runs(store: Store, status: str | None = None) -> list[dict[str, Any]]:
    """Every run in the store, newest first (two GETs per run, plus one read of the worker
    registry when a run is unfinished: ``stalled`` as in :func:`run_status`). A run whose record or control
    cannot be parsed is listed with status ``corrupt`` and ``corrupt`` naming the bad key
    (``corrupt`` is None for every other run): one bad run never hides the others."""
    out: dict[str, dict[str, Any]] = {}
    marked = corrupt_runs(store)
    workers: list[tuple[registry.WorkerRecord, registry.WorkerState]] | None = None
    for key in store.list(layout.RUNS_INDEX):
        run_id = layout.parse_runs_index_key(key)
        if run_id in out:
            continue
        try:
            rec = read_record(store, run_id)
        except NotFound:
            continue
        except InvalidInput:
            continue  # an index entry no valid run id could have written
        except CorruptRecord as exc:
            out[run_id] = {"run_id": run_id, "name": None, "status": CORRUPT, "submitted_at": 0.0,
                           "finished_at": None, "reason": str(exc), "corrupt": exc.key}
            continue
        try:
            ctl = read_control(store, run_id)
        except NotFound:
            continue
        except CorruptRecord as exc:
            out[run_id] = {"run_id": run_id, "name": rec.name, "status": CORRUPT, "submitted_at": rec.submitted_at,
                           "finished_at": None, "reason": str(exc), "corrupt": exc.key}
            continue
        note = marked.get(run_id)
        out[run_id] = {"run_id": run_id, "name": rec.name, "status": CORRUPT if note else str(ctl.status),
                       "submitted_at": rec.submitted_at, "finished_at": ctl.finished_at,
                       "reason": str(CorruptRecord(note.key, note.detail)) if note else ctl.reason,
                       "corrupt": note.key if note else None}
    for r in out.values():
        if r["status"] not in RUN_FINISHED and r["status"] != CORRUPT and workers is None:
            workers = registry.list_workers(store)  # once, and only when some run is unfinished
        r["stalled"] = registry.stalled(workers or [], r["run_id"], r["status"])
    runs = sorted(out.values(), key=lambda r: r["submitted_at"], reverse=True)
    if status:
        runs = [r for r in runs if r["status"] == status]
    return runs


def latest_run_id(store: Store) -> str:
    """The id of the run most recently submitted to ``store`` (the first row of ``runs``),
    from the ``runs-index/`` alone: one LIST, no record read. A run reopened by resume or
    retry keeps its place (its first index entry counts). NotFound on a store without runs."""
    first: dict[str, str] = {}
    for key in store.list(layout.RUNS_INDEX):
        ulid = key.rsplit("/", 1)[-1].partition("~")[0]
        run_id = layout.parse_runs_index_key(key)
        if run_id and (run_id not in first or ulid < first[run_id]):
            first[run_id] = ulid  # ULIDs sort by creation time
    if not first:
        raise NotFound(f"no runs in {store.url}")
    return max(first, key=lambda r: first[r])


def _reindex(store: Store, run_id: str) -> None:
    # workers serving every run discover reopened runs through a fresh index entry
    journal.index_run(store, run_id)


def cancel(store: Store, run_id: str, reason: str = "cancelled by user", *, wait_s: float = 60.0) -> str:
    """Ask every worker to stop the run: running steps are signalled, nothing new starts.
    Returns the run status after the request.

    When no live worker serves the run (the registry, :mod:`.registry`), nobody else would
    ever finish the cancellation, so this does it as the run's supervisor (the same lease and
    transitions a worker's supervisor uses): unstarted steps become cancelled, steps held by
    a vanished worker become cancelled once their lease has expired, and the run ends
    ``cancelled``. It waits up to ``wait_s`` for such leases; still ``cancelling`` after that
    (or as soon as a live worker appears, which then finishes it)."""
    from dagcraft.orchestrator import transitions
    from dagcraft.orchestrator.view import LocalView
    from dagcraft.primitives.persist import ONCE

    view = LocalView(store, run_id, detail=True, persist=ONCE)
    for _ in range(5):
        if view.control.status in RUN_FINISHED:
            return view.control.status
        if view.control.status == RunStatus.CANCELLING or transitions.set_control(view, RunStatus.CANCELLING, reason):
            break
    else:
        raise Conflict(f"run {run_id!r}: control kept changing; try again")
    if registry.live_serving(registry.list_workers(store), run_id):
        return str(RunStatus.CANCELLING)
    return _finish_cancel(view, wait_s)


#: how often an unserved cancellation re-checks its run (and, every few of them, the registry)
_CANCEL_POLL_S = 0.25


def _finish_cancel(view: LocalView, wait_s: float) -> str:
    from dagcraft.orchestrator.supervisor import Supervisor

    # a short TTL: this process holds the role only while it waits here
    sup = Supervisor(view, f"cancel-{identity()}", lease_ttl=3.0)
    deadline = time.monotonic() + wait_s
    polls = 0
    try:
        while True:
            view.refresh()
            sup.tick()
            if view.control.status in RUN_FINISHED or time.monotonic() >= deadline:
                return str(view.control.status)
            polls += 1
            if polls % 8 == 0 and registry.live_serving(registry.list_workers(view.store), view.run_id):
                return str(view.control.status)  # a worker arrived: its supervisor finishes it
            # waiting on the store's clock (a vanished holder's lease expiry): nothing to await
            time.sleep(_CANCEL_POLL_S)
    finally:
        sup.release()


def prepare_resume(store: Store, run_id: str, *, retry_failed: bool = False,
                   budget_raises: Sequence[str] = ()) -> str:
    """Make an interrupted run continuable. Succeeded steps are never reset. With
    ``retry_failed``, failed steps and the steps skipped or cancelled because of them go back
    to pending. A run that ended ``budget_exceeded`` resumes its budget-stopped steps (and the
    steps skipped or cancelled after them); ``budget_raises`` (``KEY=VALUE``, see
    ``budget.parse_raise``; all checked before anything is written) raise limits in control.json,
    by the CAS that reopens the run. Returns the run status afterwards."""
    from dagcraft.orchestrator import budget, transitions
    from dagcraft.orchestrator.view import LocalView
    from dagcraft.primitives.persist import ONCE

    view = LocalView(store, run_id, detail=True, persist=ONCE)
    raised = dict(budget.parse_raise(text, view.wf) for text in budget_raises)
    _clear_corrupt(view)
    status = view.control.status
    resettable = {StepStatus.CANCELLED} | ({StepStatus.FAILED} if retry_failed else set())
    if status == "succeeded":
        return status
    if status in RUN_FINISHED or status == "cancelling":
        if status in ("failed", "rolled_back") and not retry_failed:
            return status
        reset = [s for s in view.all_ids() if view.status(s) in resettable and not view.state(s).parent]
        if status == RunStatus.BUDGET_EXCEEDED:
            reset += [s for s in view.all_ids() if view.status(s) == StepStatus.FAILED and not view.state(s).parent
                      and s not in reset and _budget_stopped(view, s)]
        if retry_failed or status == RunStatus.BUDGET_EXCEEDED:
            reset += [s for s in view.all_ids() if view.status(s) in (StepStatus.SKIPPED, StepStatus.CANCELLED)
                      and not view.state(s).parent and s not in reset]
        drop_summary(store, run_id)
        for sid in reset:
            resumed_at = _loop_resume_point(view, sid)
            if resumed_at is not None:
                _reset_loop_from(view, resumed_at, "reset by resume")
            else:
                transitions.reset(view, sid, "reset by resume")
        transitions.reopen(view, "resumed", raised)
        _reindex(store, run_id)
    else:
        if raised:
            transitions.reopen(view, "budget raised", raised)
        _reindex(store, run_id)
    return view.control.status


def _loop_resume_point(view: LocalView, sid: str) -> str | None:
    """Where ``resume --retry-failed`` continues loop ``sid``: the first body step of its last
    iteration that failed, was cancelled or was not started because of a failure (earlier
    iterations are not redone). None: not a loop, or none such (it is reset as a whole)."""
    if view.steps[sid].loop is None or not view.state(sid).children:
        return None
    k = max(view.steps[c].iteration or 0 for c in view.state(sid).children)
    for c in view.state(sid).children:
        st = view.state(c)
        if view.steps[c].iteration == k and (st.status in (StepStatus.FAILED, StepStatus.CANCELLED) or (
                st.status == StepStatus.SKIPPED and (st.reason or "").startswith("not started"))):
            return c
    return None


def _budget_stopped(view: LocalView, sid: str) -> bool:
    """The step (or one of its foreach children) failed on a budget limit."""
    st = view.state(sid)
    return st.reason_kind == ReasonKind.BUDGET_EXCEEDED or any(
        view.state(c).reason_kind == ReasonKind.BUDGET_EXCEEDED for c in st.children if c in view.states)


def _clear_corrupt(view: LocalView) -> None:
    """A run is reopened only once every record of it reads (raises CorruptRecord otherwise,
    before any worker starts); then a corrupt mark it had is removed. Costs one LIST and one
    GET per step: resume and retry are rare, and a worker pool started on an unreadable run
    would only fail."""
    view.full_resync()
    key = layout.corrupt_note(view.run_id)
    if view.store.get(key) is not None:
        view.store.delete(key)


def _latest_body_step(view: LocalView, body_id: str) -> str | None:
    """The instance of loop body step ``body_id`` in its loop's latest iteration (None: no
    loop has a body step of that id, or it has not run)."""
    best: str | None = None
    for sid, step in view.steps.items():
        if step.iteration is not None and step.template_id == body_id and view.state(sid).parent and (
                best is None or (view.steps[best].iteration or 0) < step.iteration):
            best = sid
    return best


def _reset_loop_from(view: LocalView, child: str, reason: str) -> list[str]:
    """Continue a loop from body step ``child`` of iteration k: it and the body steps after it
    in that iteration go back to pending, later iterations are retired, earlier iterations
    (and their attempts and traces) are kept, and the loop evaluates ``until`` again when
    iteration k is done. Returns the steps reset."""
    from dagcraft.orchestrator import transitions

    loop_id = view.state(child).parent
    assert loop_id is not None
    k = view.steps[child].iteration or 0
    children = view.fresh(loop_id).children
    same = [c for c in children if view.steps[c].iteration == k]
    deps = view.dependents()
    again = {child} | (view.descendants(child, deps) & set(same))
    ordered = [c for c in same if c in again]
    for c in ordered:
        transitions.reset(view, c, reason)
    for c in children:
        if (view.steps[c].iteration or 0) > k:
            transitions.retire(view, c, f"superseded: {reason}")
    transitions.reopen_loop(view, loop_id, [c for c in children if (view.steps[c].iteration or 0) <= k], reason)
    return ordered


def retry_from(store: Store, run_id: str, step: str) -> list[str]:
    """Reset ``step`` (a concrete id, or a template id meaning all its instances) and every
    step downstream of it to pending; earlier attempts' traces and history are kept.

    A loop body step (``polish#2.review``, or ``review`` meaning its latest iteration's)
    continues the loop from that step of that iteration: the steps after it in the iteration
    run again, later iterations are dropped (their records kept, retired), earlier ones are
    kept, ``until`` is evaluated again — and everything downstream of the loop is reset."""
    from dagcraft.orchestrator import transitions
    from dagcraft.orchestrator.view import LocalView
    from dagcraft.primitives.persist import ONCE

    view = LocalView(store, run_id, detail=True, persist=ONCE)
    _clear_corrupt(view)
    drop_summary(store, run_id)
    body = step if step in view.steps and view.steps[step].iteration is not None else _latest_body_step(view, step)
    reason = f"reset by retry --from {step}"
    again: list[str] = []
    if body is not None and view.state(body).parent:
        again = _reset_loop_from(view, body, reason)
        roots = [view.state(body).parent or body]
    else:
        roots = [s for s in view.steps if s == step or (view.steps[s].template_id == step and not view.state(s).parent)]
    if not roots:
        raise NotFound(f"step {step!r} not found in run {run_id!r}")
    deps = view.dependents()
    targets: set[str] = set()
    for r in roots:
        parent = view.state(r).parent
        if body is None:
            targets.add(parent or r)
        targets |= view.descendants(parent or r, deps)
    targets = {t for t in targets if not view.state(t).parent}
    ordered = [s for s in view.all_ids() if s in targets]
    for sid in ordered:
        transitions.reset(view, sid, reason)
    transitions.reopen(view, f"retry from {step}")
    _reindex(store, run_id)
    return again + ordered


def request_rollback(store: Store, run_id: str) -> str:
    """Start compensation of a finished run's succeeded steps (reverse topological order)."""
    from dagcraft.orchestrator import transitions
    from dagcraft.orchestrator.view import LocalView
    from dagcraft.primitives.persist import ONCE

    view = LocalView(store, run_id, detail=True, persist=ONCE)
    if view.control.status not in RUN_FINISHED:
        raise InvalidInput(f"run {run_id!r} is {view.control.status}; cancel it before rolling back")
    if view.control.status == "rolled_back":
        return "rolled_back"
    if not transitions.set_control(view, RunStatus.ROLLING_BACK, "rollback requested"):
        raise Conflict(f"run {run_id!r}: control changed; try again")
    _reindex(store, run_id)
    return "rolling_back"


def latest_attempt(store: Store, run_id: str, step: str) -> int:
    st = read_step_state(store, run_id, step)
    if st.attempt == 0:
        raise NotFound(f"step {step!r} of run {run_id!r} has not started")
    return st.attempt


def read_log(store: Store, run_id: str, step: str, attempt: int | None = None, stream: str = "stdout") -> bytes:
    n = attempt or latest_attempt(store, run_id, step)
    got = store.get(f"{layout.attempt_prefix(run_id, step, n)}/{stream}.log")
    if got is None and store.get(f"{layout.attempt_prefix(run_id, step, n)}/trace.jsonl") is not None:
        return b""  # the attempt finished without writing to this stream
    if got is None:
        if attempt is not None:  # an attempt that was never made will not come: say so
            made = read_step_state(store, run_id, step).attempt
            if n > made:
                raise NotFound(f"step {step!r} of run {run_id!r} has no attempt {n} "
                               f"({'none started' if not made else f'attempts 1-{made}'})")
        raise NotFound(f"no {stream} log for {run_id}/{step} attempt {n} (yet)")
    return got[0]


def read_log_or_stderr(store: Store, run_id: str, step: str, attempt: int | None = None) -> tuple[bytes, str | None]:
    """What plain ``logs RUN STEP`` prints: the attempt's stdout — or, when that is empty and
    the attempt did not succeed, its stderr, with a note saying so (None: no note). A failed
    step's cause is usually on stderr; printing nothing there would hide it."""
    n = attempt or latest_attempt(store, run_id, step)
    out = read_log(store, run_id, step, n, "stdout")
    if out:
        return out, None
    got = store.get(layout.step_state(run_id, step))
    st = load_state(got[0]) if got else None
    info = next((h for h in reversed(st.history) if h.attempt == n and h.kind == "run"), None) if st else None
    if info is None or info.status == "succeeded":
        return out, None
    err = read_log(store, run_id, step, n, "stderr")
    if not err:
        return out, f"attempt {n} {info.status} ({info.reason}) with empty stdout and stderr"
    return err, (f"attempt {n} {info.status} ({info.reason}); its stdout is empty, showing its stderr "
                 f"(--stream stdout or --stream stderr to choose)")


#: how often ``follow_log`` polls (2 GETs each: the log and the step state); a local read is free
FOLLOW_POLL_S_LOCAL = 0.2
FOLLOW_POLL_S_REMOTE = 1.0


def follow_log(store: Store, run_id: str, step: str, write: Callable[[bytes], None], attempt: int | None = None,
               stream: str = "stdout", *, poll_s: float | None = None, final_wait_s: float = 30.0,
               on_wait: Callable[[], None] | None = None) -> str:
    """Stream an attempt's ``stream`` log to ``write`` as its worker uploads it, and return
    how the attempt ended (an ``AttemptStatus``: ``succeeded``, ``failed``, ``cancelled`` …),
    or the step's status when it ended without that attempt starting (``skipped``, ``cancelled``).

    Waits for the step to start (the latest attempt, or attempt ``attempt``; ``on_wait`` is
    called once when it has to wait). The worker uploads
    a grown log every 0.5 s on a local store and every 3 s on S3 (``attempt.log_snapshot_interval``);
    this polls every ``poll_s`` (0.2 s local, 1 s remote: 2 GETs per poll). Once the attempt has
    ended it waits (up to ``final_wait_s``) for the attempt's trace, which is uploaded after the
    final logs, so the last lines are never cut off. NotFound (exit 4) when the run or step does not exist."""
    poll = poll_s if poll_s is not None else (FOLLOW_POLL_S_LOCAL if isinstance(store, LocalStore)
                                              else FOLLOW_POLL_S_REMOTE)
    def read_state() -> StepState:
        return read_step_state(store, run_id, step)

    st = read_state()
    waited = False
    while st.attempt < (attempt or 1):  # not started yet
        if st.status in TERMINAL or st.status == StepStatus.EXPANDED:
            return str(st.status)
        if not waited and on_wait is not None:
            on_wait()
        waited = True
        time.sleep(poll)
        st = read_state()
    n = attempt or st.attempt
    prefix = layout.attempt_prefix(run_id, step, n)
    sent = 0

    def pump() -> None:
        nonlocal sent
        got = store.get(f"{prefix}/{stream}.log")
        if got is not None and len(got[0]) > sent:
            write(got[0][sent:])
            sent = len(got[0])

    while True:
        pump()
        if not (st.status == StepStatus.RUNNING and st.attempt == n):
            break
        time.sleep(poll)
        st = read_state()
    # ended: its final logs land before its trace (both after the commit)
    deadline = time.monotonic() + final_wait_s
    while store.get(f"{prefix}/trace.jsonl") is None and time.monotonic() < deadline:
        time.sleep(poll)
    pump()
    ended = next((h for h in reversed(st.history) if h.attempt == n and h.kind == AttemptKind.RUN), None)
    return str(ended.status) if ended is not None else str(st.status)


def status_json(store: Store, run_id: str) -> str:
    return status_result(store, run_id).to_json()


_STEPS_MARK = "\x00steps\x00"


def dumps_status(st: dict[str, Any]) -> str:
    """:func:`run_status` as JSON: indented, with one compact line per step. (``indent=``
    makes ``json`` use its pure-Python encoder — over a second for 10,000 steps; each step
    line here is encoded in C.)"""
    return _dumps({k: v for k, v in st.items() if k != "steps"}, map(statusrows.encode_row, st.get("steps", [])))


def _dumps(fields: dict[str, Any], lines: Iterable[str]) -> str:
    text = json.dumps({**fields, "steps": _STEPS_MARK}, indent=2, sort_keys=True, default=str)
    joined = ",\n    ".join(lines)
    steps = f"[\n    {joined}\n  ]" if joined else "[]"
    return text.replace(json.dumps(_STEPS_MARK), steps, 1)
