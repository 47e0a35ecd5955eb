"""The worker: reads run journals, claims ready steps by CAS, runs them, commits.

A worker serves every run in the store (discovered through ``runs-index/``) or one run. Each
cycle costs one LIST per served run plus one GET per changed record — never a scan of the
DAG. Claims, skips, foreach expansions and compensations are all CAS transitions, so any
number of workers on any number of hosts can run the same run: each transition happens once.
The supervisor role (see ``supervisor.py``) is held by whichever worker holds the run's
supervisor lease.

Signals: SIGTERM drains (finish running steps, claim nothing new); SIGINT, or a second
SIGTERM, hands running steps back (their children are killed and the steps return to pending
for the next worker, without counting as failures).
"""

from __future__ import annotations

import queue
import random
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from dagcraft.errors import Conflict, DagcraftError, NotFound, StoreUnavailable
from dagcraft.orchestrator import journal, layout, supervisor
from dagcraft.orchestrator.attempt import Attempt, Claimed, WorkerConfig
from dagcraft.orchestrator.model import RUN_FINISHED, StepState
from dagcraft.orchestrator.rollback import Compensation, compensation_ready
from dagcraft.orchestrator.run_view import LocalView
from dagcraft.primitives import lease as leases
from dagcraft.primitives.semaphore import Semaphore
from dagcraft.workflows import RenderContext, evaluate_foreach, evaluate_when, expand_foreach

ALWAYS_MARKERS = ("always()", "failure()", "cancelled()")


