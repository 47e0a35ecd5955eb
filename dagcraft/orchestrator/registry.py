"""Worker registration: which workers are serving runs right now, judged on the store's clock.

Every worker process keeps one record, ``workers/<worker id>~<ulid>`` (:class:`WorkerRecord`): its
host, pid, start time, the runs it serves and the steps it is running, and its last beat.

Guarantees:
- A registered worker renews its record every ``beat_s`` (a third of its lease TTL, between
  1 and 15 s: 10 s by default): one PUT at start, one PUT per beat, whatever the number of
  runs or steps it serves. A worker serving every run renews only every ``IDLE_BEAT_S`` while
  it serves none (the record says so in its ``beat_s``), and at once when it starts serving. The record is the worker's own key, so the PUT is unconditional.
- A clean exit (drain, hand-back, ``exit_when_idle``) deletes the record (one DELETE). A
  worker killed without exiting stops renewing; its record reads as ``gone`` once its last
  beat is older than ``GONE_AFTER_BEATS`` beats plus ``GRACE_S`` — by then the leases of its
  steps (TTL three beats) have expired too — and the next worker to start deletes it once it
  is older than ``PRUNE_AFTER_S``.
- Liveness is judged only by the store's clock (``beat_at`` is ``store.now()`` when written).
- Reading who serves what costs one LIST of ``workers/`` and one GET per record.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable
from enum import Enum

from pydantic import BaseModel, Field

from dagcraft.errors import CorruptRecord, DagcraftError
from dagcraft.orchestrator import layout
from dagcraft.orchestrator.model import RUN_FINISHED, dump, load_record
from dagcraft.primitives.store import Store
from dagcraft.primitives.ulid import new_ulid

log = logging.getLogger(__name__)

#: a record whose last beat is this many beats old (plus GRACE_S) belongs to a gone worker
GONE_AFTER_BEATS = 3.0
#: absorbs the store clock's granularity (S3's Date header: one second) and a slow PUT
GRACE_S = 2.0
#: records of gone workers older than this are deleted by the next worker that starts
PRUNE_AFTER_S = 3600.0
#: how often a worker serving every run renews its record while it serves none: an idle pool
#: costs one PUT per worker per 5 minutes, and reads as gone 3 idle beats after it died
IDLE_BEAT_S = 300.0
#: what ``status`` and ``runs`` say about an unfinished run that no live worker serves
STALLED = "no live worker"


def beat_interval(lease_ttl: float) -> float:
    """How often a worker with this lease TTL renews its registration: as often as it renews
    its step leases, but at least every 15 s and at most every second."""
    return min(15.0, max(1.0, lease_ttl / 3.0))


class WorkerState(str, Enum):
    LIVE = "live"
    GONE = "gone"

    def __str__(self) -> str:
        return str(self.value)


class WorkerRecord(BaseModel):
    """``workers/<worker id>``: one worker process, as it last described itself."""

    worker_id: str
    #: this process start (a ULID): part of the key
    instance: str = ""
    host: str
    pid: int
    started_at: float
    #: store clock at the last renewal
    beat_at: float
    #: the renewal interval it promised (liveness is judged against it)
    beat_s: float
    #: the one run it serves (``worker --run``), or None: every run in the store
    only_run: str | None = None
    #: runs it is serving (not finished) at its last beat
    runs: list[str] = Field(default_factory=list)
    #: attempts it is running at its last beat, as ``<run>/<step>#<attempt>``
    steps: list[str] = Field(default_factory=list)

    def state(self, now: float) -> WorkerState:
        """LIVE while its last beat is recent enough on the store clock ``now``."""
        fresh = now - self.beat_at <= GONE_AFTER_BEATS * self.beat_s + GRACE_S
        return WorkerState.LIVE if fresh else WorkerState.GONE

    def serves(self, run_id: str) -> bool:
        """Whether this worker serves ``run_id`` (a worker serving every run picks up new
        and reopened runs within seconds, so it counts for all of them)."""
        return run_id in self.runs or self.only_run == run_id or self.only_run is None


class Registration:
    """A worker's own record, kept fresh by a daemon thread while the worker runs.

    ``snapshot`` is called at each beat and returns (runs served, attempts running)."""

    def __init__(self, store: Store, worker_id: str, beat_s: float, *, only_run: str | None = None,
                 snapshot: Callable[[], tuple[list[str], list[str]]] | None = None,
                 idle_beat_s: float | None = None) -> None:
        self.store = store
        #: the renewal interval while the snapshot shows no run served (None: always ``beat_s``)
        self.idle_beat_s = idle_beat_s
        self._nudged = threading.Event()
        instance = new_ulid()
        self.key = layout.worker_record(worker_id, instance)
        self.beat_s = beat_s
        self.snapshot = snapshot or (lambda: ([], []))
        self.record = WorkerRecord(worker_id=worker_id, instance=instance, host=socket.gethostname(), pid=os.getpid(),
                                   started_at=0.0, beat_at=0.0, beat_s=beat_s, only_run=only_run)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: set after every beat attempt (tests wait on it instead of sleeping)
        self.beaten = threading.Event()
        self.beats = 0

    def beat(self) -> None:
        """Write the record now (best effort: a store failure is retried at the next beat)."""
        try:
            runs, steps = self.snapshot()
            now = self.store.now()
            # the record promises the interval of its next renewal: liveness is judged by it
            beat_s = self.idle_beat_s if (self.idle_beat_s is not None and not runs and not steps) else self.beat_s
            rec = self.record.model_copy(update={"beat_at": now, "runs": sorted(runs), "steps": sorted(steps),
                                                 "started_at": self.record.started_at or now, "beat_s": beat_s})
            self.store.put(self.key, dump(rec))
            self.record = rec
            self.beats += 1
        except DagcraftError as exc:
            log.warning("worker registration not renewed: %s", exc)
        finally:
            self.beaten.set()

    def _loop(self) -> None:
        while True:
            self._nudged.wait(self.record.beat_s or self.beat_s)
            self._nudged.clear()
            if self._stop.is_set():
                return
            self.beat()

    def nudge(self) -> None:
        """Renew now (an idle worker that starts serving a run goes back to ``beat_s`` at once)."""
        self._nudged.set()

    def start(self) -> None:
        """Register (one PUT), prune long-gone records, and start renewing."""
        self.beat()
        prune(self.store, self.key)
        self._thread = threading.Thread(target=self._loop, name="dagcraft-registration", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing and remove the record: this worker is no longer serving anything."""
        self._stop.set()
        self._nudged.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.store.delete(self.key)
        except DagcraftError as exc:  # it reads as gone after a few beats anyway
            log.warning("worker registration not removed: %s", exc)


