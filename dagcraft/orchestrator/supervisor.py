"""The supervisor: run-level decisions, held by one worker at a time through a lease.

Any worker may hold it; when its holder dies the lease expires on the store's clock and
another worker takes it over. Everything it does is a CAS on a step state or on run control,
so a supervisor that lost its lease mid-cycle (paused, partitioned) can make no transition
that a newer supervisor has not already seen — at worst its CAS fails.

Duties: expire lost leases (the attempt fails with reason ``lost worker``), cancel pending
steps of a cancelling run, move a failed run into rollback, and set the final run status.
"""

from __future__ import annotations

from dagcraft.errors import Conflict
from dagcraft.orchestrator import journal, layout
from dagcraft.orchestrator.model import AttemptInfo, StepState, dump
from dagcraft.orchestrator.retry import LOST_WORKER_RETRIES
from dagcraft.orchestrator.run_view import LocalView

#: a lease is judged lost only this long after its expiry, absorbing clock granularity (S3's
#: Date header has one-second resolution)
EXPIRY_GRACE_S = 1.0


def cas_state(view: LocalView, state: StepState, etag: str | None) -> bool:
    """CAS a step state (If-Match its etag, or If-None-Match when it had none), then journal."""
    state.rev = view.state(state.step_id).rev + 1
    key = layout.step_state(view.run_id, state.step_id)
    try:
        if etag is None:
            new_etag = view.store.put(key, state.dump(), if_none_match=True)
        else:
            new_etag = view.store.put(key, state.dump(), if_match=etag)
    except Conflict:
        view.refresh_step(state.step_id)
        return False
    view.apply(state, new_etag)
    view.journal.mark_seen(journal.append(view.store, view.run_id, state.step_id, state.rev, state.status))
    return True


def set_control(view: LocalView, status: str, reason: str | None = None, *, finished: bool = False) -> bool:
    ctl = view.control.model_copy()
    ctl.status = status  # type: ignore[assignment]
    ctl.reason = reason
    ctl.updated_at = view.store.now()
    ctl.finished_at = ctl.updated_at if finished else None
    key = layout.control(view.run_id)
    try:
        if view.control_etag is None:
            etag = view.store.put(key, dump(ctl), if_none_match=True)
        else:
            etag = view.store.put(key, dump(ctl), if_match=view.control_etag)
    except Conflict:
        view.refresh_control()
        return False
    view.control, view.control_etag = ctl, etag
    view.journal.mark_seen(journal.append(view.store, view.run_id, layout.CONTROL_MARK))
    return True


def expire_lost_leases(view: LocalView) -> int:
    """Running steps (and compensations) whose lease passed its expiry on the store clock:
    the attempt is recorded as failed with reason ``lost worker`` and the step retried (up
    to LOST_WORKER_RETRIES times: the step did not fail, its worker did)."""
    now = view.store.now()
    n = 0
    for sid in view.ids(view.active_ids):
        st = view.fresh(sid) if sid in view.stale else view.state(sid)  # the lease expiry is a detail
        exp = st.lease_expires_at if st.status == "running" else (
            st.rollback.lease_expires_at if st.status == "rolling_back" and st.rollback else None)
        if exp is None or exp + EXPIRY_GRACE_S > now:
            continue
        st = view.refresh_step(sid)  # confirm on a fresh read before acting
        etag = view.etag(sid)
        new = st.model_copy(deep=True)
        if st.status == "running" and st.lease_expires_at is not None and st.lease_expires_at + EXPIRY_GRACE_S <= now:
            new.history.append(AttemptInfo(attempt=st.attempt, status="lost", worker=st.worker,
                                           started_at=st.started_at, finished_at=now, reason="lost worker"))
            new.worker = None
            new.lease_expires_at = None
            new.reason = "lost worker"
            new.lost_attempts += 1
            if view.control.status == "cancelling":
                new.status = "cancelled"
            elif new.lost_attempts > LOST_WORKER_RETRIES:
                new.status = "failed"
                new.finished_at = now
            else:
                new.status = "pending"
        elif st.status == "rolling_back" and st.rollback and st.rollback.lease_expires_at is not None \
                and st.rollback.lease_expires_at + EXPIRY_GRACE_S <= now:
            new.status = "succeeded"  # the compensation becomes claimable again
            new.rollback = None
            new.history.append(AttemptInfo(attempt=st.rollback.attempt, status="lost", worker=st.rollback.worker,
                                           finished_at=now, reason="lost worker", kind="rollback"))
        else:
            continue
        if cas_state(view, new, etag):
            n += 1
    return n


def cancel_pending(view: LocalView) -> None:
    for sid in view.all_ids():
        st = view.state(sid)
        if st.status in ("pending", "retrying", "expanded"):
            st = view.fresh(sid)
        if st.status in ("pending", "retrying") or (st.status == "expanded" and all(
                view.is_terminal(c) or view.status(c) in ("pending", "retrying") for c in st.children)):
            new = st.model_copy(deep=True)
            new.status = "cancelled"
            new.reason = "run cancelled"
            new.finished_at = view.store.now()
            cas_state(view, new, view.etag(sid))


def pending_compensations(view: LocalView) -> list[str]:
    return [sid for sid in view.all_ids()
            if view.steps[sid].rollback and view.status(sid) in ("succeeded", "rolling_back")]


def tick(view: LocalView) -> None:
    """One supervisor cycle over the local view (the view was refreshed just before)."""
    ctl = view.control.status
    expire_lost_leases(view)
    if ctl == "cancelling":
        cancel_pending(view)
        if not any(view.status(s) in ("running", "rolling_back") for s in view.steps):
            cancel_pending(view)  # again: foreach parents whose children were just cancelled
            set_control(view, "cancelled", view.control.reason, finished=True)
        return
    if ctl == "rolling_back":
        if not any(view.status(s) == "running" for s in view.steps) and not pending_compensations(view):
            failed = [s for s in view.steps if (rb := view.state(s).rollback) is not None and rb.status == "failed"]
            if failed:
                set_control(view, "failed", f"compensation of {failed[0]!r} failed", finished=True)
            else:
                set_control(view, "rolled_back", view.control.reason, finished=True)
        return
    if ctl != "running":
        return
    if not view.finished():
        return
    failed = [s for s in view.all_ids() if view.status(s) == "failed"]
    if not failed:
        set_control(view, "succeeded", None, finished=True)
    elif view.wf.on_failure == "rollback" and pending_compensations(view):
        set_control(view, "rolling_back", f"step {failed[0]!r} failed")
    elif view.wf.on_failure == "rollback":
        set_control(view, "rolled_back", f"step {failed[0]!r} failed", finished=True)
    else:
        set_control(view, "failed", f"step {failed[0]!r} failed", finished=True)