class RunDriver:
    """Scheduling and supervision of one run from one worker."""

    def __init__(self, cfg: WorkerConfig, run_id: str) -> None:
        self.cfg = cfg
        self.run_id = run_id
        self.view = LocalView(cfg.store, run_id)
        self.sup: leases.Lease | None = None
        self._sup_next = 0.0
        self._ctx: tuple[int, RenderContext] | None = None
        self._decided: dict[str, int] = {}  # step -> state rev whose `when` evaluated true
        self._full: set[str] = set()
        self._rng = random.Random(f"{cfg.worker_id}/{run_id}")

    @property
    def finished(self) -> bool:
        return self.view.control.status in RUN_FINISHED

    # -- supervisor lease ----------------------------------------------------------------
    def supervise(self) -> None:
        now = time.monotonic()
        key = layout.supervisor(self.run_id)
        if now >= self._sup_next:
            self._sup_next = now + self.cfg.heartbeat_s
            try:
                if self.sup is None:
                    self.sup = leases.acquire(self.cfg.store, key, self.cfg.worker_id, self.cfg.lease_ttl)
                else:
                    self.sup = leases.renew(self.cfg.store, self.sup, self.cfg.lease_ttl)
            except Conflict:
                self.sup = None
        if self.sup is not None:
            supervisor.tick(self.view)

    def release_supervisor(self) -> None:
        if self.sup is not None:
            try:
                leases.release(self.cfg.store, self.sup)
            except DagcraftError:
                pass
            self.sup = None

    # -- scheduling ----------------------------------------------------------------------
    def _context(self, sid: str, with_steps: bool = True) -> RenderContext:
        """The template context of one step: only its ancestors can be referenced (the
        compiler checks that), so only they are built — cost follows the step, not the DAG."""
        if self._ctx is None:
            rec = self.view.record
            self._ctx = (0, RenderContext(params=self.view.wf.params,
                                          run={"id": self.run_id, "name": rec.name, "spec_dir": rec.spec_dir or ""},
                                          steps={}, env={}))
        step = self.view.steps[sid]
        return self._ctx[1].model_copy(update={
            "matrix": step.matrix, "item": getattr(step, "item", None),
            "steps": self.view.steps_context(only=self.view.context_ids(sid)) if with_steps else {}})

    def _end(self, sid: str, status: str, reason: str) -> None:
        """Move a step that never ran to a terminal state (skipped, or failed before running)."""
        st = self.view.fresh(sid).model_copy(deep=True)
        st.status = status  # type: ignore[assignment]
        st.reason = reason
        st.finished_at = self.cfg.store.now()
        supervisor.cas_state(self.view, st, self.view.etag(sid))

    def _skip(self, sid: str, reason: str) -> None:
        self._end(sid, "skipped", reason)

    def _fail(self, sid: str, reason: str) -> None:
        self._end(sid, "failed", reason)

    def resolve_parents(self) -> None:
        """A foreach parent finishes when all its children have."""
        for sid in list(self.view.steps):
            st = self.view.state(sid)
            if st.status != "expanded" or not all(self.view.is_terminal(c) for c in st.children):
                continue
            kids = [self.view.status(c) for c in st.children]
            new = self.view.fresh(sid).model_copy(deep=True)
            if "failed" in kids:
                new.status = "failed"
            elif "cancelled" in kids:
                new.status = "cancelled"
            elif all(k == "skipped" for k in kids):
                new.status = "skipped"  # e.g. not started after a failure elsewhere
            else:
                new.status = "succeeded"
            new.finished_at = self.cfg.store.now()
            supervisor.cas_state(self.view, new, self.view.etag(sid))

    def _expand(self, sid: str) -> None:
        step = self.view.steps[sid]
        try:
            items = evaluate_foreach(step, self._context(sid))
            children = expand_foreach(step, items)
        except DagcraftError as exc:
            self._fail(sid, f"foreach: {exc}")
            return
        ids = []
        for child in children:
            ids.append(child.id)
            cst = StepState(step_id=child.id, definition=child.model_dump(mode="json"), parent=sid)
            try:
                etag = self.cfg.store.put(layout.step_state(self.run_id, child.id), cst.dump(), if_none_match=True)
                self.view.apply(cst, etag)
                journal.append(self.cfg.store, self.run_id, child.id, cst.rev, cst.status)
            except Conflict:
                # expanded before: by a racing worker (same children), or in an earlier
                # generation of a reset run, whose items may differ — then take the new ones
                existing = self.view.refresh_step(child.id)
                if existing.status == "skipped" and existing.reason and existing.reason.startswith("superseded"):
                    fresh = existing.model_copy(deep=True)
                    fresh.definition = cst.definition
                    fresh.status = "pending"
                    fresh.reason = None
                    fresh.outputs, fresh.artifacts = {}, {}
                    fresh.failures = fresh.lost_attempts = 0
                    supervisor.cas_state(self.view, fresh, self.view.etag(child.id))
                    self.view.steps[child.id] = child
        new = self.view.fresh(sid).model_copy(deep=True)
        new.children = ids
        new.status = "expanded" if ids else "succeeded"
        supervisor.cas_state(self.view, new, self.view.etag(sid))

    def ready(self) -> list[str]:
        now = None
        out = []
        for sid in self.view.ids(self.view.open_ids):
            st = self.view.state(sid)
            if st.parent and sid not in self.view.state(st.parent).children:
                continue  # a foreach child runs only once its parent has expanded to it
            if st.status == "pending" and self.view.needs_done(sid):
                out.append(sid)
            elif st.status == "retrying":
                now = now if now is not None else self.cfg.store.now()
                if (st.not_before or 0) <= now:
                    out.append(sid)
        return out

    def decide(self, capacity: int, running_here: int) -> list[Any]:
        """Skip, expand, or claim ready steps; returns what to execute (at most ``capacity``)."""
        view = self.view
        ctl = view.control.status
        if ctl == "rolling_back":
            return self._claim_compensations(capacity)
        if ctl != "running":
            return []
        claims: list[Any] = []
        self._full = set()  # semaphores found full this cycle: not retried for every step
        failing = view.failing() and view.wf.on_failure in ("stop", "rollback")
        max_parallel = view.wf.max_parallel
        ready = self.ready()
        # each worker walks the ready set from its own random point, so that workers racing
        # for work mostly claim different steps instead of losing CAS races on the same one
        if len(ready) > 1:
            k = self._rng.randrange(len(ready))
            ready = ready[k:] + ready[:k]
        for sid in ready:
            step = view.steps[sid]
            st = view.state(sid)
            if st.status == "pending" and self._decided.get(sid) == st.rev and not failing:
                pass  # `when` already evaluated true for this version of the step
            elif st.status == "pending":
                always = step.is_finally or any(m in step.when for m in ALWAYS_MARKERS)
                if failing and not always:
                    self._skip(sid, f"not started: a step failed (on_failure: {view.wf.on_failure})")
                    continue
                try:
                    # most conditions are about statuses only: read step data only if used
                    ctx = self._context(sid, with_steps="steps" in step.when)
                    ok = evaluate_when(step, ctx, view.needs_status(sid))
                except DagcraftError as exc:
                    self._fail(sid, f"when: {exc}")
                    continue
                if step.is_finally and step.when.replace(" ", "") == "${{success()}}":
                    ok = True  # finally steps run whatever happened before them
                if not ok:
                    self._skip(sid, "when condition is false")
                    continue
                if step.foreach and not st.children:
                    self._expand(sid)
                    continue
                # needs are terminal, so the answer cannot change until the step itself does
                self._decided[sid] = st.rev
            if len(claims) >= capacity:
                continue
            if max_parallel is not None:
                running = sum(1 for s in view.active_ids if view.status(s) == "running")
                if running >= max_parallel:
                    continue
            claimed = self.claim(sid)
            if claimed is not None:
                claims.append(claimed)
        return claims

    def _semaphores(self, step: Any) -> list[Semaphore]:
        sems = []
        if self.view.wf.max_parallel is not None:
            sems.append(Semaphore(self.cfg.store, layout.parallel_semaphore(self.run_id),
                                  self.view.wf.max_parallel, self.cfg.lease_ttl))
        agent = self.view.wf.agents.get(step.agent) if step.agent else None
        if agent is not None and agent.max_concurrent:
            sems.append(Semaphore(self.cfg.store, layout.agent_semaphore(step.agent), agent.max_concurrent,
                                  self.cfg.lease_ttl))
        return sems

    def claim(self, sid: str) -> Claimed | None:
        view = self.view
        step = view.steps[sid]
        if view.etag(sid) is None or sid in view.stale:
            view.refresh_step(sid)  # known only by status: read its etag and details once
            if view.status(sid) not in ("pending", "retrying"):
                return None
        sems = self._semaphores(step)
        if any(sem.key_prefix in self._full for sem in sems):
            return None
        held: list[leases.Lease] = []
        for sem in sems:
            got = sem.try_acquire(f"{self.cfg.worker_id}/{self.run_id}/{sid}")
            if got is None:
                self._full.add(sem.key_prefix)
                for s, lease in zip(sems, held, strict=False):
                    s.release(lease)
                return None
            held.append(got)
        st = view.state(sid).model_copy(deep=True)
        now = self.cfg.store.now()
        st.status = "running"
        st.attempt += 1
        st.worker = self.cfg.worker_id
        st.lease_expires_at = now + self.cfg.lease_ttl
        st.started_at = now
        st.not_before = None
        st.reason = None
        if not supervisor.cas_state(view, st, view.etag(sid)):
            for s, lease in zip(sems, held, strict=False):
                s.release(lease)
            return None
        ancestors = view.context_ids(sid)
        return Claimed(run_id=self.run_id, run_name=view.record.name, spec_dir=view.record.spec_dir, wf=view.wf,
                       step=step, state=view.state(sid), etag=view.etag(sid) or "",
                       steps_ctx=view.steps_context(only=ancestors), upstream_artifacts=self._upstream_artifacts(sid),
                       instances=self._instances(ancestors), semaphore_leases=held, semaphores=sems)

    def _instances(self, among: set[str]) -> dict[str, list[str]]:
        """template id -> concrete ids, for the steps ``among`` (a step's ancestors)."""
        out: dict[str, list[str]] = {}
        for sid in self.view.ids(among):
            step = self.view.steps[sid]
            st = self.view.state(sid)
            if st.parent:
                continue
            if st.children:
                out.setdefault(step.template_id, []).extend(st.children)
            else:
                out.setdefault(step.template_id, []).append(sid)
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

    def _claim_compensations(self, capacity: int) -> list[Any]:
        view = self.view
        deps = view.dependents()
        out: list[Any] = []
        for sid in reversed(view.all_ids()):
            if len(out) >= capacity:
                break
            if not compensation_ready(view, sid, deps):
                continue
            st = view.fresh(sid).model_copy(deep=True)
            from dagcraft.orchestrator.model import RollbackInfo

            n = (st.rollback.attempt + 1) if st.rollback else 1
            st.status = "rolling_back"
            st.rollback = RollbackInfo(status="running", attempt=n, worker=self.cfg.worker_id,
                                       lease_expires_at=self.cfg.store.now() + self.cfg.lease_ttl)
            if supervisor.cas_state(view, st, view.etag(sid)):
                out.append(("rollback", sid))
        return out


