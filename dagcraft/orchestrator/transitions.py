"""Every way a step's state, or a run's control record, can change. Nothing else writes them.

Each transition is one compare-and-swap on the record (:func:`~dagcraft.primitives.store.cas`)
followed by one journal entry, both retried through store outages (:class:`Persistence`), so
of any number of workers on any number of hosts attempting the same transition from the same
version exactly one succeeds, and a retry after a lost response never applies it twice.

Step transitions (``pending`` etc. are :class:`StepStatus` values)::

    claim         pending | retrying → running        the attempt takes the step's lease
    heartbeat     running | rolling_back → same       the holder extends its lease
    succeed       running → succeeded                 holder commit: outputs, artifacts
    retry_wait    running → retrying                  holder commit: failed, retried after a backoff
    fail          running → failed                    holder commit: failed for good
    hand_back     running → pending                   holder commit: worker interrupted (not a failure)
    cancel        running → cancelled                 holder commit: the run was cancelled
    fail_unstarted pending → failed                   its `when`/`foreach` could not be evaluated
    skip          pending → skipped                   `when` false, or not started after a failure
    cancel_unstarted pending | retrying | expanded | waiting_approval → cancelled
    expand        pending → expanded (or succeeded when there are no items); children created pending
    iterate       expanded → expanded            a loop's `until` was false: the next iteration's body steps created
    settle_parent expanded → succeeded | failed | skipped | cancelled, once every child is terminal
    lost          running → pending | failed | cancelled, rolling_back → succeeded: the lease expired
    compensate    succeeded → rolling_back            a compensation attempt takes the step's lease
    compensated   rolling_back → rolled_back          holder commit of the compensation (done or failed)
    await_approval pending → waiting_approval       an approval gate opens (its `when` is true)
    decide_approval waiting_approval → pending | succeeded | failed   approve (a pure gate succeeds) or reject
    reset         any → pending                       resume --retry-failed, retry --from
    reopen_loop   any → expanded                      retry --from a loop body step: the loop continues from it
    retire        any → skipped                       a foreach child whose parent was reset

Holder transitions (heartbeat and the commits) go through :class:`Hold`: a CAS from the etag
of the holder's own last write, via the lease primitive (:func:`~.lease.write_held`), so once
the lease was taken over — by the supervisor declaring the attempt lost, a reset, a
cancellation — every later write of that holder is refused with :class:`Fenced`.

Run control: :func:`set_control` (running → cancelling | rolling_back | finished) and
:func:`reopen` (finished → running, bumping the generation). The write that finishes a run
seals it (:class:`~.model.RunSeal`): a digest over every step's committed trace heads.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dagcraft.errors import Conflict, Superseded
from dagcraft.orchestrator import journal, layout
from dagcraft.orchestrator.model import (
    ACTIVE,
    OPEN,
    ApprovalRecord,
    AttemptInfo,
    AttemptKind,
    AttemptStatus,
    Decision,
    ReasonKind,
    RunSeal,
    RunStatus,
    StepState,
    StepStatus,
    dump,
    load_state,
    seal_digest,
)
from dagcraft.orchestrator.statusrows import SummaryWriter
from dagcraft.primitives import lease as leases
from dagcraft.primitives.persist import ONCE, Persistence
from dagcraft.primitives.store import Store, cas
from dagcraft.tracing.redact import Redactor
from dagcraft.tracing.seal import Signer

if TYPE_CHECKING:
    from dagcraft.orchestrator.view import LocalView

Change = Callable[[StepState], None]


# -- the one write -----------------------------------------------------------------------------
def write_state(store: Store, run_id: str, new: StepState, etag: str | None, persist: Persistence) -> str:
    """CAS ``new`` over version ``etag`` of its record, riding out outages. Superseded when
    the record moved on."""
    key = layout.step_state(run_id, new.step_id)
    data = new.dump()
    return persist.call(lambda: cas(store, key, data, etag), what=f"write {new.step_id} state")


def announce(store: Store, run_id: str, st: StepState | None, persist: Persistence) -> str:
    """The journal entry for a change just written (``st`` None: run control)."""
    if st is None:
        return persist.call(lambda: journal.append(store, run_id, layout.CONTROL_MARK), what="journal append")
    return persist.call(lambda: journal.append(store, run_id, st.step_id, st.rev, st.status),
                        what="journal append")


def _transition(view: LocalView, sid: str, change: Change, *, allowed: frozenset[StepStatus] | None = None,
                fresh: bool = True, persist: Persistence | None = None) -> StepState | None:
    """Apply ``change`` to the step's current version and CAS it in. None (and the view
    refreshed from the record just read) when the record moved on or the step is no longer
    in an ``allowed`` status."""
    cur = view.fresh(sid) if fresh else view.state(sid)
    if allowed is not None and cur.status not in allowed:
        return None
    new = cur.model_copy(deep=True)
    change(new)
    new.rev = cur.rev + 1
    try:
        etag = write_state(view.store, view.run_id, new, view.etag(sid), persist or view.persist)
    except Superseded as exc:
        view.apply_record(sid, exc.current)
        return None
    view.apply(new, etag)
    view.journal.mark_seen(announce(view.store, view.run_id, new, view.persist))
    return new


# -- claims --------------------------------------------------------------------------------------
@dataclass
class Hold:
    """An attempt's hold on a step: the lease it took and the state it last wrote. Every write
    of the holder goes through :meth:`write`, serialized, so heartbeats and the commit never
    race each other; a write refused because the lease was taken over raises Fenced."""

    store: Store
    run_id: str
    state: StepState
    lease: leases.Lease
    persist: Persistence
    kind: AttemptKind = AttemptKind.RUN

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.journal_key: str | None = None

    @property
    def etag(self) -> str:
        return self.lease.etag

    @property
    def attempt(self) -> int:
        return self.state.attempt if self.kind is AttemptKind.RUN else self.state.rollback_attempt

    def write(self, change: Change, *, notify: bool = True, stop: threading.Event | None = None) -> StepState:
        with self._lock:
            new = self.state.model_copy(deep=True)
            change(new)
            new.rev = self.state.rev + 1
            data = new.dump()
            etag = self.persist.call(lambda: leases.write_held(self.store, self.lease, data, _lease_of),
                                     what=f"{new.step_id}: holder write", stop=stop)
            self.state = new
            self.lease = leases.Lease(self.lease.key, self.lease.holder, self.lease.token, etag,
                                      new.lease.expires_at if new.lease else 0.0, self.lease.acquired_at)
        if notify:
            self.journal_key = announce(self.store, self.run_id, new, self.persist)
        return new


def _lease_of(data: bytes) -> leases.LeaseRecord | None:
    try:
        return load_state(data).lease
    except ValueError:
        return None


def _take(view: LocalView, sid: str, holder: str, ttl: float, kind: AttemptKind,
          allowed: frozenset[StepStatus], fresh: bool = True) -> Hold | None:
    now = view.store.now()

    def change(s: StepState) -> None:
        # the step's status says no attempt holds it, so its old lease is over whatever it says
        prev = s.lease.model_copy(update={"released": True}) if s.lease else None
        s.lease = leases.take(prev, holder, now, ttl)
        if kind is AttemptKind.RUN:
            s.status = StepStatus.RUNNING
            s.attempt += 1
            s.started_at = now
            s.not_before = None
            s.reason = s.reason_kind = None
        else:
            s.status = StepStatus.ROLLING_BACK
            s.rollback_attempt += 1

    new = _transition(view, sid, change, allowed=allowed, fresh=fresh)
    if new is None or new.lease is None:
        return None
    handle = leases.Lease(layout.step_state(view.run_id, sid), holder, new.lease.token, view.etag(sid) or "",
                          new.lease.expires_at, now)
    return Hold(view.store, view.run_id, new, handle, view.persist, kind)


def claim(view: LocalView, sid: str, holder: str, ttl: float, *, fresh: bool = True) -> Hold | None:
    """pending | retrying → running: attempt n+1 takes the step's lease. None if another
    worker won the race (or the step moved on). ``fresh=False``: the caller has just read the
    step's record, so it is not read again (the CAS refuses a version that moved on anyway)."""
    return _take(view, sid, holder, ttl, AttemptKind.RUN, OPEN, fresh)


