"""The worker: serves runs — each cycle the scheduler claims ready work, the executor runs it.

A worker serves every run in the store (discovered through ``runs-index/``, read with the
same look-back as the journal, so a run submitted from a host whose clock is behind is still
found) or one run. Each cycle costs one LIST per served run plus one GET per changed record —
never a scan of the DAG. Discovery costs one GET of the ``runs-wake`` marker per check (every
2 s, backing off to every 10 s while nothing new comes), and a LIST of the index only when the
marker changed or every 30 min: an idle worker costs about $0.005 a day on AWS list prices
(docs/store.md), and sees a submitted run at its next check. The supervisor role of a run is held by whichever worker holds its
supervisor lease.

Signals: SIGTERM drains (finish running steps, claim nothing new); SIGINT, or a second
SIGTERM, hands running steps back (their children are killed and the steps return to pending
for the next worker, without counting as failures).

Exit code of :meth:`Worker.run`: 0, except for a worker serving one run with
``exit_when_idle``, which exits with that run's code: 0 succeeded (or waiting for an approval
that only a person can give: it leaves the run to ``resume``), 1 failed (or cancelled, rolled
back, or its records are corrupt), 130 interrupted before the run finished. Such a worker
raises NotFound (exit 4) if the run is not in the store when it starts; without
``exit_when_idle`` a worker waits for its run to be submitted.

Registration: while it runs, a worker keeps its record in ``workers/`` fresh
(:mod:`~dagcraft.orchestrator.registry`: one PUT per beat, a third of its lease TTL capped to
1–15 s) and deletes it on a clean exit, so ``dagcraft workers`` lists it and a run nobody
serves any more reads as stalled.

Corruption is contained: a run with a record that cannot be parsed (``CorruptRecord``) is
reported once with the bad key and no longer served; every other run keeps being served.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import random
import signal
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from dagcraft.errors import (
    EXIT_BUDGET,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    Conflict,
    CorruptRecord,
    DagcraftError,
    InvalidInput,
    NotFound,
    StoreUnavailable,
)
from dagcraft.orchestrator import layout, ops, registry
from dagcraft.orchestrator.attempt import Attempt, WorkerConfig
from dagcraft.orchestrator.journal import KeyFeed
from dagcraft.orchestrator.model import RUN_FINISHED, AttemptStatus, RunStatus, StepState
from dagcraft.orchestrator.outbox import Outbox
from dagcraft.orchestrator.scheduler import Scheduler, WorkItem
from dagcraft.orchestrator.scratch import clean_run_scratch
from dagcraft.orchestrator.supervisor import Supervisor
from dagcraft.orchestrator.view import LocalView
from dagcraft.primitives.store import Store

log = logging.getLogger(__name__)

#: run discovery (every run served): a check is one GET of the ``runs-wake`` marker, which
#: every submit and resume rewrites after its ``runs-index/`` entry; the index is listed only
#: when the marker changed, or every ``INDEX_MAX_S`` in case a submitter died between the two.
#: Checks back off from DISCOVER_MIN_S, doubling while they find nothing, to WAKE_MAX_S.
DISCOVER_MIN_S = 2.0
WAKE_MAX_S = 10.0
INDEX_MAX_S = 1800.0


class RunDriver:
    """One served run: its view, scheduler and supervisor role."""

    def __init__(self, cfg: WorkerConfig, run_id: str) -> None:
        self.run_id = run_id
        self.view = LocalView(cfg.store, run_id, persist=cfg.persist)
        self.scheduler = Scheduler(self.view, cfg.worker_id, cfg.lease_ttl)
        self.supervisor = Supervisor(self.view, cfg.worker_id, cfg.lease_ttl, signer=cfg.signer)

    @property
    def finished(self) -> bool:
        return self.view.control.status in RUN_FINISHED


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
        self.finished_runs: dict[str, RunStatus] = {}
        #: runs not served because a record of theirs is unreadable: run id -> the bad key
        self.corrupt: dict[str, str] = {}
        self.running: dict[Future[StepState] | int, tuple[str, Attempt]] = {}
        # twice the slots: an attempt past its commit (uploading its trace) gives its slot back
        # while its thread finishes, and the next attempt must not wait for that thread
        self.pool = None if inline else ThreadPoolExecutor(max_workers=2 * self.concurrency,
                                                           thread_name_prefix="dagcraft-step")
        self.outbox = Outbox(cfg.store, cfg.tmp_root / "outbox")
        self.wake = threading.Event()
        self.changes: queue.Queue[tuple[str, StepState, str, str | None]] = queue.Queue()
        self.draining = False
        self.handing_back = False
        self._index = KeyFeed(cfg.store, layout.RUNS_INDEX)
        self._index_next = 0.0  # monotonic time of the next discovery check
        self._discover_s = DISCOVER_MIN_S  # backs off while checks find nothing new
        self._list_due = 0.0  # the next full listing of the index, whatever the marker says
        self._wake_etag: str | None = None
        self._rng = random.Random()
        self.registration = registry.Registration(cfg.store, cfg.worker_id, registry.beat_interval(cfg.lease_ttl),
                                                  only_run=run_id, snapshot=self._serving,
                                                  idle_beat_s=registry.IDLE_BEAT_S if run_id is None else None)

    def _serving(self) -> tuple[list[str], list[str]]:
        """(runs served, attempts running) for the registration, read from the beat thread."""
        for _ in range(5):  # the main thread may change these dicts while they are copied
            try:
                runs = list(self.drivers) or ([self.only_run] if self.only_run else [])
                steps = [f"{rid}/{job.w.step.id}#{job.name}" for rid, job in list(self.running.values())
                         if job.holds_slot]  # not those past their commit, only uploading
                return runs, steps
            except RuntimeError:
                continue
        return [], []

    # -- signals -----------------------------------------------------------------------------
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
            job.request_cancel(AttemptStatus.INTERRUPTED)
        self.wake.set()

    # -- discovery -------------------------------------------------------------------------------
    def _serve(self, run_id: str) -> None:
        if run_id in self.drivers:
            return
        try:
            driver = RunDriver(self.cfg, run_id)
        except NotFound:
            if run_id == self.only_run and self.exit_when_idle:
                raise  # a run never submitted gives nothing to do, ever: waiting would hang
            return  # not submitted yet (or its index entry outlived it): looked for again later
        except (CorruptRecord, InvalidInput) as exc:
            self._not_serving(run_id, exc)
            return
        self.corrupt.pop(run_id, None)
        if driver.finished and run_id != self.only_run:
            self.finished_runs[run_id] = driver.view.control.status
            return
        self.finished_runs.pop(run_id, None)
        self.drivers[run_id] = driver
        if len(self.drivers) == 1:
            self.registration.nudge()  # idle until now: renew at the serving rate from here on

    def _not_serving(self, run_id: str, exc: DagcraftError) -> None:
        """Contain a run whose records cannot be read: report it once (the bad key), mark it
        ``corrupt/<run>`` for ``runs``, and stop serving it — every other run is unaffected.
        A later index entry for it (a resume) makes this worker try it again."""
        self.drivers.pop(run_id, None)
        if run_id in self.corrupt:
            return
        self.corrupt[run_id] = getattr(exc, "key", str(exc))
        log.error("%s: not serving this run: %s", run_id, exc)
        if isinstance(exc, CorruptRecord):
            ops.note_corrupt(self.cfg.store, run_id, exc, self.cfg.worker_id)

    def _discover(self) -> None:
        if self.only_run is not None:
            if (self.only_run not in self.drivers and self.only_run not in self.finished_runs
                    and self.only_run not in self.corrupt):
                self._serve(self.only_run)
            return
        now = time.monotonic()
        if now < self._index_next:
            return
        got = self.cfg.store.get(layout.RUNS_WAKE)  # read before listing: a later submit changes it
        etag = got[1] if got is not None else None
        found = False
        if etag != self._wake_etag or now >= self._list_due:
            self._wake_etag = etag
            self._list_due = now + INDEX_MAX_S
            for key in self._index.poll():
                found = True
                self._serve(layout.parse_runs_index_key(key))
        self._discover_s = DISCOVER_MIN_S if found else min(WAKE_MAX_S, self._discover_s * 2)
        # jittered, so a pool of idle workers checks spread out rather than in step
        self._index_next = now + self._discover_s * self._rng.uniform(0.8, 1.2)

    # -- execution -------------------------------------------------------------------------------
    def _on_change(self, run_id: str) -> Callable[[StepState, str, str | None], None]:
        def push(state: StepState, etag: str, journal_key: str | None) -> None:
            self.changes.put((run_id, state, etag, journal_key))
            self.wake.set()
        return push

    def _start(self, run_id: str, item: WorkItem) -> None:
        job = Attempt(self.cfg, item, on_change=self._on_change(run_id), outbox=self.outbox, on_release=self.wake.set)
        self.log(f"{run_id}: claimed {job.label}")
        if self.pool is None:
            self.running[id(job)] = (run_id, job)
            if self.handing_back:
                job.request_cancel(AttemptStatus.INTERRUPTED)
            try:
                job.run()
            finally:
                del self.running[id(job)]
            return
        fut = self.pool.submit(job.run)
        self.running[fut] = (run_id, job)
        fut.add_done_callback(lambda _f: self.wake.set())
        if self.handing_back:
            # the Ctrl-C came while this attempt was being started, before it was in
            # ``running``: hand_back() did not see it. (Both run on the main thread, so the
            # handler ran either before this check or after the attempt was recorded.)
            job.request_cancel(AttemptStatus.INTERRUPTED)

    def _reap(self) -> None:
        for fut in [f for f in self.running if isinstance(f, Future) and f.done()]:
            _, job = self.running.pop(fut)
            exc = fut.exception()
            if exc is not None:  # attempts catch their own errors: this is a bug, never dropped
                log.error("%s: attempt thread failed", job.label, exc_info=exc)
        while True:
            try:
                run_id, state, etag, journal_key = self.changes.get_nowait()
            except queue.Empty:
                break
            self.log(f"{run_id}: {state.step_id} {state.status}" + (f" ({state.reason})" if state.reason else ""))
            if run_id in self.drivers:
                try:
                    self.drivers[run_id].view.apply(state, etag)
                except CorruptRecord as exc:  # a foreach child it lists is unreadable
                    self._not_serving(run_id, exc)
                    continue
                if journal_key:
                    self.drivers[run_id].view.journal.mark_seen(journal_key)

    def _serve_cycle(self, run_id: str, driver: RunDriver) -> bool:
        before = driver.view.changes
        try:
            driver.view.refresh()
            if driver.view.control.status == RunStatus.CANCELLING:
                for _, (rid, job) in list(self.running.items()):
                    if rid == run_id:
                        job.request_cancel(AttemptStatus.CANCELLED)
            driver.supervisor.tick()
            if driver.finished:
                if not any(rid == run_id for rid, _ in self.running.values()):
                    driver.supervisor.release()
                    self.finished_runs[run_id] = driver.view.control.status
                    del self.drivers[run_id]
                    clean_run_scratch(self.cfg.tmp_root, run_id)
                return True
            if not self.draining:
                capacity = self.free_slots()
                if capacity > 0:
                    for item in driver.scheduler.decide(capacity):
                        self._start(run_id, item)
        except CorruptRecord as exc:
            try:
                driver.supervisor.release()
            except DagcraftError:
                pass  # the supervisor lease expires after its TTL
            self._not_serving(run_id, exc)
            return True
        except (StoreUnavailable, Conflict) as exc:
            # a store outage (already ridden out for a while) or a lost race must not kill a
            # long-running worker: running attempts keep their heartbeats; try again later
            self.log(f"{run_id}: cycle interrupted: {exc}")
            driver.supervisor.store_failed()
            raise
        return driver.view.changes != before

    def cycle(self) -> bool:
        """One pass over every served run. Returns True when something changed."""
        self.outbox.flush()
        self._discover()
        self._reap()
        active = False
        for run_id, driver in list(self.drivers.items()):
            active = self._serve_cycle(run_id, driver) or active
        return active

    def free_slots(self) -> int:
        """How many attempts this worker may start now: ``concurrency`` less the attempts
        whose outcome is not committed yet. An attempt past its commit (closing and uploading
        its trace) holds no slot, but at most ``concurrency`` such attempts are waited for, so
        a started attempt always has a thread (a claimed step never waits unheartbeated)."""
        held = sum(1 for _, job in self.running.values() if job.holds_slot)
        return max(0, min(self.concurrency - held, 2 * self.concurrency - len(self.running)))

    def next_interval(self, changed: bool, interval: float) -> float:
        """The wait before the next cycle: ``poll_min`` after a cycle that saw a change this
        worker can act on (it has a free slot, or holds a run's supervisor role), else twice
        the last wait, up to ``poll_max``. A worker with every slot busy need not chase other
        workers' changes: the end of one of its own attempts wakes it at once."""
        actionable = changed and (self.free_slots() > 0
                                  or any(d.supervisor.lease is not None for d in self.drivers.values()))
        return self.poll_min if actionable else min(self.poll_max, interval * 2)

    def idle_done(self) -> bool:
        if self.running:
            return False
        if self.handing_back or self.draining:
            return True
        if not self.exit_when_idle:
            return False
        if self.only_run is not None:
            return (self.only_run in self.finished_runs or self.only_run in self.corrupt
                    or self.waiting_for_approval(self.only_run))
        return all(self.waiting_for_approval(rid) for rid in self.drivers)

    def waiting_for_approval(self, run_id: str) -> bool:
        """The run can go on only after a person decides a gate (``exit_when_idle`` leaves it:
        ``resume`` after the decision continues it)."""
        driver = self.drivers.get(run_id)
        return driver is not None and driver.view.control.status == RunStatus.RUNNING \
            and driver.view.blocked_on_approval()

    def exit_code(self) -> int:
        """The served run's exit code (one run, ``exit_when_idle``), else 0."""
        if self.only_run is None or not self.exit_when_idle:
            return EXIT_OK
        status = self.finished_runs.get(self.only_run)
        if self.only_run in self.corrupt:
            return EXIT_FAILED
        if status is None:
            return EXIT_OK if self.waiting_for_approval(self.only_run) else EXIT_INTERRUPTED
        if status == RunStatus.BUDGET_EXCEEDED:
            return EXIT_BUDGET
        return EXIT_OK if status == RunStatus.SUCCEEDED else EXIT_FAILED

    def run(self) -> int:
        interval = self.poll_min
        self.registration.start()
        try:
            while True:
                try:
                    changed = self.cycle()
                except (StoreUnavailable, Conflict):
                    changed = False
                    interval = self.poll_max
                if self.on_cycle is not None:
                    self.on_cycle(self)
                if self.idle_done():
                    break
                if changed and self.inline:
                    interval = self.poll_min
                    continue
                interval = self.next_interval(changed, interval)
                self.wake.wait(interval)
                self.wake.clear()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)
            self._reap()
            for run_id, driver in self.drivers.items():
                driver.supervisor.release()
                clean_run_scratch(self.cfg.tmp_root, run_id)
            if self.outbox.drain(min(self.cfg.outage_s, 60.0)):
                log.error("%d uploads could not be made before exit; a later worker on this host will retry "
                          "them (until then `trace verify` reports those traces missing)", len(self.outbox))
            self.registration.stop()
        return self.exit_code()


