"""Submitting a compiled workflow as a run on the store."""

from __future__ import annotations

import getpass
import os
import secrets
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dagcraft.errors import Conflict
from dagcraft.orchestrator import journal, layout
from dagcraft.orchestrator.model import Control, RunRecord, StepState, dump
from dagcraft.primitives.keys import validate_segment
from dagcraft.primitives.store import Store
from dagcraft.primitives.ulid import new_ulid

REDACTED = "[redacted]"


def identity() -> str:
    """``user@host:pid``: who submitted or which worker holds a lease."""
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}:{os.getpid()}"


def new_run_id(name: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{name}-{stamp}-{secrets.token_hex(2)}"


def redacted_workflow(wf: Any) -> dict[str, Any]:
    """The compiled workflow as JSON with secret param values replaced: secrets never reach
    the store; workers read them from ``DAGCRAFT_PARAM_<NAME>`` in their environment."""
    data: dict[str, Any] = wf.model_dump(mode="json")
    for name in wf.secret_params:
        if name in data.get("params", {}):
            data["params"][name] = REDACTED
    return data


def submit(
    store: Store,
    wf: Any,
    *,
    run_id: str | None = None,
    spec_dir: str | None = None,
    submitted_by: str | None = None,
) -> str:
    """Write a run: the immutable run record, one pending state per step, run control, an
    index entry. Guarantee: a run id is taken at most once (If-None-Match on ``run.json``);
    a submit interrupted half-way leaves a run whose missing step states read as pending.
    """
    run_id = validate_segment(run_id or new_run_id(wf.name), "run id")
    data = redacted_workflow(wf)
    record = RunRecord(
        run_id=run_id,
        name=wf.name,
        spec_hash=wf.spec_hash,
        workflow=data,
        order=list(wf.steps),
        params=data.get("params", {}),
        secret_params=list(wf.secret_params),
        spec_dir=spec_dir,
        submitted_by=submitted_by or identity(),
        submitted_at=store.now(),
    )
    try:
        store.put(layout.run_record(run_id), dump(record), if_none_match=True)
    except Conflict:
        raise Conflict(f"run id {run_id!r} already exists in {store.url}") from None
    def write_state(step_id: str) -> None:
        try:
            store.put(layout.step_state(run_id, step_id), StepState(step_id=step_id).dump(), if_none_match=True)
        except Conflict:
            pass  # written by an earlier, interrupted submit of this run

    # independent writes: in parallel, so submitting a large DAG to S3 takes round trips / 16
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(write_state, wf.steps))
    store.put(layout.control(run_id), dump(Control(updated_at=store.now())), if_none_match=True)
    store.put(layout.runs_index_entry(new_ulid(), run_id), b"", if_none_match=True)
    journal.append(store, run_id, layout.CONTROL_MARK)
    return run_id