def compensate(view: LocalView, sid: str, holder: str, ttl: float) -> Hold | None:
    """succeeded → rolling_back: a compensation attempt takes the step's lease."""
    return _take(view, sid, holder, ttl, AttemptKind.ROLLBACK, frozenset({StepStatus.SUCCEEDED}))


# -- scheduler, supervisor and operations transitions ---------------------------------------------
def _end_unstarted(status: StepStatus, reason: str, now: float, kind: ReasonKind | None = None) -> Change:
    def change(s: StepState) -> None:
        s.status = status
        s.reason = reason
        s.reason_kind = kind
        s.finished_at = now
    return change


def skip(view: LocalView, sid: str, reason: str) -> bool:
    """pending | waiting_approval → skipped (its `when` is false, or it will not start after
    a failure)."""
    return _transition(view, sid, _end_unstarted(StepStatus.SKIPPED, reason, view.store.now()),
                       allowed=frozenset({StepStatus.PENDING, StepStatus.WAITING_APPROVAL})) is not None


def fail_unstarted(view: LocalView, sid: str, reason: str) -> bool:
    """pending → failed: the step could not even be started (its condition or fan-out failed).
    The reason is redacted: an evaluation error may quote a value (`got str '<secret>'`)."""
    reason = Redactor(view.wf.secret_values()).redact(reason)
    return _transition(view, sid, _end_unstarted(StepStatus.FAILED, reason, view.store.now(),
                                                 ReasonKind.CONDITION_ERROR),
                       allowed=frozenset({StepStatus.PENDING})) is not None


