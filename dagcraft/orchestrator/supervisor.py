"""The supervisor: run-level decisions, held by one worker at a time through a lease.

Any worker may hold the role; it is the lease at ``runs/<run>/supervisor`` (the same lease
primitive as step claims and semaphore slots). When its holder dies the lease expires on the
store's clock and another worker takes it over. Everything it does is a transition of
``transitions.py`` (a CAS), so a supervisor that lost its lease mid-cycle (paused,
partitioned) can make no transition a newer one has not already seen — at worst its CAS fails.

Duties: take over the leases of attempts whose worker vanished (``lost worker``), cancel
unstarted steps of a cancelling run, move a failed run into rollback, set the final run
status. Each tick looks only at the run's active steps, never the whole DAG, except once the
run is ending.

After a store outage every holder's lease may have expired on the store's clock although
its worker is alive and renewing as soon as it can: the supervisor declares no lease lost
until the store has answered it for ``recovery_s`` (two heartbeats and a retry pause).
"""

from __future__ import annotations

import logging
import time

from dagcraft.errors import Conflict, DagcraftError
from dagcraft.orchestrator import layout, transitions
from dagcraft.orchestrator.model import RunStatus, StepStatus
from dagcraft.orchestrator.retry import LOST_WORKER_RETRIES
from dagcraft.orchestrator.view import LocalView
from dagcraft.primitives import lease as leases

#: a lease is judged lost only this long after its expiry, absorbing clock granularity (S3's
#: Date header has one-second resolution)
EXPIRY_GRACE_S = 1.0

log = logging.getLogger(__name__)


class Supervisor:
    """The supervisor role for one run, as seen from one worker."""

    def __init__(self, view: LocalView, worker_id: str, lease_ttl: float) -> None:
        self.view = view
        self.worker_id = worker_id
        self.lease_ttl = lease_ttl
        self.lease: leases.Lease | None = None
        self._next_renew = 0.0
        #: monotonic time since which the store has answered (None: during an outage)
        self._healthy_since: float | None = time.monotonic()
        self.recovery_s = 2 * (lease_ttl / 3.0) + 2.0

    def store_failed(self) -> None:
        """The worker's cycle met a store outage: hold off judging leases."""
        self._healthy_since = None

    def tick(self) -> None:
        """Keep (or try to take) the role; when held, make this cycle's decisions."""
        now = time.monotonic()
        if self._healthy_since is None:
            self._healthy_since = now
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
        if self._healthy_since is None or time.monotonic() - self._healthy_since < self.recovery_s:
            return 0
        now = view.store.now()
        n = 0
        for sid in view.ids(view.active_ids):
            st = view.fresh(sid)  # the lease expiry is a detail
            if st.status in (StepStatus.RUNNING, StepStatus.ROLLING_BACK) and st.lease is not None \
                    and st.lease.expired(now, EXPIRY_GRACE_S):
                if transitions.lost(view, sid, grace=EXPIRY_GRACE_S, lost_retries=LOST_WORKER_RETRIES):
                    log.info("%s: %s lost its worker %s", view.run_id, sid, st.lease.holder)
                    n += 1
        return n

    def cancel_unstarted(self) -> None:
        view = self.view
        for sid in view.ids(view.open_ids | view.expanded_ids):
            st = view.fresh(sid)
            if st.status in (StepStatus.PENDING, StepStatus.RETRYING) or (st.status == StepStatus.EXPANDED and all(
                    view.is_terminal(c) or view.status(c) in (StepStatus.PENDING, StepStatus.RETRYING)
                    for c in st.children)):
                transitions.cancel_unstarted(view, sid, "run cancelled")

    def pending_compensations(self) -> list[str]:
        view = self.view
        return [sid for sid in view.all_ids()
                if view.steps[sid].rollback and view.status(sid) in (StepStatus.SUCCEEDED, StepStatus.ROLLING_BACK)]

    def decide(self) -> None:
        """One supervisor cycle over the view (refreshed just before)."""
        view = self.view
        ctl = view.control.status
        self.expire_lost_leases()
        if ctl == RunStatus.CANCELLING:
            self.cancel_unstarted()
            if not view.active_ids:
                self.cancel_unstarted()  # again: foreach parents whose children were just cancelled
                transitions.set_control(view, RunStatus.CANCELLED, view.control.reason, finished=True)
            return
        if ctl == RunStatus.ROLLING_BACK:
            if not any(view.status(s) == StepStatus.RUNNING for s in view.active_ids) \
                    and not self.pending_compensations():
                failed = [s for s in view.all_ids() if view.state(s).compensation == "failed"]
                if failed:
                    transitions.set_control(view, RunStatus.FAILED, f"compensation of {failed[0]!r} failed",
                                            finished=True)
                else:
                    transitions.set_control(view, RunStatus.ROLLED_BACK, view.control.reason, finished=True)
            return
        if ctl != RunStatus.RUNNING or not view.finished():
            return
        failed = view.ids(view.failed_ids)
        if not failed:
            transitions.set_control(view, RunStatus.SUCCEEDED, None, finished=True)
        elif view.wf.on_failure == "rollback" and self.pending_compensations():
            transitions.set_control(view, RunStatus.ROLLING_BACK, f"step {failed[0]!r} failed")
        elif view.wf.on_failure == "rollback":
            transitions.set_control(view, RunStatus.ROLLED_BACK, f"step {failed[0]!r} failed", finished=True)
        else:
            transitions.set_control(view, RunStatus.FAILED, f"step {failed[0]!r} failed", finished=True)
