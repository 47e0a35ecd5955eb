"""Barrier / wait-for: wait until named steps reach a terminal state.

A step's state is a JSON object with a ``status`` field at ``key_for(step)`` (by default
:func:`step_state_key`: ``runs/<run>/steps/<step>/state.json``, the orchestrator's layout).
Terminal statuses: succeeded, failed, skipped, cancelled, rolled_back.

Guarantees: returns only once every named step was observed in a terminal state; raises
:class:`Failed` (exit 1) as soon as any observed terminal status is not succeeded/skipped
("failed upstream"), :class:`TimedOut` (exit 124) when ``timeout`` elapses first. Polling uses
exponential backoff with full jitter (``initial`` .. ``max_interval`` seconds), and each round
re-reads only the steps not yet terminal: 1 GET per pending step per round.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable

from dagcraft.errors import Failed, TimedOut
from dagcraft.primitives.keys import validate_segment
from dagcraft.primitives.store import Store

TERMINAL = frozenset({"succeeded", "failed", "skipped", "cancelled", "rolled_back"})
OK = frozenset({"succeeded", "skipped"})


def step_state_key(run_id: str, step: str) -> str:
    """The store key of a step's state record."""
    validate_segment(run_id, "run id")
    validate_segment(step, "step id")
    return f"runs/{run_id}/steps/{step}/state.json"


def read_status(store: Store, key: str) -> str | None:
    got = store.get(key)
    if got is None:
        return None
    try:
        status = json.loads(got[0]).get("status")
    except (ValueError, AttributeError):
        return None
    return status if isinstance(status, str) else None


def wait_for(store: Store, names: Iterable[str], key_for: Callable[[str], str], *,
             timeout: float | None = None, initial: float = 0.1, max_interval: float = 5.0,
             sleep: Callable[[float], None] = time.sleep) -> dict[str, str]:
    """Wait until every name's state (at ``key_for(name)``) is terminal; return name → status."""
    names = list(dict.fromkeys(names))
    keys = {n: key_for(n) for n in names}
    deadline = None if timeout is None else time.monotonic() + timeout
    done: dict[str, str] = {}
    interval = initial
    while True:
        for n in names:
            if n in done:
                continue
            st = read_status(store, keys[n])
            if st in TERMINAL:
                done[n] = st
                if st not in OK:
                    raise Failed(f"upstream step {n!r} is {st}")
        if len(done) == len(names):
            return done
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                pending = [n for n in names if n not in done]
                raise TimedOut(f"timed out waiting for {', '.join(pending)}")
        else:
            left = max_interval
        sleep(min(random.uniform(0, interval), left) or 0.001)  # full jitter
        interval = min(interval * 2, max_interval)