class Worker:
    """A worker process's main loop. ``run()`` returns an exit code."""

    def __init__(self, cfg: WorkerConfig, *, run_id: str | None = None, concurrency: int = 1,
                 exit_when_idle: bool = False, poll_min: float = 0.05, poll_max: float = 1.0,
                 inline: bool = False, on_cycle: Callable[[Worker], None] | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.only_run = run_id
        self.concurrency = max(1, concurrency)
        self.exit_when_idle = exit_when_idle
        self.poll_min = poll_min
        self.poll_max = poll_max
        self.inline = inline
        self.on_cycle = on_cycle
        self.log = log or (lambda _msg: None)
        self.drivers: dict[str, RunDriver] = {}
        self.finished_runs: set[str] = set()
        self.running: dict[Future[Any] | int, tuple[str, Any]] = {}
        self.pool = None if inline else ThreadPoolExecutor(max_workers=self.concurrency,
                                                           thread_name_prefix="dagcraft-step")
        self.wake = threading.Event()
        self.changes: queue.Queue[tuple[str, StepState, str, str | None]] = queue.Queue()
        self.draining = False
        self.handing_back = False
        self._index_after: str | None = None
        self._index_next = 0.0

    # -- signals -------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def on_term(signum: int, frame: Any) -> None:
            if self.draining:
                self.hand_back()
            self.draining = True
            self.wake.set()

        def on_int(signum: int, frame: Any) -> None:
            self.hand_back()

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_int)

    def hand_back(self) -> None:
        self.draining = True
        self.handing_back = True
        for _, (_, job) in list(self.running.items()):
            job.request_cancel("interrupted")
        self.wake.set()

    # -- discovery -----------------------------------------------------------------------
    def _discover(self) -> None:
        if self.only_run is not None:
            if self.only_run not in self.drivers and self.only_run not in self.finished_runs:
                self.drivers[self.only_run] = RunDriver(self.cfg, self.only_run)
            return
        now = time.monotonic()
        if now < self._index_next:
            return
        self._index_next = now + 2.0
        for key in self.cfg.store.list(layout.RUNS_INDEX, start_after=self._index_after):
            self._index_after = key
            run_id = key.rsplit("~", 1)[-1]
            if run_id in self.drivers:
                continue
            try:
                driver = RunDriver(self.cfg, run_id)
            except NotFound:
                continue
            if driver.finished:
                self.finished_runs.add(run_id)
                continue
            self.finished_runs.discard(run_id)
            self.drivers[run_id] = driver

    # -- execution -----------------------------------------------------------------------
    def _on_change(self, run_id: str) -> Callable[[StepState, str, str | None], None]:
        def push(state: StepState, etag: str, journal_key: str | None) -> None:
            self.changes.put((run_id, state, etag, journal_key))
            self.wake.set()
        return push

    def _start(self, driver: RunDriver, item: Any) -> None:
        if isinstance(item, tuple) and item[0] == "rollback":
            sid = item[1]
            view = driver.view
            job: Any = Compensation(self.cfg, run_id=driver.run_id, run_name=view.record.name,
                                    spec_dir=view.record.spec_dir, wf=view.wf, step=view.steps[sid],
                                    state=view.state(sid), etag=view.etag(sid) or "",
                                    steps_ctx=view.steps_context(only=view.context_ids(sid) | {sid}),
                                    on_change=self._on_change(driver.run_id))
        else:
            job = Attempt(self.cfg, item, on_change=self._on_change(driver.run_id))
        what = f"rollback of {item[1]}" if isinstance(item, tuple) else f"{item.step.id} attempt {item.state.attempt}"
        self.log(f"{driver.run_id}: claimed {what}")
        if self.pool is None:
            self.running[id(job)] = (driver.run_id, job)
            try:
                job.run()
            finally:
                del self.running[id(job)]
            return
        fut = self.pool.submit(job.run)
        self.running[fut] = (driver.run_id, job)
        fut.add_done_callback(lambda _f: self.wake.set())

    def _reap(self) -> None:
        for fut in [f for f in self.running if isinstance(f, Future) and f.done()]:
            self.running.pop(fut)
            fut.exception()  # attempts catch their own errors; nothing to raise here
        while True:
            try:
                run_id, state, etag, journal_key = self.changes.get_nowait()
            except queue.Empty:
                break
            self.log(f"{run_id}: {state.step_id} {state.status}" + (f" ({state.reason})" if state.reason else ""))
            if run_id in self.drivers:
                self.drivers[run_id].view.apply(state, etag)
                if journal_key:
                    self.drivers[run_id].view.journal.mark_seen(journal_key)

    def cycle(self) -> bool:
        """One pass over every served run. Returns True when something changed."""
        self._discover()
        self._reap()
        active = False
        for run_id, driver in list(self.drivers.items()):
            before = driver.view.changes
            driver.view.refresh()
            ctl = driver.view.control.status
            if ctl == "cancelling":
                for _, (rid, job) in list(self.running.items()):
                    if rid == run_id:
                        job.request_cancel("cancelled")
            driver.supervise()
            if driver.finished:
                if not any(rid == run_id for rid, _ in self.running.values()):
                    driver.release_supervisor()
                    self.finished_runs.add(run_id)
                    del self.drivers[run_id]
                active = True
                continue
            if not self.draining:
                driver.resolve_parents()
                capacity = self.concurrency - len(self.running)
                if capacity > 0:
                    for item in driver.decide(capacity, len(self.running)):
                        active = True
                        self._start(driver, item)
            if driver.view.changes != before:
                active = True
        return active

    def idle_done(self) -> bool:
        if self.running:
            return False
        if self.handing_back or self.draining:
            return True
        if not self.exit_when_idle:
            return False
        if self.only_run is not None:
            return self.only_run in self.finished_runs
        return not self.drivers

    def run(self) -> int:
        interval = self.poll_min
        try:
            while True:
                try:
                    changed = self.cycle()
                except (StoreUnavailable, Conflict) as exc:
                    # a store outage (already retried with backoff) or a lost race must not kill
                    # a long-running worker: running steps keep their heartbeats; try again later
                    self.log(f"cycle interrupted: {exc}")
                    changed = False
                    interval = self.poll_max
                if self.on_cycle is not None:
                    self.on_cycle(self)
                if self.idle_done():
                    break
                if changed:
                    interval = self.poll_min
                    if self.inline:
                        continue
                else:
                    interval = min(self.poll_max, interval * 2)
                self.wake.wait(interval)
                self.wake.clear()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)
            self._reap()
            for driver in self.drivers.values():
                driver.release_supervisor()
        return 0
