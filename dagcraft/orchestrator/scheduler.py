"""The scheduler: decides what of one run is ready, and claims it.

Each cycle looks only at the run's open steps (pending or retrying) and, while a run rolls
back, at its compensable steps — never at the whole DAG. Every decision (skip, fail, expand,
claim) is a transition of ``transitions.py``, confirmed by CAS, so any number of schedulers
on any number of hosts can work on the same run: each transition happens once, and a stale
view costs at most a lost race. What it claims it returns as typed :class:`WorkItem`s for
the executor (``attempt.py``).
"""

from __future__ import annotations

import bisect
import functools
import random
from dataclasses import dataclass, field
from typing import Any

from dagcraft.errors import Conflict, DagcraftError, InvalidInput
from dagcraft.orchestrator import approval, context, layout, transitions
from dagcraft.orchestrator.model import AttemptKind, Decision, ReasonKind, RunStatus, StepState, StepStatus
from dagcraft.orchestrator.steptable import Dependents
from dagcraft.orchestrator.transitions import Hold
from dagcraft.orchestrator.view import LocalView
from dagcraft.primitives import lease as leases
from dagcraft.primitives.semaphore import Semaphore
from dagcraft.tracing import Redactor
from dagcraft.workflows import (
    CompiledWorkflow,
    ConcreteStep,
    RenderContext,
    evaluate_foreach,
    evaluate_until,
    evaluate_when,
    expand_foreach,
    expand_loop,
    is_plain_success,
    succeeded,
)

ALWAYS_MARKERS = ("always()", "failure()", "cancelled()")


@dataclass
class WorkItem:
    """A claimed attempt (of a step's command, or of its compensation) and everything it
    needs, captured at claim time."""

    hold: Hold
    wf: CompiledWorkflow
    step: ConcreteStep
    spec_dir: str | None
    run_name: str
    ctx: RenderContext
    #: template id -> concrete ids (fan-out templates have several), among the step's ancestors
    instances: dict[str, list[str]] = field(default_factory=dict)
    #: concrete step id -> artifact name -> pointer, for the transitive needs
    upstream_artifacts: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    semaphores: list[Semaphore] = field(default_factory=list)
    semaphore_leases: list[leases.Lease] = field(default_factory=list)

    @property
    def kind(self) -> AttemptKind:
        return self.hold.kind

    @property
    def run_id(self) -> str:
        return self.hold.run_id