@dataclass
class ServeOptions:
    """What ``dagcraft worker`` is told on its command line (see :func:`serve`)."""

    #: one run id (resolved), or None for every run in the store
    run_id: str | None = None
    concurrency: int = 1
    exit_when_idle: bool = False
    lease_ttl: float = 30.0
    poll_max: float = 1.0
    echo: bool = False
    keep_workdirs: bool = False
    #: path of the Ed25519 key that signs seals (else $DAGCRAFT_SIGNING_KEY, then unsigned)
    signing_key: str | None = None


def serve(store_url: str | None, opts: ServeOptions, *, env: Mapping[str, str] | None = None,
          resolve_run: Callable[[Store, str], str] | None = None,
          log: Callable[[str], None] | None = None,
          announce: Callable[[str, str, str | None], None] | None = None) -> int:
    """The body of ``dagcraft worker``, for the command and for a pool's forked workers alike:
    load the signer (and drop ``$DAGCRAFT_SIGNING_KEY`` from the environment the steps
    inherit), apply ``env`` (secret params, ``DAGCRAFT_PARAM_*``) to ``os.environ``, open a
    store of this process's own from ``store_url`` (None: $DAGCRAFT_STORE, else .dagcraft)
    and refuse one without the guarantees (StoreUnavailable, exit 5), resolve the run with ``resolve_run`` (``@latest``), install the
    worker's signal handlers, call ``announce(worker_id, url, run_id)``, and serve. Returns
    the worker's exit code (see :meth:`Worker.run`)."""
    from dagcraft.orchestrator.attempt import WorkerConfig
    from dagcraft.orchestrator.submission import identity
    from dagcraft.primitives import open_store
    from dagcraft.primitives.capabilities import require
    from dagcraft.primitives.url import resolve_store_url
    from dagcraft.tracing.seal import take_signer

    signer = take_signer(opts.signing_key)
    # the worker reads secrets from its environment (load_run); its steps never see them
    os.environ.update(env or {})
    resolved = resolve_store_url(store_url)
    store = open_store(resolved)
    require(store)
    root = getattr(store, "root", None)
    url = str(root) if root is not None else resolved  # children reach it whatever their cwd
    run_id = opts.run_id
    if run_id is not None and resolve_run is not None:
        run_id = resolve_run(store, run_id)
    cfg = WorkerConfig(store=store, store_url=url, worker_id=identity(), lease_ttl=opts.lease_ttl, echo=opts.echo,
                       keep_workdirs=opts.keep_workdirs, signer=signer)
    w = Worker(cfg, run_id=run_id, concurrency=opts.concurrency, exit_when_idle=opts.exit_when_idle,
               poll_max=opts.poll_max, log=log)
    w.install_signal_handlers()
    if announce is not None:
        announce(cfg.worker_id, url, run_id)
    # what is alive now (modules, classes, the store) lives as long as the worker: out of the
    # collector's way, so its full collections do not walk it again and again (in a forked
    # worker it also keeps those pages shared with the parent)
    gc.freeze()
    return w.run()
