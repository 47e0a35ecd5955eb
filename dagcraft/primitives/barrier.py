"""Barrier / wait-for: wait until named records in the store reach a terminal state.

The barrier knows no layout and no status vocabulary: the caller says where each name's record
lives (``key_for(name) -> key``) and what a record means (``classify(data) -> "ok" | "failed" |
None``, None = not terminal yet; a missing record is not terminal). The orchestrator's
``wait_for_steps`` (:mod:`dagcraft.orchestrator.waiting`) builds both for step state records.

Guarantees: returns only once every name's record was observed terminal ("ok"), with each
name's terminal record; raises :class:`Unsatisfied` (a :class:`~dagcraft.errors.Failed`, exit 1)
as soon as any record is classified "failed", :class:`~dagcraft.errors.TimedOut` (exit 124) when
``timeout`` elapses first. Polling uses exponential backoff with full jitter (``initial`` ..
``max_interval`` seconds), and each round re-reads only the names not yet terminal: 1 GET per
pending name per round.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from typing import Literal

from dagcraft.errors import Failed, TimedOut
from dagcraft.primitives.store import Store

Verdict = Literal["ok", "failed"]
#: what a record means: "ok" / "failed" when terminal, None while it is not
Classify = Callable[[bytes], Verdict | None]


class Unsatisfied(Failed):
    """A waited-for record reached a terminal state classified "failed" (exit 1)."""

    def __init__(self, name: str, data: bytes) -> None:
        super().__init__(f"{name!r} reached a failed state")
        self.name = name
        self.data = data


def wait_for(store: Store, names: Iterable[str], key_for: Callable[[str], str], classify: Classify, *,
             timeout: float | None = None, initial: float = 0.1, max_interval: float = 5.0,
             sleep: Callable[[float], None] = time.sleep) -> dict[str, bytes]:
    """Wait until every name's record (at ``key_for(name)``) is classified "ok"; return
    name → that terminal record's bytes, in the order of ``names`` (duplicates once).

    ``key_for`` is called for every name before the first read, so an invalid name fails
    before any waiting. Raises :class:`Unsatisfied` or :class:`TimedOut`; see the module
    docstring.
    """
    names = list(dict.fromkeys(names))
    keys = {n: key_for(n) for n in names}
    deadline = None if timeout is None else time.monotonic() + timeout
    done: dict[str, bytes] = {}
    interval = initial
    while True:
        for n in names:
            if n in done:
                continue
            got = store.get(keys[n])
            if got is None:
                continue
            verdict = classify(got[0])
            if verdict == "failed":
                raise Unsatisfied(n, got[0])
            if verdict == "ok":
                done[n] = got[0]
        if len(done) == len(names):
            return {n: done[n] for n in names}
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                pending = [n for n in names if n not in done]
                raise TimedOut(f"timed out waiting for {', '.join(pending)}")
        else:
            left = max_interval
        sleep(min(random.uniform(0, interval), left) or 0.001)  # full jitter
        interval = min(interval * 2, max_interval)
