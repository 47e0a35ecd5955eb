"""Timers: one thread per process that runs short callbacks when they fall due.

An attempt's heartbeat and log-streaming threads are only needed by a step that is still
running after its first beat or log snapshot is due; most steps of a DAG end sooner. So the
attempt asks for them with :meth:`Timers.after` instead of starting them at once: a short step
starts no thread at all (two thread starts cost ~0.3 ms of CPU and up to milliseconds of
latency on a busy machine, per step).

Guarantees: a callback runs at most once, on the timers' thread, no earlier than its delay;
a callback cancelled before it is taken off the queue never runs (one that was already taken
may still be running: callers that must not overlap it check their own state under their own
lock). Callbacks must be quick (they delay the ones due after them); an exception in one is
logged and does not stop the others. Fork-safe: a forked child that schedules a callback gets
its own thread (the parent's is not inherited).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Timers:
    """A queue of due callbacks served by one daemon thread, started at the first ``after``."""

    def __init__(self) -> None:
        self._cv = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._live: set[int] = set()  # handles in the heap, not cancelled
        self._cancelled: set[int] = set()  # handles in the heap, cancelled
        self._seq = itertools.count()
        self._pid: int | None = None  # the process whose thread serves the queue

    def after(self, delay: float, fn: Callable[[], None]) -> int:
        """Run ``fn`` once, ``delay`` seconds from now; returns a handle for :meth:`cancel`."""
        with self._cv:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                self._heap, self._live, self._cancelled = [], set(), set()  # a forked child: none of the parent's
                threading.Thread(target=self._serve, name="dagcraft-timers", daemon=True).start()
            handle = next(self._seq)
            entry = (time.monotonic() + delay, handle, fn)
            heapq.heappush(self._heap, entry)
            self._live.add(handle)
            # the thread sleeps until the earliest deadline: woken only when that moved earlier
            # (a wake-up is a thread switch; an attempt schedules and cancels two timers)
            if self._heap[0] is entry:
                self._cv.notify()
            return handle

    def cancel(self, handle: int) -> None:
        """``fn`` of ``handle`` will not start from now on (a no-op once it has run). The
        thread is not woken: it drops the entry when that comes due."""
        with self._cv:
            if handle in self._live:
                self._live.discard(handle)
                self._cancelled.add(handle)

    def pending(self) -> int:
        """Callbacks waiting (cancelled ones excluded)."""
        with self._cv:
            return len(self._live)

    def _next(self) -> Callable[[], None]:
        with self._cv:
            while True:
                if not self._heap:
                    self._cv.wait()
                    continue
                due, handle, fn = self._heap[0]
                if handle in self._cancelled:
                    heapq.heappop(self._heap)
                    self._cancelled.discard(handle)
                    continue
                now = time.monotonic()
                if due > now:
                    self._cv.wait(due - now)
                    continue
                heapq.heappop(self._heap)
                self._live.discard(handle)
                return fn

    def _serve(self) -> None:
        while True:
            fn = self._next()
            try:
                fn()
            except Exception:
                log.exception("timer callback failed")