def _records(store: Store) -> list[tuple[str, WorkerRecord]]:
    """(key, record) of every readable registration. A record that does not parse is skipped:
    it describes no worker anyone could reach."""
    out: list[tuple[str, WorkerRecord]] = []
    for key in store.list(layout.WORKERS_PREFIX):
        got = store.get(key)
        if got is None:
            continue  # deleted by a clean exit meanwhile
        try:
            out.append((key, load_record(WorkerRecord, got[0], key, store.url)))
        except CorruptRecord:
            continue
    return out


def list_workers(store: Store) -> list[tuple[WorkerRecord, WorkerState]]:
    """Every registered worker and whether it is live, oldest first (1 LIST + 1 GET each)."""
    now = store.now()
    out = [(rec, rec.state(now)) for _, rec in _records(store)]
    return sorted(out, key=lambda r: (r[0].started_at, r[0].worker_id))


def prune(store: Store, keep: str | None = None) -> int:
    """Delete records of workers gone for longer than ``PRUNE_AFTER_S``; returns how many."""
    now = store.now()
    n = 0
    try:
        for key, rec in _records(store):
            if key != keep and now - rec.beat_at > PRUNE_AFTER_S:
                store.delete(key)
                n += 1
    except DagcraftError as exc:
        log.warning("could not prune worker records: %s", exc)
    return n


def live_serving(workers: Iterable[tuple[WorkerRecord, WorkerState]], run_id: str) -> list[WorkerRecord]:
    """The live workers that serve ``run_id``."""
    return [rec for rec, state in workers if state is WorkerState.LIVE and rec.serves(run_id)]


def stalled(workers: Iterable[tuple[WorkerRecord, WorkerState]], run_id: str, run_status: str) -> str | None:
    """``STALLED`` when the run is unfinished and no live worker serves it, else None."""
    if run_status in RUN_FINISHED or run_status == "corrupt":
        return None
    return None if live_serving(workers, run_id) else STALLED


def describe_workers(store: Store) -> list[dict[str, object]]:
    """``list_workers`` as JSON-ready dicts: the record, ``state`` and ``beat_age_s`` (store clock)."""
    now = store.now()
    return [{**rec.model_dump(mode="json"), "state": str(state), "beat_age_s": round(max(0.0, now - rec.beat_at), 1)}
            for rec, state in list_workers(store)]
