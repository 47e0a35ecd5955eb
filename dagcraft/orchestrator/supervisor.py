"""The supervisor: run-level decisions, held by one worker at a time through a lease.

Any worker may hold the role; it is the lease at ``runs/<run>/supervisor`` (the same lease
primitive as step claims and semaphore slots). When its holder dies the lease expires on the
store's clock and another worker takes it over. Everything it does is a transition of
``transitions.py`` (a CAS), so a supervisor that lost its lease mid-cycle (paused,
partitioned) can make no transition a newer one has not already seen — at worst its CAS fails.

Duties: take over the leases of attempts whose worker vanished (``lost worker``), cancel
unstarted steps of a cancelling run, move a failed run into rollback, set the final run
status and seal the run (``transitions.set_control``; signed when the worker has a key).
Each tick looks only at the run's active steps, never the whole DAG, except once the
run is ending.

After a store outage every holder's lease may have expired on the store's clock although its
worker is alive and will renew as soon as the store answers. So the supervisor declares a
lease lost only once it has seen that same lease expired for ``recovery_s`` (a heartbeat
retry pause and slack) while the store answered it: a live holder renews within that time.
"""

from __future__ import annotations

import logging
import time

from dagcraft.errors import Conflict, DagcraftError
from dagcraft.orchestrator import layout, transitions
from dagcraft.orchestrator.model import ReasonKind, RunStatus, StepStatus
from dagcraft.orchestrator.retry import LOST_WORKER_RETRIES
from dagcraft.orchestrator.view import LocalView
from dagcraft.primitives import lease as leases
from dagcraft.tracing.seal import Signer

#: a lease is judged lost only this long after its expiry, absorbing clock granularity (S3's
#: Date header has one-second resolution)
EXPIRY_GRACE_S = 1.0

log = logging.getLogger(__name__)


