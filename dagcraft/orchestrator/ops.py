"""Run operations: status, listing, cancel, resume, retry-from, rollback, logs.

Each is a CAS on run control and/or step states followed by a journal entry, so it is safe
while workers are running anywhere: a worker that raced it sees a failed CAS and re-reads.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from dagcraft.errors import Conflict, InvalidInput, NotFound
from dagcraft.orchestrator import journal, layout
from dagcraft.orchestrator.model import (
    RUN_FINISHED,
    Control,
    RunRecord,
    StepState,
    dump,
    load_control,
    load_state,
)
from dagcraft.orchestrator.run_view import LocalView
from dagcraft.orchestrator.supervisor import cas_state, set_control
from dagcraft.primitives.store import Store
from dagcraft.primitives.ulid import new_ulid


def read_record(store: Store, run_id: str) -> RunRecord:
    got = store.get(layout.run_record(run_id))
    if got is None:
        raise NotFound(f"run {run_id!r} not found in {store.url}")
    return RunRecord.model_validate_json(got[0])


def read_control(store: Store, run_id: str) -> Control:
    got = store.get(layout.control(run_id))
    return load_control(got[0]) if got else Control()


def load_states(store: Store, run_id: str) -> dict[str, StepState]:
    """Every step state of a run, foreach children included (one LIST, one GET per step)."""
    states: dict[str, StepState] = {}
    for key in store.list(layout.steps_prefix(run_id)):
        if key.endswith("/state.json"):
            got = store.get(key)
            if got:
                st = load_state(got[0])
                states[st.step_id] = st
    return states


def ordered_states(rec: RunRecord, states: dict[str, StepState]) -> list[tuple[StepState, str | None]]:
    """(state, foreach parent) in compiled order, each parent followed by its children."""
    out: list[tuple[StepState, str | None]] = []
    seen: set[str] = set()
    order = rec.order or list(rec.workflow.get("steps", {}))
    for sid in order + sorted(set(states) - set(order)):
        if sid in seen:
            continue
        seen.add(sid)
        st = states.get(sid, StepState(step_id=sid))
        out.append((st, st.parent))
        for child in st.children:
            if child not in seen:
                seen.add(child)
                out.append((states.get(child, StepState(step_id=child)), sid))
    return out


def run_status(store: Store, run_id: str) -> dict[str, Any]:
    """Run record summary, control, and every step's state (reads each step once)."""
    rec = read_record(store, run_id)
    ctl = read_control(store, run_id)
    steps = [{
        "step": st.step_id, "status": st.status, "attempt": st.attempt, "worker": st.worker,
        "started_at": st.started_at, "finished_at": st.finished_at, "reason": st.reason,
        "exit_code": st.exit_code, "outputs": st.outputs, "artifacts": sorted(st.artifacts),
        "cached_from": st.cached_from, "parent": parent, "children": st.children,
    } for st, parent in ordered_states(rec, load_states(store, run_id))]
    counts: dict[str, int] = {}
    for s in steps:
        counts[str(s["status"])] = counts.get(str(s["status"]), 0) + 1
    return {"run_id": run_id, "name": rec.name, "status": ctl.status, "reason": ctl.reason,
            "submitted_at": rec.submitted_at, "submitted_by": rec.submitted_by, "finished_at": ctl.finished_at,
            "spec_hash": rec.spec_hash, "params": rec.params, "counts": counts, "steps": steps}


def list_runs(store: Store, status: str | None = None) -> list[dict[str, Any]]:
    """Every run in the store, newest first (two GETs per run)."""
    out: dict[str, dict[str, Any]] = {}
    for key in store.list(layout.RUNS_INDEX):
        run_id = key.rsplit("~", 1)[-1]
        if run_id in out:
            continue
        try:
            rec = read_record(store, run_id)
        except NotFound:
            continue
        ctl = read_control(store, run_id)
        out[run_id] = {"run_id": run_id, "name": rec.name, "status": ctl.status, "submitted_at": rec.submitted_at,
                       "finished_at": ctl.finished_at, "reason": ctl.reason}
    runs = sorted(out.values(), key=lambda r: r["submitted_at"], reverse=True)
    if status:
        runs = [r for r in runs if r["status"] == status]
    return runs


def _reindex(store: Store, run_id: str) -> None:
    # workers serving every run discover reopened runs through a fresh index entry
    store.put(layout.runs_index_entry(new_ulid(), run_id), b"", if_none_match=True)


def _retire(view: LocalView, sid: str, reason: str) -> None:
    """A foreach child of a reset parent: terminal until the parent expands again (which may
    produce different items, and revives the children it still has)."""
    for _ in range(5):
        st = view.state(sid).model_copy(deep=True)
        if st.status == "skipped":
            return
        st.status = "skipped"
        st.reason = reason
        if cas_state(view, st, view.etag(sid)):
            return
    raise Conflict(f"step {sid!r} kept changing; try again")


def _reset(view: LocalView, sid: str, reason: str) -> None:
    for _ in range(5):
        st = view.state(sid).model_copy(deep=True)
        for child in st.children:
            _retire(view, child, f"superseded: {reason}")
        st.status = "pending"
        st.reason = reason
        st.outputs, st.artifacts = {}, {}
        st.failures = st.lost_attempts = 0
        st.not_before = st.finished_at = st.lease_expires_at = None
        st.worker = None
        st.rollback = None
        st.children = []
        st.exit_code = None
        st.cached_from = None
        if cas_state(view, st, view.etag(sid)):
            return
    raise Conflict(f"step {sid!r} kept changing; try again")


