"""A request-count harness: many real workers, one process, simulated time.

Everything that decides which store requests are made is the real code — :class:`Worker`
(its cycle, run discovery, poll backoff through :meth:`Worker.next_interval`), ``LocalView``,
the journal reader, the scheduler, the supervisor, ``transitions`` and the registration —
over a real :class:`LocalStore` (whose ``stats`` count every request). Two things are
simulated, so that 10,000 steps x 64 workers fit in a test:

- time: ``time.monotonic`` and the store clock are one :class:`Clock`, advanced from event to
  event (a worker's next cycle, an attempt's end, a registration beat) instead of waited for;
- execution: a claimed step "runs" for ``step_s`` simulated seconds, renewing its lease every
  ``heartbeat_s`` (``transitions.heartbeat``), and then commits ``succeeded`` through the real
  holder write (``transitions.succeed``: CAS + journal entry).
  A real attempt also uploads its trace and logs (about one PUT per attempt on top: see
  ``docs/store.md``), which this harness leaves out.

Workers are cycled one at a time in a fixed order, so counts are deterministic up to the
view's resync jitter.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

from dagcraft.orchestrator import WorkerConfig, submit, transitions
from dagcraft.orchestrator.model import AttemptInfo, AttemptStatus, StepState
from dagcraft.orchestrator.scheduler import WorkItem
from dagcraft.orchestrator.worker import Worker
from dagcraft.primitives.local import LocalStore
from dagcraft.workflows import compile_workflow
from dagcraft.workflows.spec import Spec


class Clock:
    """Simulated time: ``monotonic()`` for the workers, ``time()`` for the store clock."""

    def __init__(self) -> None:
        self.t = 0.0
        self.epoch = time.time()

    def monotonic(self) -> float:
        return self.t

    def time(self) -> float:
        return self.epoch + self.t


class SimStore(LocalStore):
    """The real local store, on the simulated clock; ``drop`` names journal keys (by substring)
    whose PUT is lost, as if the writer died right after its state CAS."""

    def __init__(self, root: Path, clock: Clock) -> None:
        super().__init__(root, fsync=False)
        self.clock = clock
        self.drop: list[str] = []
        self.dropped: list[str] = []
        #: the worker whose event the pool is processing: its GETs are counted in ``gets_by``,
        #: by worker and key
        self.actor: int | None = None
        self.gets_by: Counter[tuple[int, str]] = Counter()

    def get(self, key: str) -> tuple[bytes, str] | None:
        if self.actor is not None:
            self.gets_by[(self.actor, key)] += 1
        return super().get(key)

    def now(self) -> float:
        return self.clock.time()

    def put(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        for frag in self.drop:
            if "/journal/" in key and key.endswith(frag):
                self.drop.remove(frag)
                self.dropped.append(key)
                return "dropped"
        return super().put(key, data, if_none_match=if_none_match, if_match=if_match)


@dataclass
class SimJob:
    """Stands where a real ``Attempt`` would in ``Worker.running``."""

    w: WorkItem
    name: str
    #: a simulated attempt commits at its end, when it leaves ``Worker.running``
    holds_slot: bool = True

    def request_cancel(self, reason: Any) -> None:
        pass


@dataclass(order=True)
class _Event:
    at: float
    seq: int
    kind: str = field(compare=False)
    worker: int = field(compare=False)
    payload: Any = field(compare=False, default=None)


class SimWorker(Worker):
    """A real worker whose claimed attempts are handed to the harness instead of executed."""

    harness: Pool

    def _start(self, run_id: str, item: WorkItem) -> None:
        job = SimJob(item, str(item.hold.attempt))
        self.running[id(job)] = (run_id, job)  # type: ignore[assignment]
        self.harness.finish_later(self, run_id, job)


class Pool:
    """``n`` real workers serving every run in ``store``, driven on simulated time."""

    def __init__(self, store: SimStore, tmp: Path, n: int, *, step_s: float = 1.0, concurrency: int = 1,
                 lease_ttl: float = 30.0, poll_min: float = 0.05, poll_max: float = 1.0) -> None:
        self.store = store
        self.clock = store.clock
        self.step_s = step_s
        self.events: list[_Event] = []
        self.seq = itertools.count()
        self.workers: list[SimWorker] = []
        self.intervals: list[float] = []
        self.cycles = Counter[int]()
        self.gen: list[int] = []
        #: with ``kill_on_drop``, a worker whose journal PUT was dropped dies on the spot (its
        #: events are ignored from then on: no more cycles, beats or attempt ends)
        self.kill_on_drop = False
        self.dead: set[int] = set()
        for i in range(n):
            cfg = WorkerConfig(store=store, store_url=store.url, worker_id=f"w{i}", lease_ttl=lease_ttl,
                               tmp_root=tmp / f"w{i}", grace=1.0)
            w = SimWorker(cfg, concurrency=concurrency, poll_min=poll_min, poll_max=poll_max, inline=True)
            w.harness = self
            self.workers.append(w)
            self.intervals.append(poll_min)
            w.registration.beat()
            self.gen.append(0)
            self._cycle_at(i, self.clock.t + poll_min * i / max(1, n))  # staggered starts
            self._at(self.clock.t + w.registration.record.beat_s, "beat", i)

    def _at(self, at: float, kind: str, worker: int, payload: Any = None) -> None:
        heapq.heappush(self.events, _Event(at, next(self.seq), kind, worker, payload))

    def finish_later(self, w: SimWorker, run_id: str, job: SimJob) -> None:
        i = self.workers.index(w)
        end = self.clock.t + self.step_s
        self._at(end, "finish", i, (run_id, job))
        # the attempt's heartbeats (real holder writes: 1 PUT each), as a real attempt makes them
        beat = w.cfg.heartbeat_s
        t = self.clock.t + beat
        while t < end:
            self._at(t, "heartbeat", i, job)
            t += beat

    def _finish(self, i: int, run_id: str, job: SimJob) -> None:
        w = self.workers[i]
        hold = job.w.hold
        now = self.store.now()
        info = AttemptInfo(attempt=hold.attempt, status=AttemptStatus.SUCCEEDED, worker=w.cfg.worker_id,
                           started_at=hold.state.started_at, finished_at=now, exit_code=0)
        st: StepState = transitions.succeed(hold, transitions.Ending(attempt=info, outputs={}, artifacts={}))
        del w.running[id(job)]
        w._on_change(run_id)(st, hold.etag, hold.journal_key)
        self._cycle_at(i, self.clock.t)  # the end of its own attempt wakes the worker

    def _cycle_at(self, i: int, at: float) -> None:
        """(Re)schedule worker ``i``'s next cycle: any earlier-scheduled one is dropped."""
        self.gen[i] += 1
        self._at(at, "cycle", i, self.gen[i])

    def run_until(self, done: Any, *, limit_s: float = 10 * 3600.0) -> None:
        """Process events until ``done()`` (checked after every cycle) or ``limit_s`` of
        simulated time; AssertionError on the limit."""
        with mock.patch("time.monotonic", self.clock.monotonic):
            while self.events:
                ev = heapq.heappop(self.events)
                if ev.at > limit_s:
                    raise AssertionError(f"not done after {limit_s:.0f} simulated seconds")
                self.clock.t = max(self.clock.t, ev.at)
                w = self.workers[ev.worker]
                self.store.actor = ev.worker
                if ev.worker in self.dead:
                    continue
                dropped = len(self.store.dropped)
                if ev.kind == "finish":
                    self._finish(ev.worker, *ev.payload)
                elif ev.kind == "heartbeat":
                    if ev.payload in (job for _, job in w.running.values()):
                        transitions.heartbeat(ev.payload.w.hold, w.cfg.lease_ttl)
                elif ev.kind == "beat":
                    w.registration.beat()
                    self._at(self.clock.t + w.registration.record.beat_s, "beat", ev.worker)
                elif ev.kind == "cycle" and ev.payload == self.gen[ev.worker]:
                    changed = w.cycle()
                    self.cycles[ev.worker] += 1
                    self.intervals[ev.worker] = w.next_interval(changed, self.intervals[ev.worker])
                    self._cycle_at(ev.worker, self.clock.t + self.intervals[ev.worker])
                if self.kill_on_drop and len(self.store.dropped) > dropped:
                    self.dead.add(ev.worker)
                if ev.kind == "cycle" and done():
                    return
        raise AssertionError("no more events")


