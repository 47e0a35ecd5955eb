"""Summaries of a trace (or several): counts, tokens, cost, failures, status, duration."""

from __future__ import annotations

import json
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


def summarize_total(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The total over several traces' :func:`summarize` results (a run's attempts): counts,
    tokens and cost added up (cost None only if no trace reported one); ``statuses`` counts
    the traces by status; ``duration_ms`` is wall-clock from the first event to the last
    finish (attempts run in parallel, so it is not the sum), None while any trace is open."""
    runs = sorted({str(s["run_id"]) for s in summaries if s.get("run_id")})
    costs = [s["cost_usd"] for s in summaries if s.get("cost_usd") is not None]
    starts = [s["started_ms"] for s in summaries if s.get("started_ms") is not None]
    ends = [s["finished_ms"] for s in summaries]
    done = bool(starts) and all(e is not None for e in ends)
    out: dict[str, Any] = {"run_id": runs[0] if len(runs) == 1 else (runs or None), "traces": len(summaries),
                           "statuses": dict(sorted(Counter(str(s["status"]) for s in summaries).items())),
                           "cost_usd": round(sum(costs), 6) if costs else None,
                           "duration_ms": (max(ends) - min(starts)) if done else None}
    for k in ("events", "model_calls", "tokens_in", "tokens_out", "tool_calls", "failures", "errors", "redactions"):
        out[k] = sum(int(s.get(k) or 0) for s in summaries)
    return out


def _int(v: Any) -> int:
    try:
        return int(v or 0)
    except (TypeError, ValueError):
        return 0


def fmt_dur(ms: int | float | None) -> str:
    if ms is None:
        return "—"
    ms = int(ms)
    if ms < 1000:
        return f"{ms} ms"
    s = ms / 1000
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(int(s), 60)
    if m < 60:
        return f"{m}m {s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m"


def describe(ev: TraceEvent) -> str:
    """One human line for an event (used by inspect and the HTML timeline)."""
    p = ev.payload
    k = ev.kind
    if k == "tool.call":
        return f"{p.get('tool') or '?'}: {p.get('command') or short(p.get('input'))}"
    if k == "tool.result":
        ok = p.get("success")
        bits = [str(p.get("tool") or "?"), "ok" if ok else ("failed" if ok is False else "")]
        if p.get("exit_code") is not None:
            bits.append(f"exit {p['exit_code']}")
        if p.get("signal_name") or p.get("signal"):
            bits.append(str(p.get("signal_name") or f"signal {p['signal']}"))
        if p.get("duration_ms") is not None:
            bits.append(fmt_dur(p["duration_ms"]))
        return " · ".join(b for b in bits if b)
    if k == "model.call":
        return (f"{p.get('model') or p.get('agent') or 'model'} · in {p.get('tokens_in', 0)} / "
                f"out {p.get('tokens_out', 0)} tokens" + (f" · ${p['cost_usd']}" if p.get("cost_usd") else ""))
    if k == "permission.decision":
        return f"{p.get('decision', '?')} · {p.get('tool') or ''} {p.get('command') or ''}".strip()
    if k in ("error", "step.heartbeat_lost"):
        return str(p.get("message") or p.get("reason") or "")
    if k == "run.finished":
        return str(p.get("status") or "")
    for key in ("name", "reason", "message", "step", "text_preview", "result_preview", "model", "session_id"):
        if p.get(key):
            return str(p[key])
    return ""


def short(v: Any, n: int = 160) -> str:
    s = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)
    return s if len(s) <= n else s[: n - 1] + "…"