def _reopen(view: LocalView, reason: str) -> None:
    for _ in range(5):
        if view.control.status == "running":
            break
        ctl = view.control.model_copy()
        ctl.generation += 1
        ctl.status = "running"
        ctl.reason = reason
        ctl.finished_at = None
        ctl.updated_at = view.store.now()
        try:
            view.control_etag = view.store.put(layout.control(view.run_id), dump(ctl), if_match=view.control_etag) \
                if view.control_etag else view.store.put(layout.control(view.run_id), dump(ctl), if_none_match=True)
            view.control = ctl
            journal.append(view.store, view.run_id, layout.CONTROL_MARK)
            break
        except Conflict:
            view.refresh_control()
    _reindex(view.store, view.run_id)


def cancel(store: Store, run_id: str, reason: str = "cancelled by user") -> str:
    """Ask every worker to stop the run: running steps are signalled, nothing new starts.
    Returns the run status after the request."""
    view = LocalView(store, run_id, detail=True)
    for _ in range(5):
        if view.control.status in RUN_FINISHED or view.control.status == "cancelling":
            return view.control.status
        if set_control(view, "cancelling", reason):
            return "cancelling"
    raise Conflict(f"run {run_id!r}: control kept changing; try again")


def prepare_resume(store: Store, run_id: str, *, retry_failed: bool = False) -> str:
    """Make an interrupted run continuable. Succeeded steps are never reset. With
    ``retry_failed``, failed steps and the steps skipped or cancelled because of them go back
    to pending. Returns the run status afterwards."""
    view = LocalView(store, run_id, detail=True)
    status = view.control.status
    resettable = {"cancelled"} | ({"failed"} if retry_failed else set())
    if status == "succeeded":
        return status
    if status in RUN_FINISHED or status == "cancelling":
        if status in ("failed", "rolled_back") and not retry_failed:
            return status
        reset = [s for s in view.all_ids() if view.status(s) in resettable and not view.state(s).parent]
        if retry_failed:
            reset += [s for s in view.all_ids() if view.status(s) in ("skipped", "cancelled")
                      and not view.state(s).parent and s not in reset]
        for sid in reset:
            _reset(view, sid, "reset by resume")
        _reopen(view, "resumed")
    else:
        _reindex(store, run_id)
    return view.control.status


def retry_from(store: Store, run_id: str, step: str) -> list[str]:
    """Reset ``step`` (a concrete id, or a template id meaning all its instances) and every
    step downstream of it to pending; earlier attempts' traces and history are kept."""
    view = LocalView(store, run_id, detail=True)
    roots = [s for s in view.steps if s == step or (view.steps[s].template_id == step and not view.state(s).parent)]
    if not roots:
        raise NotFound(f"step {step!r} not found in run {run_id!r}")
    deps = view.dependents()
    targets: set[str] = set()
    for r in roots:
        parent = view.state(r).parent
        targets.add(parent or r)
        targets |= view.descendants(parent or r, deps)
    targets = {t for t in targets if not view.state(t).parent}
    ordered = [s for s in view.all_ids() if s in targets]
    for sid in ordered:
        _reset(view, sid, f"reset by retry --from {step}")
    _reopen(view, f"retry from {step}")
    return ordered


def request_rollback(store: Store, run_id: str) -> str:
    """Start compensation of a finished run's succeeded steps (reverse topological order)."""
    view = LocalView(store, run_id, detail=True)
    if view.control.status not in RUN_FINISHED:
        raise InvalidInput(f"run {run_id!r} is {view.control.status}; cancel it before rolling back")
    if view.control.status == "rolled_back":
        return "rolled_back"
    if not set_control(view, "rolling_back", "rollback requested"):
        raise Conflict(f"run {run_id!r}: control changed; try again")
    _reindex(store, run_id)
    return "rolling_back"


def latest_attempt(store: Store, run_id: str, step: str) -> int:
    got = store.get(layout.step_state(run_id, step))
    if got is None:
        read_record(store, run_id)
        raise NotFound(f"step {step!r} not found in run {run_id!r}")
    st = load_state(got[0])
    if st.attempt == 0:
        raise NotFound(f"step {step!r} of run {run_id!r} has not started")
    return st.attempt


def read_log(store: Store, run_id: str, step: str, attempt: int | None = None, stream: str = "stdout") -> bytes:
    n = attempt or latest_attempt(store, run_id, step)
    got = store.get(f"{layout.attempt_prefix(run_id, step, n)}/{stream}.log")
    if got is None and store.get(f"{layout.attempt_prefix(run_id, step, n)}/trace.jsonl") is not None:
        return b""  # the attempt finished without writing to this stream
    if got is None:
        raise NotFound(f"no {stream} log for {run_id}/{step} attempt {n} (yet)")
    return got[0]


def follow_log(store: Store, run_id: str, step: str, attempt: int | None = None,
               poll_s: float = 1.0) -> Iterator[bytes]:
    """Yield new stdout bytes of an attempt as its worker uploads them (at each heartbeat and
    at the end) until the attempt is over."""
    sent = 0
    while True:
        n = attempt or latest_attempt(store, run_id, step)
        got = store.get(f"{layout.attempt_prefix(run_id, step, n)}/stdout.log")
        if got is not None and len(got[0]) > sent:
            yield got[0][sent:]
            sent = len(got[0])
        st = store.get(layout.step_state(run_id, step))
        state = load_state(st[0]) if st else None
        if state is None or not (state.status == "running" and state.attempt == n):
            got = store.get(f"{layout.attempt_prefix(run_id, step, n)}/stdout.log")
            if got is not None and len(got[0]) > sent:
                yield got[0][sent:]
            return
        time.sleep(poll_s)


def status_json(store: Store, run_id: str) -> str:
    return json.dumps(run_status(store, run_id), indent=2, sort_keys=True, default=str)
