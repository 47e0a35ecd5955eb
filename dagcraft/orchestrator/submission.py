"""Submitting a compiled workflow as a run on the store."""

from __future__ import annotations

import getpass
import os
import secrets
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydantic_core

from dagcraft.errors import Conflict, DagcraftError, InvalidInput
from dagcraft.orchestrator import journal, layout
from dagcraft.orchestrator.model import Control, RunRecord, dump, dump_run_record
from dagcraft.primitives.keys import validate_run_id
from dagcraft.primitives.store import Store
from dagcraft.workflows.gcpause import paused_gc

if TYPE_CHECKING:
    from dagcraft.workflows import CompiledWorkflow

REDACTED = "[redacted]"


def user_at_host() -> str:
    """``user@host``: the person (or service account) behind this process."""
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def identity() -> str:
    """``user@host:pid``: who submitted or which worker holds a lease."""
    return f"{user_at_host()}:{os.getpid()}"


def new_run_id(name: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{name[:100]}-{stamp}-{secrets.token_hex(2)}"  # always a valid run id


def redacted_workflow(wf: Any) -> tuple[bytes, dict[str, Any]]:
    """The compiled workflow as JSON, and its params as JSON data, with secret param values
    replaced: secrets never reach the store; workers read them from ``DAGCRAFT_PARAM_<NAME>``
    in their environment."""
    params = dict(wf.params)
    for name in wf.secret_params:
        if params.get(name) is not None:  # an unset optional secret stays None
            params[name] = REDACTED
    redacted = wf.model_copy(update={"params": params})
    return redacted.model_dump_json().encode(), pydantic_core.to_jsonable_python(params)


def compile_spec(path: Path, pairs: Sequence[str] = (), secrets: Mapping[str, str] | None = None,
                 environ: Mapping[str, str] | None = None) -> CompiledWorkflow:
    """Compile the spec at ``path`` with its params from, in this order: ``-p`` ``pairs``;
    ``secrets`` (read by :func:`~dagcraft.orchestrator.view.read_secrets`), which may only
    set params declared ``secret: true``; and, for a secret param given neither way, the
    ``DAGCRAFT_PARAM_<NAME>`` variable of ``environ`` (default: this process's environment).
    Only secret params are read from the environment: a stray variable never changes a
    public param. InvalidInput/SpecError (exit 2) on any problem; nothing is written."""
    # the YAML loader and the compiler: here, not at import (ops imports this module)
    from dagcraft.workflows import compile_workflow, load_spec, parse_params

    spec = load_spec(Path(path))
    params: dict[str, Any] = dict(parse_params(list(pairs)))
    for name, value in (secrets or {}).items():
        declared = spec.params.get(name)
        if declared is None:
            raise InvalidInput(f"secret {name!r}: no such parameter; declared: {', '.join(spec.params) or 'none'}")
        if not declared.secret:
            raise InvalidInput(f"secret {name!r}: the parameter is not declared 'secret: true'; pass it with -p")
        if name in params:
            raise InvalidInput(f"parameter {name!r} given twice (-p and a secret option)")
        params[name] = value
    env = os.environ if environ is None else environ
    for name, declared in spec.params.items():
        if declared.secret and name not in params:
            from dagcraft.orchestrator.view import secret_env_name  # the worker's module: only for a secret

            if secret_env_name(name) in env:
                params[name] = env[secret_env_name(name)]
    return compile_workflow(spec, params, source=spec._source)


def submit(
    store: Store,
    wf: Any,
    *,
    run_id: str | None = None,
    spec_dir: str | None = None,
    submitted_by: str | None = None,
) -> str:
    """Write a run: the immutable run record, run control, a journal entry, and last the
    index entry (no per-step record: a step without one is pending). Guarantee: a run id is
    taken at most once (If-None-Match on ``run.json``). A run is visible (listed, served, resumable) only once
    its control is written; a submit that fails (store unavailable, disk full) removes what it
    wrote — best effort, and what a killed submit leaves reads as "not found" — then raises.
    """
    run_id = validate_run_id(run_id or new_run_id(wf.name))
    with paused_gc():  # serialising 10,000 steps: see paused_gc
        workflow_json, params = redacted_workflow(wf)
        record = RunRecord(
            run_id=run_id,
            name=wf.name,
            spec_hash=wf.spec_hash,
            workflow={},  # written from workflow_json
            order=list(wf.steps),
            params=params,
            secret_params=list(wf.secret_params),
            spec_dir=spec_dir,
            submitted_by=submitted_by or identity(),
            submitted_at=store.now(),
        )
        body = dump_run_record(record, workflow_json)
    try:
        store.put(layout.run_record(run_id), body, if_none_match=True)
    except Conflict:
        raise Conflict(f"run id {run_id!r} already exists in {store.url}") from None
    # No per-step records: a step without one is pending (every reader says so), and its
    # first transition creates it (If-None-Match). A 10,000-step submit is five writes, not
    # 10,005 — on S3 that is 10,000 PUTs fewer per run.
    written: list[str] = []
    try:
        store.put(layout.control(run_id), dump(Control(updated_at=store.now())), if_none_match=True)
        written.append(layout.control(run_id))
        written.append(journal.append(store, run_id, layout.CONTROL_MARK))
        journal.index_run(store, run_id)
    except BaseException:
        _undo(store, [*written, layout.run_record(run_id)])
        raise
    return run_id


def _undo(store: Store, keys: list[str]) -> None:
    """Remove a failed submit's writes in order (``keys`` ends with run.json, so the id is
    free again only when nothing else of it is left)."""
    for key in keys:
        try:
            store.delete(key)
        except DagcraftError:
            return  # the store is gone: what is left has no control, so it reads as not found
