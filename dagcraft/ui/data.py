"""JSON shapes of the UI, read from the store through the orchestrator (read-only).

Requests per call (S3): :func:`runs_json` is ``list_runs`` (2 LISTs + 2 GETs per run);
:func:`run_json` is ``run_status`` plus the step states again for attempt histories (2 GETs
per step + 3; 1 per step + 3 for a sealed run, whose ``run_status`` reads its summary); :func:`step_json` is 1 GET for the state and up to 3 for the chosen
attempt's logs and trace. The server caches each answer for :data:`CACHE_S` so that several
tabs polling every second cost the store no more than one.

Everything shown comes from the store, where secrets are already redacted (outputs, reasons,
logs and traces are redacted before they are written): nothing here reads anything else.
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import quote

from dagcraft.errors import NotFound
from dagcraft.orchestrator import layout
from dagcraft.orchestrator.model import (
    ACTIVE,
    RUN_FINISHED,
    TERMINAL,
    AttemptKind,
    StepState,
    StepStatus,
)
from dagcraft.orchestrator.ops import list_runs, load_states, read_step_state, run_status
from dagcraft.primitives.store import Store
from dagcraft.tracing.event import TraceEvent
from dagcraft.tracing.summary import describe

CACHE_S = 0.8
#: bytes of each log read for its tail, lines of it shown, trace events shown per attempt
LOG_TAIL_BYTES = 64 << 10
LOG_TAIL_LINES = 200
MAX_EVENTS = 500


def _dur(start: float | None, end: float | None, now: float) -> float | None:
    return None if start is None else max(0.0, (end if end is not None else now) - start)


def runs_json(store: Store) -> dict[str, Any]:
    """Every run, newest first, with its age and duration in seconds."""
    now = time.time()
    runs = [dict(r, age_s=max(0.0, now - r["submitted_at"]),
                 duration_s=_dur(r["submitted_at"], r["finished_at"], now)) for r in list_runs(store)]
    return {"now": now, "store": store.url, "runs": runs}


def attempts_of(st: StepState) -> list[dict[str, Any]]:
    """A step's attempts, finished ones from its history then the one holding it, if any."""
    out = [{"name": h.name, "attempt": h.attempt, "kind": str(h.kind), "status": str(h.status), "worker": h.worker,
            "started_at": h.started_at, "finished_at": h.finished_at, "exit_code": h.exit_code, "reason": h.reason}
           for h in st.history]
    if st.status in ACTIVE:
        rollback = st.status == StepStatus.ROLLING_BACK
        n = st.rollback_attempt if rollback else st.attempt
        out.append({"name": f"rollback-{n}" if rollback else str(n), "attempt": n,
                    "kind": str(AttemptKind.ROLLBACK if rollback else AttemptKind.RUN), "status": str(st.status),
                    "worker": st.worker, "started_at": st.started_at, "finished_at": None, "exit_code": None,
                    "reason": None})
    return out


def run_actions(status: str) -> list[str]:
    """Run-level actions the page offers for a run in ``status``."""
    acts = []
    if status in ("running", "rolling_back"):
        acts.append("cancel")
    if status in ("running", "cancelling", "cancelled", "failed"):
        acts.append("resume")
    return acts


def step_actions(run_status_: str, step: dict[str, Any]) -> list[str]:
    """Step-level actions: ``retry`` (re-run it and everything downstream) on a finished run's
    finished top-level step, plus :func:`gate_actions`."""
    acts = []
    if run_status_ in RUN_FINISHED and step["status"] in TERMINAL and not step.get("parent"):
        acts.append("retry")
    return acts + gate_actions(step)


def gate_actions(step: dict[str, Any]) -> list[str]:
    """``approve`` and ``reject`` for a step whose approval gate waits for a decision
    (handled by ``server.UiApp.act`` through ``orchestrator.approval.decide``)."""
    return ["approve", "reject"] if step.get("status") == "waiting_approval" else []