class Supervisor:
    """The supervisor role for one run, as seen from one worker."""

    def __init__(self, view: LocalView, worker_id: str, lease_ttl: float, signer: Signer | None = None) -> None:
        self.view = view
        #: signs the seal of the runs this supervisor finishes (None: unsigned seals)
        self.signer = signer
        self.worker_id = worker_id
        self.lease_ttl = lease_ttl
        self.lease: leases.Lease | None = None
        self._next_renew = 0.0
        #: step -> (write id of its expired lease, monotonic time first seen expired)
        self._expired: dict[str, tuple[str, float]] = {}
        self.recovery_s = min(2.0, lease_ttl / 3.0) + 2.0

    def store_failed(self) -> None:
        """The worker's cycle met a store outage: holders may not have been able to renew, so
        every expired lease is given ``recovery_s`` again from now."""
        self._expired.clear()

    def tick(self) -> None:
        """Keep (or try to take) the role; when held, make this cycle's decisions."""
        now = time.monotonic()
        if now >= self._next_renew:
            self._next_renew = now + self.lease_ttl / 3.0
            key = layout.supervisor(self.view.run_id)
            try:
                self.lease = (leases.acquire(self.view.store, key, self.worker_id, self.lease_ttl) if self.lease is None
                              else leases.renew(self.view.store, self.lease, self.lease_ttl))
            except Conflict:
                self.lease = None
        if self.lease is not None:
            self.decide()

    def release(self) -> None:
        if self.lease is not None:
            try:
                leases.release(self.view.store, self.lease)
            except DagcraftError:
                pass  # it expires after its TTL
            self.lease = None

    # -- decisions --------------------------------------------------------------------------------
    def expire_lost_leases(self) -> int:
        """Active steps whose lease passed its expiry on the store clock lose their attempt."""
        view = self.view
        now = view.store.now()
        seen_at = time.monotonic()
        n = 0
        for sid in view.ids(view.active_ids):
            st = view.fresh(sid)  # the lease expiry is a detail
            if st.lease is None or not st.lease.expired(now, EXPIRY_GRACE_S):
                self._expired.pop(sid, None)
                continue
            st = view.refresh_step(sid)  # the holder may have renewed since our last read
            if st.lease is None or not st.lease.expired(now, EXPIRY_GRACE_S):
                self._expired.pop(sid, None)
                continue
            first = self._expired.get(sid)
            if first is None or first[0] != st.lease.write_id:
                self._expired[sid] = (st.lease.write_id, seen_at)
                continue
            if seen_at - first[1] < self.recovery_s:
                continue
            if transitions.lost(view, sid, grace=EXPIRY_GRACE_S, lost_retries=LOST_WORKER_RETRIES):
                log.info("%s: %s lost its worker %s", view.run_id, sid, st.lease.holder)
                n += 1
            self._expired.pop(sid, None)
        return n

    def cancel_unstarted(self) -> None:
        view = self.view
        for sid in view.ids(view.open_ids | view.expanded_ids | view.waiting_ids):
            st = view.fresh(sid)
            if st.status in (StepStatus.PENDING, StepStatus.RETRYING, StepStatus.WAITING_APPROVAL) or (st.status == StepStatus.EXPANDED and all(
                    view.is_terminal(c) or view.status(c) in (StepStatus.PENDING, StepStatus.RETRYING)
                    for c in st.children)):
                transitions.cancel_unstarted(view, sid, "run cancelled")

    def _main_finished(self) -> bool:
        """Every step but the finally steps is terminal (asked only while a rollback is due)."""
        view = self.view
        return all(view.is_terminal(s) for s in view.steps if not view.steps.attr(s, "is_finally"))

    def _finish(self, status: RunStatus, reason: str | None) -> None:
        """The final run status, sealed (and signed, with a key) by the same CAS."""
        transitions.set_control(self.view, status, reason, finished=True, signer=self.signer)

    def decide(self) -> None:
        """One supervisor cycle over the view (refreshed just before)."""
        view = self.view
        ctl = view.control.status
        self.expire_lost_leases()
        if ctl == RunStatus.CANCELLING:
            self.cancel_unstarted()
            if not view.active_ids:
                self.cancel_unstarted()  # again: foreach parents whose children were just cancelled
                self._finish(RunStatus.CANCELLED, view.control.reason)
            return
        if ctl == RunStatus.ROLLING_BACK:
            # finished once the compensations and then the finally steps (which run after
            # them, seeing the rolled-back statuses) are done
            if not view.pending_compensations() and view.finished():
                failed = [s for s in view.all_ids() if view.state(s).compensation == "failed"]
                if failed:
                    self._finish(RunStatus.FAILED, f"compensation of {failed[0]!r} failed")
                else:
                    self._finish(RunStatus.ROLLED_BACK, view.control.reason)
            return
        if ctl != RunStatus.RUNNING:
            return
        if view.rollback_due() and self._main_finished():
            # before the finally steps: they run once the compensations are done
            failed = view.ids(view.failed_ids)
            transitions.set_control(view, RunStatus.ROLLING_BACK, f"step {failed[0]!r} failed")
            return
        if not view.finished():
            return
        failed = view.ids(view.failed_ids)
        if failed:
            # a budget stop is resumable with a raised limit: its own status (exit 6)
            view.ensure_fresh(failed)
            stopped = [s for s in failed if view.state(s).reason_kind == ReasonKind.BUDGET_EXCEEDED]
            if stopped:
                self._finish(RunStatus.BUDGET_EXCEEDED, f"step {stopped[0]!r}: {view.state(stopped[0]).reason}")
                return
        if not failed:
            self._finish(RunStatus.SUCCEEDED, None)
            return
        why = f"step {failed[0]!r} failed"
        first = view.fresh(failed[0])
        if first.reason_kind is ReasonKind.MAX_ITERATIONS and first.reason:
            why = f"{why}: {first.reason}"  # a loop at its cap: say so, not only that it failed
        self._finish(RunStatus.ROLLED_BACK if view.wf.on_failure == "rollback" else RunStatus.FAILED, why)
