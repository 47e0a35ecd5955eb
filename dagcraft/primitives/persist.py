"""Riding out store outages: one retry policy for writes that must land.

A store call that raises :class:`StoreUnavailable` has already been retried by the store for
a moment (S3: a few tries over about a second). Writes that decide a step's fate — a claim,
a heartbeat, a commit, a journal entry, an attempt's trace — must instead survive an outage
of minutes: :class:`Persistence` calls them again with exponential backoff and full jitter
until they succeed, until ``limit_s`` has passed, or until ``stop`` is set. A try may have
landed although its response was lost: conditional writes made through :func:`~.store.cas`
recognise their own landed write when they are tried again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import tenacity

from dagcraft.errors import StoreRefused, StoreUnavailable

T = TypeVar("T")
log = logging.getLogger(__name__)


def _outage(exc: BaseException) -> bool:
    """Worth waiting for: the store is unavailable, not refusing us for good."""
    return isinstance(exc, StoreUnavailable) and not isinstance(exc, StoreRefused)


@dataclass(frozen=True)
class Persistence:
    """Retry through StoreUnavailable for up to ``limit_s`` seconds (0: a single try)."""

    limit_s: float = 300.0
    first_wait_s: float = 0.1
    max_wait_s: float = 2.0

    def call(self, fn: Callable[[], T], *, what: str = "store write",
             stop: threading.Event | None = None) -> T:
        """``fn()`` until it returns. Raises the last StoreUnavailable when the limit passes
        or ``stop`` is set; every other exception (StoreRefused included) at once."""
        # the first try outside tenacity: it is nearly always the only one, and building the
        # retry machinery for it cost more than a local store write
        started = time.monotonic()
        try:
            return fn()
        except BaseException as exc:
            if not _outage(exc) or self.limit_s <= 0 or (stop is not None and stop.is_set()):
                raise
            log.warning("%s: store unavailable (try 1), retrying: %s", what, exc)

        def note(state: tenacity.RetryCallState) -> None:
            n = state.attempt_number + 1  # the first try was made above
            if n == 10 or n % 50 == 0:
                exc = state.outcome.exception() if state.outcome else None
                log.warning("%s: store unavailable (try %d), retrying: %s", what, n, exc)

        halt: tenacity.stop.stop_base = tenacity.stop_after_delay(max(0.0, self.limit_s - (time.monotonic() - started)))
        if stop is not None:
            halt = halt | tenacity.stop_when_event_set(stop)
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(_outage),
            stop=halt,
            wait=tenacity.wait_random_exponential(multiplier=self.first_wait_s, max=self.max_wait_s),
            before_sleep=note,
            reraise=True,
        )
        return retrying(fn)


#: a single try: for interactive commands, which report an outage (exit 5) instead of waiting
ONCE = Persistence(limit_s=0.0)