def run_json(store: Store, run_id: str) -> dict[str, Any]:
    """``run_status`` plus, per step, its attempts and actions; the timeline (one bar per
    attempt, offsets from the first claim, the wait before it shown apart as ``queue_s``)."""
    now = time.time()
    st = run_status(store, run_id)
    states = load_states(store, run_id)
    bars: list[dict[str, Any]] = []
    for s in st["steps"]:
        state = states.get(s["step"])
        s["attempts"] = attempts_of(state) if state is not None else []
        s["duration_s"] = _dur(s["started_at"], s["finished_at"], now) if s["attempt"] else None
        s["actions"] = step_actions(st["status"], s)
        for a in s["attempts"]:
            if a["started_at"] is not None:
                bars.append({"step": s["step"], "attempt": a["name"], "status": a["status"],
                             "start": a["started_at"], "end": a["finished_at"]})
    t0 = min((b["start"] for b in bars), default=None)
    t1 = max((b["end"] if b["end"] is not None else now for b in bars), default=None)
    if t0 is not None and t1 is not None:
        if st["finished_at"] is not None:
            t1 = max(t1, st["finished_at"])
        for b in bars:
            b["offset_s"] = b["start"] - t0
            b["duration_s"] = (b["end"] if b["end"] is not None else now) - b["start"]
    st["timeline"] = {"first_claim": t0, "span_s": (t1 - t0) if t0 is not None and t1 is not None else 0.0,
                      "queue_s": (t0 - st["submitted_at"]) if t0 is not None else None, "bars": bars}
    st["actions"] = run_actions(st["status"])
    st["now"] = now
    st["age_s"] = max(0.0, now - st["submitted_at"])
    st["duration_s"] = _dur(st["submitted_at"], st["finished_at"], now)
    return st


def _tail(store: Store, key: str) -> dict[str, Any] | None:
    got = store.get(key)
    if got is None:
        return None
    data = got[0]
    cut = len(data) > LOG_TAIL_BYTES
    lines = data[-LOG_TAIL_BYTES:].decode("utf-8", "replace").splitlines()
    if cut and lines:
        lines = lines[1:]  # the first line is probably partial
    shown = lines[-LOG_TAIL_LINES:]
    return {"text": "\n".join(shown), "bytes": len(data), "truncated": cut or len(lines) > len(shown)}


def _events(store: Store, key: str) -> dict[str, Any]:
    got = store.get(key)
    if got is None:
        return {"events": [], "total": 0}
    events: list[dict[str, Any]] = []
    total = 0
    for line in got[0].decode("utf-8", "replace").splitlines():
        try:
            ev = TraceEvent.model_validate(json.loads(line))
        except (ValueError, TypeError):
            continue  # a frame line, or one cut by an upload still landing
        total += 1
        if len(events) < MAX_EVENTS:
            events.append({"ts_ms": ev.ts_ms, "kind": ev.kind, "text": describe(ev)})
    return {"events": events, "total": total}


def step_state(store: Store, run_id: str, step: str) -> StepState:
    """The step's state (NotFound naming the step or the run); a submitted step without a
    record yet is pending."""
    return read_step_state(store, run_id, step)


def step_json(store: Store, run_id: str, step: str, attempt: str | None = None) -> dict[str, Any]:
    """One step: attempts, outputs, artifacts (with download URLs), and for ``attempt`` (default
    the latest) the tail of its stdout and stderr and its trace events."""
    st = step_state(store, run_id, step)
    attempts = attempts_of(st)
    names = [a["name"] for a in attempts]
    if attempt is not None and attempt not in names:
        raise NotFound(f"step {step!r} of run {run_id!r} has no attempt {attempt!r}")
    chosen = attempt if attempt is not None else (names[-1] if names else None)
    out: dict[str, Any] = {
        "run_id": run_id, "step": step, "status": str(st.status), "reason": st.reason, "exit_code": st.exit_code,
        "outputs": st.outputs, "cached_from": st.cached_from, "attempts": attempts, "attempt": chosen,
        "artifacts": [{"name": name, "size": p.get("size"), "digest": p.get("digest"),
                       "content_type": p.get("content_type"),
                       "url": f"/api/runs/{run_id}/steps/{step}/artifacts/{quote(name)}"}
                      for name, p in sorted(st.artifacts.items())],
        "stdout": None, "stderr": None, "trace": {"events": [], "total": 0}}
    if chosen is not None:
        prefix = layout.attempt_prefix(run_id, step, chosen)
        out["stdout"] = _tail(store, f"{prefix}/stdout.log")
        out["stderr"] = _tail(store, f"{prefix}/stderr.log")
        out["trace"] = _events(store, f"{prefix}/trace.jsonl")
    return out
