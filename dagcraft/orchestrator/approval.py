"""Approval gates: list what waits, and decide a gate — from any host that reaches the store.

A step with ``approval:`` is moved to ``waiting_approval`` by the scheduler once its needs are
done and its ``when`` is true (``transitions.await_approval``). :func:`decide` is the one
way a person moves it on: one CAS from the waiting version (``transitions.decide_approval``),
so of concurrent deciders on any number of hosts exactly one wins and every other gets
:class:`~dagcraft.errors.Conflict` (exit 3) naming who decided and when. The decision — who
(``user@host`` or ``--as NAME``), when (store clock), why (the comment) — is kept in the
step's state (``approval``) and its journal entry. Approved, a gate's command runs next (a
pure gate succeeds at once); rejected, the step fails with reason kind ``rejected`` and its
dependents are skipped per ``on_failure``. A run whose workers left while it waited
continues with ``dagcraft resume`` after the decision.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from dagcraft.errors import InvalidInput, NotFound
from dagcraft.orchestrator import layout, transitions
from dagcraft.orchestrator.model import (
    RUN_FINISHED,
    AttemptInfo,
    AttemptKind,
    AttemptStatus,
    Decision,
    ReasonKind,
    StepState,
    StepStatus,
)
from dagcraft.orchestrator.ops import list_runs, load_states, read_record
from dagcraft.orchestrator.submission import user_at_host
from dagcraft.orchestrator.view import LocalView
from dagcraft.primitives.persist import ONCE
from dagcraft.primitives.store import Store
from dagcraft.tracing import Redactor, TraceWriter
from dagcraft.workflows import ConcreteStep

MAX_COMMENT = 2000


def decider() -> str:
    """``user@host``: who decides when ``--as`` is not given."""
    return user_at_host()


def decide(store: Store, run_id: str, step_id: str, approve: bool, *, by: str | None = None,
           comment: str | None = None) -> dict[str, Any]:
    """Approve or reject the waiting gate ``step_id`` of ``run_id``, exactly once. NotFound
    (exit 4) for an unknown run or step; Conflict (exit 3) when it was already decided (naming
    by whom and when) or is not waiting. Returns the step's approval record (JSON)."""
    who = (by or decider()).strip()
    if not who or len(who) > 200 or "\n" in who:
        raise InvalidInput("--as: a name of 1-200 characters on one line")
    if comment is not None and len(comment) > MAX_COMMENT:
        raise InvalidInput(f"--comment: at most {MAX_COMMENT} characters")
    view = LocalView(store, run_id, detail=True, persist=ONCE)
    if step_id not in view.steps:
        raise NotFound(f"run {run_id!r} has no step {step_id!r}")
    if view.steps[step_id].approval is None:
        raise InvalidInput(f"step {step_id!r} of run {run_id!r} has no approval gate")
    new = decide_view(view, step_id, Decision.APPROVED if approve else Decision.REJECTED, who, comment or None)
    assert new.approval is not None
    return {"run_id": run_id, "step": step_id, "status": str(new.status), **new.approval.model_dump(mode="json")}


def is_pure_gate(step: ConcreteStep) -> bool:
    """A step with only ``approval:``: approving it is what succeeds it."""
    return step.approval is not None and step.run is None and step.agent is None


def decide_view(view: LocalView, step_id: str, decision: Decision, by: str, comment: str | None) -> StepState:
    """Decide the gate through ``view`` (a decider, or a worker applying a timeout). The
    decision's trace (``attempts/approval-<n>/trace.jsonl``: ``run.started``, one
    ``x.dagcraft.approval`` event, ``run.finished``) is built first; the CAS that decides
    pins its head in the step's history, and only the winner uploads it, so ``trace verify``
    checks it like any attempt's."""
    cur = view.fresh(step_id)
    n = 1 + sum(1 for h in cur.history if h.kind is AttemptKind.APPROVAL)
    now = view.store.now()
    a = cur.approval
    with tempfile.TemporaryDirectory(prefix="dagcraft-gate-") as tmp:
        path = Path(tmp) / "trace.jsonl"
        trace = TraceWriter(path, view.run_id, redactor=Redactor(view.wf.secret_values()), fsync=False)
        trace.append("run.started", {"run": view.run_id, "workflow": view.record.name, "step": step_id,
                                     "attempt": n, "kind": "approval", "worker": by})
        trace.append("x.dagcraft.approval", {"step": step_id, "decision": str(decision), "by": by,
                                             "comment": comment, "prompt": a.prompt if a else None,
                                             "requested_at": a.requested_at if a else None, "decided_at": now})
        ok = decision is Decision.APPROVED
        trace.append("run.finished", {"status": "succeeded" if ok else "failed", "step": step_id, "attempt": n,
                                      "exit_code": None, "reason": f"{decision} by {by}",
                                      "reason_kind": None if ok else str(ReasonKind.REJECTED)})
        head = trace.head()
        trace.close()
        info = AttemptInfo(attempt=n, status=AttemptStatus.SUCCEEDED if ok else AttemptStatus.FAILED,
                           kind=AttemptKind.APPROVAL, worker=by, started_at=a.requested_at if a else now,
                           finished_at=now, reason=f"{decision} by {by}" + (f": {comment}" if comment else ""),
                           reason_kind=None if ok else ReasonKind.REJECTED, trace_head=head)
        new = transitions.decide_approval(view, step_id, decision, by, comment,
                                          pure_gate=is_pure_gate(view.steps[step_id]), record=info)
        key = f"{layout.attempt_prefix(view.run_id, step_id, info.name)}/trace.jsonl"
        view.persist.call(lambda: view.store.put_file(key, path), what=f"upload {step_id} approval trace")
    return new


def waiting(store: Store) -> list[dict[str, Any]]:
    """Every gate waiting for a decision, across the unfinished runs of the store (oldest
    request first), with the commands that decide it."""
    out: list[dict[str, Any]] = []
    for run in list_runs(store):
        if run.get("corrupt") or run["status"] in RUN_FINISHED:
            continue
        try:
            rec = read_record(store, run["run_id"])
            states = load_states(store, run["run_id"], rec)
        except NotFound:
            continue
        for st in states.values():
            if st.status != StepStatus.WAITING_APPROVAL or st.approval is None:
                continue
            a = st.approval
            out.append({"run_id": run["run_id"], "name": rec.name, "step": st.step_id, "prompt": a.prompt,
                        "requested_at": a.requested_at, "deadline": a.deadline, "on_timeout": str(a.on_timeout),
                        "approve": f"dagcraft approve {run['run_id']} {st.step_id}",
                        "reject": f"dagcraft reject {run['run_id']} {st.step_id}"})
    out.sort(key=lambda w: (w["requested_at"], w["run_id"], w["step"]))
    return out