class Scheduler:
    """Scheduling of one run from one worker."""

    def __init__(self, view: LocalView, worker_id: str, lease_ttl: float) -> None:
        self.view = view
        self.worker_id = worker_id
        self.lease_ttl = lease_ttl
        self._decided: dict[str, int] = {}  # step -> state rev whose `when` evaluated true
        self._full: set[str] = set()
        self._rng = random.Random(f"{worker_id}/{view.run_id}")
        #: the candidates (see _candidates), in scheduling order, and each one's sort key
        self._order: list[tuple[int, str]] | None = None
        self._order_key: dict[str, tuple[int, str]] = {}
        self._dependents: Dependents | None = None  # built at the first call of _candidates
        self._known: set[str] = set()  # foreach children and loop body steps seen
        self._base = 0  # steps at the first call: all others are children

    def _candidates(self) -> list[tuple[int, str]]:
        """Open steps whose needs are all terminal (or retrying), in scheduling order: a
        superset of the ready steps, kept up to date from the steps the view re-indexed since
        the last call (each, and the steps that need it), so a cycle costs what changed, not
        the size of the DAG nor of the ready set (kept sorted: never sorted again per cycle)."""
        view = self.view
        touched, view.touched = view.touched, set()
        if self._order is None:
            self._dependents = Dependents(view.steps)
            self._base = len(view.steps)
            self._order_key = {sid: (view.rank(sid), sid) for sid in view.open_ids if self._eligible(sid)}
            self._order = sorted(self._order_key.values())
            return self._order
        recheck = set(touched)
        assert self._dependents is not None  # built with _order
        for sid in touched:
            if sid in view.steps and view.steps.position(sid) >= self._base and sid not in self._known:  # a child, new to us
                self._known.add(sid)
                self._dependents.add(sid, view.steps.needs_of(sid))
            recheck.update(self._dependents.of(sid))
        order, keys = self._order, self._order_key
        for sid in recheck:
            if sid in view.open_ids and self._eligible(sid):
                if sid not in keys:
                    keys[sid] = (view.rank(sid), sid)
                    bisect.insort(order, keys[sid])
            elif sid in keys:
                del order[bisect.bisect_left(order, keys.pop(sid))]
        return order

    def _eligible(self, sid: str) -> bool:
        # a retrying step's needs were done when it first ran; ready() decides its time
        return self.view.status(sid) == StepStatus.RETRYING or self.view.needs_done(sid)

    def ready(self) -> list[str]:
        """The ready steps, in scheduling order: the candidates less the retrying steps whose
        wait has not passed and the foreach children their parent has not expanded to. The
        candidates' needs are not checked again here (every cycle, for every ready step):
        :meth:`decide` checks them for the step it is about to claim."""
        view = self.view
        now = None
        out = []
        known = self._known
        for _, sid in self._candidates():
            if sid in known:
                parent = view.parent(sid)
                if parent and sid not in view.children(parent):
                    continue  # a foreach child runs only once its parent has expanded to it
            if view.status(sid) == StepStatus.RETRYING:
                now = now if now is not None else view.store.now()
                if (view.state(sid).not_before or 0) > now:
                    continue
            out.append(sid)
        return out

    def settle_parents(self) -> None:
        """A foreach parent finishes when all its children have; a loop, when its current
        iteration's body steps have (then it iterates again, or finishes)."""
        view = self.view
        for sid in view.ids(view.expanded_ids):
            st = view.state(sid)
            if not all(view.is_terminal(c) for c in st.children):
                continue
            if view.steps[sid].loop is not None:
                self._settle_loop(sid)
                continue
            kids = [view.status(c) for c in st.children]
            if StepStatus.FAILED in kids:
                status = StepStatus.FAILED
            elif StepStatus.CANCELLED in kids:
                status = StepStatus.CANCELLED
            elif all(k == StepStatus.SKIPPED for k in kids):
                status = StepStatus.SKIPPED  # e.g. not started after a failure elsewhere
            else:
                status = StepStatus.SUCCEEDED
            transitions.settle_parent(view, sid, status)

    def _settle_loop(self, sid: str) -> None:
        """Iteration k of loop ``sid`` is done: a failed (cancelled) body step fails (cancels)
        the loop; else ``until`` is evaluated over the iteration's results — true: the loop
        succeeded; false: iteration k+1 starts, or at ``max_iterations`` ``on_max`` decides.
        While the run is failing no new iteration starts (the loop is skipped)."""
        view = self.view
        step = view.steps[sid]
        assert step.loop is not None
        k = max((view.steps[c].iteration or 0) for c in view.state(sid).children)
        current = context.iteration_ids(view, sid, k)
        kids = {c: view.status(c) for c in current}
        failed = [c for c, k_st in kids.items() if k_st == StepStatus.FAILED]
        if failed:
            transitions.settle_parent(view, sid, StepStatus.FAILED, reason=f"iteration {k}: step {failed[0]!r} failed",
                                      reason_kind=view.state(failed[0]).reason_kind,
                                      outputs={"iterations": k, "until": None})
            return
        if StepStatus.CANCELLED in kids.values():
            transitions.settle_parent(view, sid, StepStatus.CANCELLED, reason=f"iteration {k} was cancelled",
                                      reason_kind=ReasonKind.CANCELLED, outputs={"iterations": k, "until": None})
            return
        try:
            done = evaluate_until(step, context.for_until(view, sid, k))
        except DagcraftError as exc:
            reason = Redactor(view.wf.secret_values()).redact(f"until: {exc}")
            transitions.settle_parent(view, sid, StepStatus.FAILED, reason=reason,
                                      reason_kind=ReasonKind.CONDITION_ERROR, outputs={"iterations": k, "until": None})
            return
        out = {"iterations": k, "until": done}
        loop = step.loop
        if done:
            transitions.settle_parent(view, sid, StepStatus.SUCCEEDED, reason=f"until true after iteration {k}",
                                      outputs=out)
        elif view.failing() and view.wf.on_failure in ("stop", "rollback"):
            transitions.settle_parent(view, sid, StepStatus.SKIPPED, reason=f"not continued after iteration {k}: "
                                      f"a step failed (on_failure: {view.wf.on_failure})", outputs=out)
        elif k < loop.max_iterations:
            children = expand_loop(step, k + 1)
            transitions.iterate(view, sid, [StepState(step_id=c.id, definition=c.model_dump(mode="json"), parent=sid)
                                            for c in children])
        elif loop.on_max == "continue":
            transitions.settle_parent(view, sid, StepStatus.SUCCEEDED, reason=f"max_iterations {loop.max_iterations} "
                                      "reached with until still false (on_max: continue)", outputs=out)
        else:
            transitions.settle_parent(view, sid, StepStatus.FAILED, reason=f"loop {sid!r} reached max_iterations "
                                      f"{loop.max_iterations} with until still false (on_max: fail)",
                                      reason_kind=ReasonKind.MAX_ITERATIONS, outputs=out)

    def decide(self, capacity: int) -> list[WorkItem]:
        """Skip, expand, or claim ready steps; returns what to execute (at most ``capacity``)."""
        view = self.view
        ctl = view.control.status
        if ctl == RunStatus.ROLLING_BACK:
            compensations = self._claim_compensations(capacity)
            if compensations or view.pending_compensations():
                return compensations
            # the compensations are done: the finally steps run now, after the rollback
        elif ctl != RunStatus.RUNNING:
            return []
        self.settle_parents()
        claims: list[WorkItem] = []
        self._full = set()  # semaphores found full this cycle: not retried for every step
        failing = view.failing() and view.wf.on_failure in ("stop", "rollback")
        self._gates(failing)
        ready = self.ready()
        # each worker walks the ready set from its own random point, so that workers racing
        # for work mostly claim different steps instead of losing CAS races on the same one
        if len(ready) > 1:
            k = self._rng.randrange(len(ready))
            ready = ready[k:] + ready[:k]
        rollback_due: bool | None = None  # computed once, only when a finally step is ready
        for sid in ready:
            decided = not failing and self._decided_true(sid)
            if decided and len(claims) >= capacity:
                continue  # nothing to decide, nothing more to claim: the cheap common case
            if view.steps.attr(sid, "is_finally") and ctl == RunStatus.RUNNING:
                rollback_due = view.rollback_due() if rollback_due is None else rollback_due
                if rollback_due:
                    continue  # finally steps run after the rollback's compensations
            if not decided and not self._decide_one(sid, failing):
                continue
            if len(claims) >= capacity:
                continue
            max_parallel = view.wf.max_parallel
            if max_parallel is not None and sum(
                    1 for s in view.active_ids if view.status(s) == StepStatus.RUNNING) >= max_parallel:
                continue
            if view.status(sid) == StepStatus.PENDING and not view.needs_done(sid):
                continue  # the candidate set's invariant, checked where it matters: at a claim
            item = self.claim(sid)
            if item is not None:
                claims.append(item)
        return claims

    def _decided_true(self, sid: str) -> bool:
        """Whether ready step ``sid`` is known to be claimable as it is: retrying (its condition
        was decided before its first attempt), or its ``when`` already evaluated true for this
        version of it. Answered without building its model or record: every cycle walks the
        whole ready set, and in a wide DAG most of it waits for a free slot."""
        view = self.view
        if view.status(sid) != StepStatus.PENDING:
            return True
        return self._decided.get(sid, -1) == (view.states.rev(sid) or 0)

    def _decide_one(self, sid: str, failing: bool) -> bool:
        """Whether a ready step should be claimed now (else it was skipped, failed or expanded)."""
        view = self.view
        if view.status(sid) != StepStatus.PENDING:
            return True  # retrying: its condition was decided before its first attempt
        if not failing and self._decided_true(sid):
            return True
        # read from the step's shape: the common case (a plain condition, no gate, fan-out or
        # loop) builds neither the step's model nor a template context
        attr = functools.partial(view.steps.attr, sid)
        when, is_finally = attr("when"), attr("is_finally")
        st = view.state(sid)
        always = is_finally or any(m in when for m in ALWAYS_MARKERS)
        if failing and not always:
            transitions.skip(view, sid, f"not started: a step failed (on_failure: {view.wf.on_failure})")
            return False
        if is_finally and is_plain_success(when):
            ok = True  # finally steps run whatever happened before them
        elif is_plain_success(when):
            ok = succeeded(view.needs_status(sid))  # an engine's context: the run is not cancelled
        else:
            try:
                # most conditions are about statuses only: read step data only if used
                ctx = context.for_step(view, sid, with_steps="steps" in when)
                ok = evaluate_when(view.steps[sid], ctx, view.needs_status(sid))
            except DagcraftError as exc:
                transitions.fail_unstarted(view, sid, f"when: {exc}")
                return False
        if not ok:
            # say which needs made an implicit success() false, not only that it was false
            bad = [f"{n} {ns}" for n, ns in view.needs_status(sid).items() if ns != "succeeded"]
            transitions.skip(view, sid, "when condition is false" + (f" ({', '.join(bad)})" if bad else ""))
            return False
        # a foreach parent's gate is decided once for all its children
        approval = attr("approval")
        if approval is not None and not st.parent and (st.approval is None or st.approval.decision is None):
            transitions.await_approval(view, sid, approval.prompt, approval.timeout,
                                       Decision.APPROVED if approval.on_timeout == "approve" else Decision.REJECTED)
            return False
        if attr("foreach") and not st.children:
            self._expand(sid)
            return False
        if attr("loop") is not None:
            children = expand_loop(view.steps[sid], 1)
            transitions.expand(view, sid, [StepState(step_id=c.id, definition=c.model_dump(mode="json"), parent=sid)
                                           for c in children])
            return False
        # needs are terminal, so the answer cannot change until the step itself does
        self._decided[sid] = st.rev
        return True

    def _gates(self, failing: bool) -> None:
        """Waiting approval gates: skipped once the run is failing (like any unstarted step),
        decided by their declared default once their deadline passed on the store's clock."""
        view = self.view
        if not view.waiting_ids:
            return
        now = view.store.now()
        for sid in view.ids(view.waiting_ids):
            step = view.steps[sid]
            a = view.state(sid).approval
            if failing and not (step.is_finally or any(m in step.when for m in ALWAYS_MARKERS)):
                transitions.skip(view, sid, f"not started: a step failed (on_failure: {view.wf.on_failure})")
            elif a is not None and a.deadline is not None and a.deadline <= now:
                try:
                    approval.decide_view(view, sid, a.on_timeout, "timeout",
                                         f"no decision within {a.deadline - a.requested_at:g}s")
                except Conflict:
                    pass  # a person (or another worker) decided it first

    def _expand(self, sid: str) -> None:
        step = self.view.steps[sid]
        try:
            items = evaluate_foreach(step, context.for_step(self.view, sid))
            if Redactor(self.view.wf.secret_values()).redact(items) != items:
                # a child's item is stored (its definition, its id): refused, never redacted
                raise InvalidInput("an item holds a secret or a credential; secrets never reach the store")
            children = expand_foreach(step, items)
        except DagcraftError as exc:
            transitions.fail_unstarted(self.view, sid, f"foreach: {exc}")
            return
        transitions.expand(self.view, sid, [StepState(step_id=c.id, definition=c.model_dump(mode="json"), parent=sid)
                                            for c in children])

    def _semaphores(self, step: ConcreteStep) -> list[Semaphore]:
        view = self.view
        sems = []
        if view.wf.max_parallel is not None:
            sems.append(Semaphore(view.store, layout.parallel_semaphore(view.run_id), view.wf.max_parallel,
                                  self.lease_ttl))
        agent = view.wf.agents.get(step.agent) if step.agent else None
        if agent is not None and agent.max_concurrent and step.agent:
            sems.append(Semaphore(view.store, layout.agent_semaphore(step.agent), agent.max_concurrent,
                                  self.lease_ttl))
        return sems

    def claim(self, sid: str) -> WorkItem | None:
        view = self.view
        just_read = view.etag(sid) is None or sid in view.stale
        if just_read:
            if view.refresh_step(sid).status not in (StepStatus.PENDING, StepStatus.RETRYING):
                return None  # known only by status: read its etag and details once
        sems = self._semaphores(view.steps[sid])
        if any(sem.key_prefix in self._full for sem in sems):
            return None
        held: list[leases.Lease] = []
        for sem in sems:
            got = sem.try_acquire(f"{self.worker_id}/{view.run_id}/{sid}")
            if got is None:
                self._full.add(sem.key_prefix)
                _release_all(sems, held)
                return None
            held.append(got)
        # just read: not again (a step never written has no record, so no etag says it was read)
        hold = transitions.claim(view, sid, self.worker_id, self.lease_ttl, fresh=not just_read)
        if hold is None:
            _release_all(sems, held)
            return None
        return self._work(sid, hold, sems, held)

    def _work(self, sid: str, hold: Hold, sems: list[Semaphore] | None = None,
              held: list[leases.Lease] | None = None) -> WorkItem:
        view = self.view
        rollback = hold.kind is AttemptKind.ROLLBACK
        instances: dict[str, list[str]] = {}
        upstream: dict[str, dict[str, dict[str, Any]]] = {}
        if rollback or view.reads_upstream(sid):
            ctx = context.for_step(view, sid, include_self=rollback)
            instances = self._instances(view.context_ids(sid))
            upstream = {} if rollback else self._upstream_artifacts(sid)
        else:
            # nothing of an upstream step can reach its templates, inputs or workdir: its
            # ancestors' records are not decoded (a step deep in a DAG has hundreds of them)
            ctx = context.for_step(view, sid, with_steps=False)
        return WorkItem(hold=hold, wf=view.wf, step=view.steps[sid], spec_dir=view.record.spec_dir,
                        run_name=view.record.name, ctx=ctx, instances=instances, upstream_artifacts=upstream,
                        semaphores=sems or [], semaphore_leases=held or [])

    def _instances(self, among: set[str]) -> dict[str, list[str]]:
        """template id -> concrete ids, for the steps ``among`` (a step's ancestors)."""
        out: dict[str, list[str]] = {}
        for sid in self.view.ids(among):
            step = self.view.steps[sid]
            st = self.view.state(sid)
            if st.parent:
                if step.iteration is not None:  # a loop body step: its latest iteration among ``among``
                    prev = out.get(step.template_id)
                    if not prev or (self.view.steps[prev[0]].iteration or 0) < step.iteration:
                        out[step.template_id] = [sid]
                continue
            out.setdefault(step.template_id, []).extend((st.children if step.loop is None else []) or [sid])
        return out

    def _upstream_artifacts(self, sid: str) -> dict[str, dict[str, dict[str, Any]]]:
        seen: set[str] = set()
        stack = list(self.view.needs(sid))
        out: dict[str, dict[str, dict[str, Any]]] = {}
        while stack:
            cur = stack.pop()
            if cur in seen or cur not in self.view.steps:
                continue
            seen.add(cur)
            st = self.view.state(cur)
            if st.artifacts:
                out[cur] = st.artifacts
            stack.extend(st.children)
            stack.extend(self.view.needs(cur))
        return out

    # -- rollback ------------------------------------------------------------------------------
    def compensable(self, sid: str, deps: dict[str, set[str]]) -> bool:
        """True when ``sid`` succeeded, has a rollback command, and nothing downstream of it is
        still waiting to be (or being) compensated: compensations run in reverse topological
        order."""
        view = self.view
        if view.status(sid) != StepStatus.SUCCEEDED or not view.steps.attr(sid, "compensates"):
            return False
        return not any(view.steps.attr(d, "compensates") and view.status(d) in (StepStatus.SUCCEEDED, StepStatus.ROLLING_BACK)
                       for d in view.descendants(sid, deps))

    def _claim_compensations(self, capacity: int) -> list[WorkItem]:
        view = self.view
        deps = view.dependents()
        out: list[WorkItem] = []
        for sid in reversed(view.all_ids()):
            if len(out) >= capacity:
                break
            if not self.compensable(sid, deps):
                continue
            hold = transitions.compensate(view, sid, self.worker_id, self.lease_ttl)
            if hold is not None:
                out.append(self._work(sid, hold))
        return out


def _release_all(sems: list[Semaphore], held: list[leases.Lease]) -> None:
    for sem, lease in zip(sems, held, strict=False):
        try:
            sem.release(lease)
        except DagcraftError:
            pass  # an unreleased slot expires after its TTL
