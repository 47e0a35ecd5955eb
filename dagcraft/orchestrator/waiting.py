"""Waiting for steps of a run: the run layout and step statuses on top of the generic barrier.

:func:`wait_for_steps` is what ``dagcraft agent wait-for`` (and any step's command) uses to wait
until named steps of a run are terminal. The polling itself (exponential backoff with full
jitter, 1 GET per pending step per round) is :func:`dagcraft.primitives.barrier.wait_for`; this
module only says where a step's state lives (:func:`dagcraft.orchestrator.layout.step_state`)
and what its ``status`` means.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable

from dagcraft.errors import Failed, NotFound
from dagcraft.orchestrator import layout
from dagcraft.orchestrator.model import TERMINAL, RunRecord, StepStatus, load_record
from dagcraft.primitives import barrier
from dagcraft.primitives.store import Store

#: terminal statuses that satisfy a wait; any other terminal status is "failed upstream"
OK: frozenset[StepStatus] = frozenset({StepStatus.SUCCEEDED, StepStatus.SKIPPED})


def _status(data: bytes) -> str | None:
    """The ``status`` of a step state record, or None when the record is not readable."""
    try:
        status = json.loads(data).get("status")
    except (ValueError, AttributeError):
        return None
    return status if isinstance(status, str) else None


def classify_step(data: bytes) -> barrier.Verdict | None:
    """A step state record's verdict for the barrier: "ok", "failed", or None (not terminal)."""
    status = _status(data)
    if status not in TERMINAL:
        return None
    return "ok" if status in OK else "failed"


def _known_or_raise(store: Store, run_id: str, steps: list[str]) -> None:
    """NotFound for a step without a state that the run will never create: one GET per step
    (which validates every id first), plus run.json and a foreach parent only when needed."""
    absent = [s for s in steps if store.get(layout.step_state(run_id, s)) is None]
    if not absent:
        return
    key = layout.run_record(run_id)
    got = store.get(key)
    if got is None:
        raise NotFound(f"run {run_id!r} not found in {store.url}")
    defs = load_record(RunRecord, got[0], key, store.url).workflow.get("steps", {})
    for step in absent:
        if step in defs:
            continue  # submitted (its state write was interrupted): reads as pending
        parent = step.rsplit("[", 1)[0] if step.endswith("]") and "[" in step else None
        if parent is not None and parent in defs and defs[parent].get("foreach"):
            pgot = store.get(layout.step_state(run_id, parent))
            try:
                children = json.loads(pgot[0]).get("children") if pgot else None
            except (ValueError, AttributeError):
                children = None  # unreadable: let the wait decide
            if not children or step in children:
                continue  # a foreach child its parent has not expanded to yet
        raise NotFound(f"step {step!r} not found in run {run_id!r}")


def wait_for_steps(store: Store, run_id: str, steps: Iterable[str], timeout: float | None = None, *,
                   initial: float = 0.1, max_interval: float = 5.0,
                   sleep: Callable[[float], None] = time.sleep) -> dict[str, str]:
    """Wait until every named step of ``run_id`` is terminal; return step → status.

    Every id is validated before the first read (InvalidInput, exit 2). Raises
    :class:`~dagcraft.errors.Failed` (exit 1, "failed upstream") as soon as a step is observed
    failed, cancelled or rolled back, :class:`~dagcraft.errors.TimedOut` (exit 124) when
    ``timeout`` seconds pass first. A step whose state does not exist yet is waited for
    only if the run can still create it (a foreach child not expanded yet); a step the run
    does not have raises :class:`~dagcraft.errors.NotFound` (exit 4) before any waiting.
    """
    steps = list(steps)
    _known_or_raise(store, run_id, steps)
    try:
        done = barrier.wait_for(store, steps, lambda step: layout.step_state(run_id, step), classify_step,
                                timeout=timeout, initial=initial, max_interval=max_interval, sleep=sleep)
    except barrier.Unsatisfied as exc:
        raise Failed(f"upstream step {exc.name!r} is {_status(exc.data)}") from None
    return {step: _status(data) or "" for step, data in done.items()}