@dataclass
class Measured:
    steps: int
    workers: int
    submit: Counter[str]
    ran: Counter[str]
    simulated_s: float

    @property
    def per_step(self) -> float:
        return sum(self.ran.values()) / self.steps

    def breakdown(self) -> dict[str, float]:
        return {op: self.ran.get(op, 0) / self.steps for op in ("get", "put", "list", "delete", "head")}


def layered(n: int, width: int = 100) -> dict[str, Any]:
    """``n`` no-op steps in layers of ``width``; each step after the first layer needs one
    step of the previous layer (a rotation, so chains cross)."""
    steps = []
    for i in range(n):
        step: dict[str, Any] = {"id": f"s{i}", "run": ["true"]}
        if i >= width:
            layer, pos = divmod(i, width)
            step["needs"] = [f"s{(layer - 1) * width + (pos + 1) % width}"]
        steps.append(step)
    return {"name": "counts", "steps": steps}


def measure(tmp: Path, n: int, workers: int, *, step_s: float = 1.0, width: int = 100,
            concurrency: int = 1) -> Measured:
    """Submit ``layered(n)`` and run it with ``workers`` simulated workers to the end."""
    clock = Clock()
    store = SimStore(tmp / f"store-{n}-{workers}", clock)
    before = Counter(store.stats)
    rid = submit(store, compile_workflow(Spec.model_validate(layered(n, width)), {}))
    submitted = Counter(store.stats)
    submitted.subtract(before)
    pool = Pool(store, tmp / f"work-{n}-{workers}", workers, step_s=step_s, concurrency=concurrency)

    def done() -> bool:
        return all(rid in w.finished_runs and not w.running for w in pool.workers)

    start = clock.t
    pool.run_until(done)
    ran = Counter(store.stats)
    ran.subtract(submitted)
    ran.subtract(before)
    return Measured(n, workers, +submitted, +ran, clock.t - start)
