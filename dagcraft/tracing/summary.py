"""Summaries of a trace (or several): counts, tokens, cost, failures, status, duration."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from dagcraft.tracing.event import TraceEvent


def event_status(events: list[TraceEvent]) -> str:
    """``run.finished`` payload status (or ``succeeded``/``failed`` from ``success``), else
    ``open`` (no finish recorded: still running, or the writer died)."""
    for ev in reversed(events):
        if ev.kind == "run.finished":
            st = ev.payload.get("status")
            if isinstance(st, str) and st:
                return st
            if "success" in ev.payload:
                return "succeeded" if ev.payload.get("success") else "failed"
            if "exit_code" in ev.payload:
                return "succeeded" if ev.payload.get("exit_code") == 0 else "failed"
            return "finished"
    return "open"


def summarize(events: Iterable[TraceEvent]) -> dict[str, Any]:
    """Counts over one trace's events. ``cost_usd`` sums every payload's ``cost_usd`` (adapters
    report each cost exactly once); tokens come from ``model.call`` events."""
    evs = list(events)
    kinds = Counter(e.kind for e in evs)
    tokens_in = tokens_out = 0
    cost = 0.0
    have_cost = False
    failures = 0
    redactions = 0
    tools: Counter[str] = Counter()
    models: Counter[str] = Counter()
    for e in evs:
        p = e.payload
        c = p.get("cost_usd")
        if isinstance(c, (int, float)) and not isinstance(c, bool):
            cost += float(c)
            have_cost = True
        if e.kind == "model.call":
            tokens_in += _int(p.get("tokens_in"))
            tokens_out += _int(p.get("tokens_out"))
            if p.get("model"):
                models[str(p["model"])] += 1
        elif e.kind == "tool.call":
            tools[str(p.get("tool") or "?")] += 1
        elif e.kind == "tool.result":
            if p.get("success") is False:
                failures += 1
            redactions += _int(p.get("redactions"))  # exec results carry their log redaction count
    run_ids = sorted({e.run_id for e in evs})
    first = evs[0].ts_ms if evs else None
    last = evs[-1].ts_ms if evs else None
    return {
        "run_id": run_ids[0] if len(run_ids) == 1 else (run_ids or None),
        "status": event_status(evs),
        "events": len(evs),
        "kinds": dict(sorted(kinds.items())),
        "model_calls": kinds.get("model.call", 0),
        "models": dict(models),
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
        "cost_usd": round(cost, 6) if have_cost else None,
        "tool_calls": kinds.get("tool.call", 0),
        "tools": dict(tools.most_common()),
        "failures": failures,
        "errors": kinds.get("error", 0),
        "permission_decisions": kinds.get("permission.decision", 0),
        "redactions": redactions,
        "started_ms": first,
        "finished_ms": last if kinds.get("run.finished") else None,
        "duration_ms": (last - first) if evs and first is not None and last is not None else None,
    }


def _int(v: Any) -> int:
    try:
        return int(v or 0)
    except (TypeError, ValueError):
        return 0