def cancel_unstarted(view: LocalView, sid: str, reason: str) -> bool:
    """pending | retrying | expanded → cancelled (the run is being cancelled)."""
    return _transition(view, sid, _end_unstarted(StepStatus.CANCELLED, reason, view.store.now(),
                                                 ReasonKind.CANCELLED),
                       allowed=OPEN | {StepStatus.EXPANDED, StepStatus.WAITING_APPROVAL}) is not None


def await_approval(view: LocalView, sid: str, prompt: str, timeout_s: float | None, on_timeout: Decision) -> bool:
    """pending → waiting_approval: the step's gate opens, its deadline on the store's clock."""
    now = view.store.now()

    def change(s: StepState) -> None:
        s.status = StepStatus.WAITING_APPROVAL
        s.approval = ApprovalRecord(prompt=prompt, requested_at=now, on_timeout=on_timeout,
                                    deadline=None if timeout_s is None else now + timeout_s)

    return _transition(view, sid, change, allowed=frozenset({StepStatus.PENDING})) is not None


def decide_approval(view: LocalView, sid: str, decision: Decision, by: str, comment: str | None,
                    *, pure_gate: bool, record: AttemptInfo | None = None) -> StepState:
    """waiting_approval → pending (approved: its command runs next), succeeded (an approved
    pure gate) or failed (rejected, reason kind ``rejected``). One CAS from the waiting
    version, so of any number of concurrent deciders on any hosts exactly one wins; every
    other gets Conflict naming the decision that won (or the status the step is in).
    ``record``: the decision's history entry, pinning the head of its trace."""
    now = view.store.now()

    def change(s: StepState) -> None:
        assert s.approval is not None
        if record is not None:
            s.history.append(record)
        s.approval.decision, s.approval.decided_by = decision, by
        s.approval.decided_at, s.approval.comment = now, comment
        words = f"{decision} by {by}" + (f": {comment}" if comment else "")
        if decision is Decision.REJECTED:
            s.status, s.finished_at = StepStatus.FAILED, now
            s.reason, s.reason_kind = words, ReasonKind.REJECTED
        elif pure_gate:
            s.status, s.finished_at = StepStatus.SUCCEEDED, now
            s.reason, s.reason_kind = words, None
            s.outputs = {"approved_by": by, "comment": comment or ""}
        else:
            s.status, s.reason, s.reason_kind = StepStatus.PENDING, words, None

    for _ in range(5):
        cur = view.fresh(sid)
        if cur.status != StepStatus.WAITING_APPROVAL or cur.approval is None:
            a = cur.approval
            if a is not None and a.decision is not None:
                raise Conflict(f"step {sid!r} already {a.decision} by {a.decided_by} at "
                               f"{_utc(a.decided_at or 0.0)}")
            raise Conflict(f"step {sid!r} is not waiting for approval (it is {cur.status})")
        new = _transition(view, sid, change, allowed=frozenset({StepStatus.WAITING_APPROVAL}), fresh=False)
        if new is not None:
            return new
    raise Conflict(f"step {sid!r} kept changing; decide again")


def _utc(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _create_children(view: LocalView, children: list[StepState]) -> None:
    """Write new child records (pending, each with its own definition). A child left by an
    earlier expansion of a reset run (retired) is revived with its new definition."""
    for child in children:
        try:
            etag = write_state(view.store, view.run_id, child, None, view.persist)
        except Superseded as exc:
            existing = view.apply_record(child.step_id, exc.current)
            if existing is not None and existing.status == StepStatus.SKIPPED and (existing.reason or "").startswith(
                    "superseded"):
                _transition(view, child.step_id, _reviver(child.definition), fresh=False)
            continue
        view.apply(child, etag)
        view.journal.mark_seen(announce(view.store, view.run_id, child, view.persist))


def expand(view: LocalView, sid: str, children: list[StepState]) -> bool:
    """pending → expanded: a foreach parent (or a loop, with its first iteration's body
    steps) creates its children, then records them."""
    _create_children(view, children)
    ids = [c.step_id for c in children]

    def change(s: StepState) -> None:
        s.children = ids
        s.status = StepStatus.EXPANDED if ids else StepStatus.SUCCEEDED
        if not ids:
            s.finished_at = view.store.now()

    return _transition(view, sid, change, allowed=frozenset({StepStatus.PENDING})) is not None


def iterate(view: LocalView, sid: str, children: list[StepState]) -> bool:
    """expanded → expanded: a loop whose last iteration ended with ``until`` false creates the
    next iteration's body steps and appends them to its children (earlier iterations' records,
    attempts and traces stay). False when the loop moved on (another worker iterated or
    settled it first); a child record written by the loser of that race is never scheduled:
    only children the parent lists run, and the loser retires what it wrote."""
    ids = [c.step_id for c in children]
    cur = view.fresh(sid)
    if cur.status != StepStatus.EXPANDED or any(i in cur.children for i in ids):
        return False
    _create_children(view, children)

    def change(s: StepState) -> None:
        s.children = [*s.children, *ids]

    if _transition(view, sid, change, allowed=frozenset({StepStatus.EXPANDED}), fresh=False) is not None:
        return True
    if not set(ids) & set(view.fresh(sid).children):
        # another worker settled the loop meanwhile: the records just written would wait forever
        for cid in ids:
            if view.fresh(cid).status == StepStatus.PENDING:
                retire(view, cid, "superseded: the loop ended before this iteration started")
    return False


def _reviver(definition: dict[str, Any] | None) -> Change:
    def change(s: StepState) -> None:
        _clear(s, "revived by a new expansion")
        s.reason = None
        s.definition = definition
    return change


def settle_parent(view: LocalView, sid: str, status: StepStatus, *, reason: str | None = None,
                  reason_kind: ReasonKind | None = None, outputs: dict[str, Any] | None = None) -> bool:
    """expanded → the aggregate status of its children (all terminal); a loop also records
    why it ended and its ``outputs`` (``iterations``, ``until``)."""
    now = view.store.now()

    def change(s: StepState) -> None:
        s.status = status
        s.finished_at = now
        if reason is not None:
            s.reason, s.reason_kind = reason, reason_kind
        if outputs is not None:
            s.outputs = outputs

    return _transition(view, sid, change, allowed=frozenset({StepStatus.EXPANDED})) is not None


def lost(view: LocalView, sid: str, *, grace: float, lost_retries: int) -> bool:
    """An attempt whose lease expired (on the store's clock, plus ``grace``) lost its worker.
    A run attempt is recorded ``lost`` and the step goes back to pending (up to
    ``lost_retries`` times: the step did not fail, its worker did), or to cancelled when the
    run is cancelling; a lost compensation makes the step claimable for compensation again.
    Taking the lease over this way fences the old holder: its later writes are refused."""
    now = view.store.now()
    cancelling = view.control.status == RunStatus.CANCELLING

    def change(s: StepState) -> None:
        assert s.lease is not None
        kind = AttemptKind.RUN if s.status == StepStatus.RUNNING else AttemptKind.ROLLBACK
        s.history.append(AttemptInfo(attempt=s.attempt if kind is AttemptKind.RUN else s.rollback_attempt,
                                     status=AttemptStatus.LOST, kind=kind, worker=s.lease.holder,
                                     started_at=s.started_at if kind is AttemptKind.RUN else s.lease.acquired_at,
                                     finished_at=now, reason="lost worker", reason_kind=ReasonKind.LOST_WORKER))
        s.lease = leases.released(s.lease, now)
        if kind is AttemptKind.ROLLBACK:
            s.status = StepStatus.SUCCEEDED
            return
        s.reason, s.reason_kind = "lost worker", ReasonKind.LOST_WORKER
        s.lost_attempts += 1
        if cancelling:
            s.status, s.finished_at = StepStatus.CANCELLED, now
        elif s.lost_attempts > lost_retries:
            s.status, s.finished_at = StepStatus.FAILED, now
        else:
            s.status = StepStatus.PENDING

    cur = view.refresh_step(sid)  # confirm on a fresh read before taking a lease over
    if cur.status not in ACTIVE or cur.lease is None or not cur.lease.expired(now, grace):
        return False
    # one try: a decision taken before an outage is stale after it (the holder may have been
    # unable to renew); the supervisor decides again once holders had time to renew
    return _transition(view, sid, change, allowed=ACTIVE, fresh=False, persist=ONCE) is not None


def _clear(s: StepState, reason: str) -> None:
    s.status = StepStatus.PENDING
    s.reason = reason
    s.reason_kind = None
    s.outputs, s.artifacts = {}, {}
    s.failures = s.lost_attempts = 0
    s.not_before = s.finished_at = None
    if s.lease is not None and not s.lease.released:
        s.lease = leases.released(s.lease, s.lease.expires_at)  # fences a holder still running
    s.compensation = None
    s.children = []
    s.exit_code = None
    s.approval = None
    s.cached_from = None


def _retrying(view: LocalView, sid: str, change: Change, what: str) -> None:
    for _ in range(5):
        if _transition(view, sid, change) is not None:
            return
    raise Conflict(f"step {sid!r} kept changing; {what} again")


def reset(view: LocalView, sid: str, reason: str) -> None:
    """any → pending, outputs cleared, history kept (resume --retry-failed, retry --from). Its
    foreach children are retired until the parent expands again."""
    for child in view.fresh(sid).children:
        retire(view, child, f"superseded: {reason}")
    _retrying(view, sid, lambda s: _clear(s, reason), "reset")


def reopen_loop(view: LocalView, sid: str, children: list[str], reason: str) -> None:
    """any → expanded: a loop is continued from inside one of its iterations (retry --from a
    body step, resume --retry-failed): it keeps ``children`` (earlier iterations, and the
    part of the reset iteration that is not re-run; the caller reset or retired the rest),
    its outputs are cleared and its ``until`` is evaluated again once they are done."""

    def change(s: StepState) -> None:
        s.status = StepStatus.EXPANDED
        s.children = list(children)
        s.reason, s.reason_kind = reason, None
        s.outputs = {}
        s.finished_at = None

    _retrying(view, sid, change, "reset")


def retire(view: LocalView, sid: str, reason: str) -> None:
    """any → skipped: a foreach child of a reset parent, until the parent expands again
    (which may produce different items, and revives the children it still has)."""
    cur = view.fresh(sid)
    if cur.status == StepStatus.SKIPPED and (cur.reason or "").startswith("superseded"):
        return

    def change(s: StepState) -> None:
        if s.lease is not None and not s.lease.released:
            s.lease = leases.released(s.lease, s.lease.expires_at)
        s.status = StepStatus.SKIPPED
        s.reason, s.reason_kind = reason, None

    _retrying(view, sid, change, "retire")


# -- holder transitions --------------------------------------------------------------------------
def heartbeat(hold: Hold, ttl: float, stop: threading.Event | None = None) -> None:
    """Extend the holder's lease to store now + ``ttl``. Fenced when it was taken over. No
    journal entry: nobody schedules on a lease extension."""
    now = hold.store.now()

    def change(s: StepState) -> None:
        assert s.lease is not None
        s.lease = leases.extended(s.lease, now, ttl)

    hold.write(change, notify=False, stop=stop)


@dataclass(frozen=True)
class Ending:
    """What the holder commits when its attempt ends (see :func:`commit`)."""

    attempt: AttemptInfo
    outputs: dict[str, Any] | None = None
    artifacts: dict[str, dict[str, Any]] | None = None
    cached_from: str | None = None
    #: seconds until the next attempt (retry_wait) — None: not retried
    retry_in: float | None = None


def _release_and_record(s: StepState, ending: Ending, now: float) -> None:
    assert s.lease is not None
    s.lease = leases.released(s.lease, now)
    s.history.append(ending.attempt)
    s.exit_code = ending.attempt.exit_code
    s.reason = ending.attempt.reason
    s.reason_kind = ending.attempt.reason_kind


def succeed(hold: Hold, ending: Ending) -> StepState:
    """running → succeeded, with the attempt's outputs and artifacts."""
    now = hold.store.now()

    def change(s: StepState) -> None:
        _release_and_record(s, ending, now)
        s.status = StepStatus.SUCCEEDED
        s.outputs = ending.outputs or {}
        s.artifacts = ending.artifacts or {}
        s.cached_from = ending.cached_from
        s.finished_at = now

    return hold.write(change)


def retry_wait(hold: Hold, ending: Ending) -> StepState:
    """running → retrying: failed, eligible again once the store clock passes not_before."""
    now = hold.store.now()

    def change(s: StepState) -> None:
        _release_and_record(s, ending, now)
        s.failures += 1
        s.status = StepStatus.RETRYING
        s.not_before = now + (ending.retry_in or 0.0)

    return hold.write(change)


def fail(hold: Hold, ending: Ending) -> StepState:
    """running → failed for good."""
    now = hold.store.now()

    def change(s: StepState) -> None:
        _release_and_record(s, ending, now)
        s.failures += 1
        s.status = StepStatus.FAILED
        s.finished_at = now

    return hold.write(change)


def hand_back(hold: Hold, ending: Ending) -> StepState:
    """running → pending: the worker was interrupted; the next worker starts a new attempt at
    once, and this one does not count as a failure."""
    now = hold.store.now()

    def change(s: StepState) -> None:
        _release_and_record(s, ending, now)
        s.status = StepStatus.PENDING if hold.kind is AttemptKind.RUN else StepStatus.SUCCEEDED

    return hold.write(change)


def cancel(hold: Hold, ending: Ending) -> StepState:
    """running → cancelled: the run was cancelled while the attempt ran."""
    now = hold.store.now()

    def change(s: StepState) -> None:
        _release_and_record(s, ending, now)
        s.status = StepStatus.CANCELLED
        s.finished_at = now

    return hold.write(change)


def compensated(hold: Hold, ending: Ending) -> StepState:
    """rolling_back → rolled_back. A failed compensation is not retried (compensations are
    meant to be idempotent but need not be safe to repeat); the run reports it."""
    now = hold.store.now()
    ok = ending.attempt.status == AttemptStatus.SUCCEEDED

    def change(s: StepState) -> None:
        assert s.lease is not None
        s.lease = leases.released(s.lease, now)
        s.history.append(ending.attempt)
        s.status = StepStatus.ROLLED_BACK
        s.compensation = "done" if ok else "failed"

    return hold.write(change)


# -- run control -----------------------------------------------------------------------------------
def set_control(view: LocalView, status: RunStatus, reason: str | None = None, *, finished: bool = False,
                signer: Signer | None = None) -> bool:
    """CAS run control to ``status``. False when control moved on (the view is refreshed).

    ``finished``: this write finishes the run, so it also seals it — with every step record
    known in full (those known only by status are read), the digest of their committed results and trace heads (signed by ``signer``
    when given) is written by this same CAS."""
    sealed: RunSeal | None = None
    if finished:
        etag = view.control_etag
        view.refresh()
        if view.control_etag != etag:
            return False  # control moved on meanwhile: the caller decides again
        sealed = _seal(view, status, signer)
    ctl = view.control.model_copy()
    ctl.status = status
    ctl.reason = reason
    ctl.updated_at = view.store.now()
    ctl.finished_at = ctl.updated_at if finished else None
    ctl.seal = sealed
    return _write_control(view, dump(ctl), ctl)


def _seal(view: LocalView, status: RunStatus, signer: Signer | None) -> RunSeal:
    # the exact committed records (heads included), not the status a journal entry carried,
    # and only records that exist: a verifier sees exactly those. `status` of the sealed run
    # reads the summary built from the same records as they pass (statusrows.SummaryWriter).
    summary = SummaryWriter(view)
    try:
        d, n = seal_digest(view.run_id, status, view.control.generation, summary.feed(view.exact_states()))
        sha = summary.write(d, n)
    finally:
        summary.close()
    if signer is None:
        return RunSeal(digest=d, steps=n, summary=sha)
    return RunSeal(digest=d, steps=n, summary=sha, key_id=signer.key_id, signature=signer.sign(d))


def reopen(view: LocalView, reason: str, budget: dict[str, float] | None = None) -> None:
    """finished → running, bumping the generation (resume, retry --from); ``budget``: limits
    raised by ``resume --budget``, merged into control's by the same CAS (so its journal entry
    announces them)."""
    for _ in range(5):
        if view.control.status == RunStatus.RUNNING and not budget:
            return
        ctl = view.control.model_copy()
        if budget:
            ctl.budget = {**ctl.budget, **budget}
            if ctl.status == RunStatus.RUNNING:  # only the limits change
                if _write_control(view, dump(ctl), ctl):
                    return
                continue
        ctl.generation += 1
        ctl.status = RunStatus.RUNNING
        ctl.reason = reason
        ctl.finished_at = None
        ctl.seal = None
        ctl.updated_at = view.store.now()
        if _write_control(view, dump(ctl), ctl):
            return
    raise Conflict(f"run {view.run_id!r}: control kept changing; try again")


def _write_control(view: LocalView, data: bytes, ctl: Any) -> bool:
    key = layout.control(view.run_id)
    try:
        etag = view.persist.call(lambda: cas(view.store, key, data, view.control_etag), what="write run control")
    except Superseded:
        view.refresh_control()
        return False
    view.control, view.control_etag = ctl, etag
    view.journal.mark_seen(announce(view.store, view.run_id, None, view.persist))
    return True
