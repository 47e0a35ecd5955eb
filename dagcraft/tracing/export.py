"""Export traces as OpenTelemetry spans in the OTLP/JSON format (no dependency needed).

Span tree: run → step → attempt → tool call (``tool.call`` paired with its ``tool.result``).
For a single trace file the tree is run → tool call. Ids are derived deterministically from the
run id, step, attempt and event ids, so exporting twice yields the same spans. Model calls and
other events become span events of the enclosing attempt. Load the output with any OTLP/JSON
receiver (e.g. the OpenTelemetry Collector's ``otlpjsonfile`` receiver).
"""

from __future__ import annotations

import hashlib
from typing import Any

from dagcraft.tracing.event import TraceEvent
from dagcraft.tracing.render import RunView, _tool_spans
from dagcraft.tracing.summary import event_status, summarize

_OK, _ERROR = 1, 2


def _id(n: int, *parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[: n * 2]


def _attr(k: str, v: Any) -> dict[str, Any]:
    if isinstance(v, bool):
        val: dict[str, Any] = {"boolValue": v}
    elif isinstance(v, int):
        val = {"intValue": str(v)}
    elif isinstance(v, float):
        val = {"doubleValue": v}
    else:
        val = {"stringValue": "" if v is None else str(v)}
    return {"key": k, "value": val}


def _ns(ms: int | None) -> str:
    return str(int(ms or 0) * 1_000_000)


def _span(trace_id: str, span_id: str, parent: str | None, name: str, start: int | None, end: int | None,
          attrs: dict[str, Any], ok: bool | None, events: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    s: dict[str, Any] = {"traceId": trace_id, "spanId": span_id, "name": name, "kind": 1,
                         "startTimeUnixNano": _ns(start), "endTimeUnixNano": _ns(end if end is not None else start),
                         "attributes": [_attr(k, v) for k, v in attrs.items() if v is not None],
                         "status": {"code": 0 if ok is None else (_OK if ok else _ERROR)}}
    if parent:
        s["parentSpanId"] = parent
    if events:
        s["events"] = events
    return s


def _tool_and_events(trace_id: str, parent: str, key: str, evs: list[TraceEvent]) -> list[dict[str, Any]]:
    spans = []
    for call, res in _tool_spans(evs):
        p = call.payload
        attrs = {"dagcraft.tool": p.get("tool"), "dagcraft.command": p.get("command"),
                 "dagcraft.agent": p.get("agent"), "dagcraft.seq": call.seq}
        ok = None
        if res is not None:
            r = res.payload
            ok = r.get("success") if isinstance(r.get("success"), bool) else None
            attrs.update({"dagcraft.exit_code": r.get("exit_code"), "dagcraft.signal": r.get("signal"),
                          "dagcraft.stdout_bytes": r.get("stdout_bytes"), "dagcraft.stderr_bytes": r.get("stderr_bytes")})
        spans.append(_span(trace_id, _id(8, key, call.event_id), parent, f"tool {p.get('tool') or '?'}",
                           call.ts_ms, res.ts_ms if res else None, attrs, ok))
    return spans


def _span_events(evs: list[TraceEvent]) -> list[dict[str, Any]]:
    out = []
    for e in evs:
        if e.kind in ("tool.call", "tool.result"):
            continue
        attrs = [_attr("dagcraft.seq", e.seq)]
        for k in ("model", "tokens_in", "tokens_out", "cost_usd", "decision", "message", "status", "name"):
            if k in e.payload and isinstance(e.payload[k], (str, int, float, bool)):
                attrs.append(_attr(f"dagcraft.{k}", e.payload[k]))
        out.append({"timeUnixNano": _ns(e.ts_ms), "name": e.kind, "attributes": attrs})
    return out[:1000]


def _envelope(spans: list[dict[str, Any]], run_id: str) -> dict[str, Any]:
    return {"resourceSpans": [{
        "resource": {"attributes": [_attr("service.name", "dagcraft"), _attr("dagcraft.run_id", run_id)]},
        "scopeSpans": [{"scope": {"name": "dagcraft.tracing", "version": "1"}, "spans": spans}]}]}


def export_trace_otlp(events: list[TraceEvent]) -> dict[str, Any]:
    """OTLP/JSON for one trace file: a root span for the trace and one span per tool call."""
    s = summarize(events)
    run_id = str(s["run_id"] or "trace")
    trace_id = _id(16, run_id)
    root = _id(8, run_id, "root", events[0].event_id if events else "")
    status = event_status(events)
    spans = [_span(trace_id, root, None, f"trace {run_id}", s["started_ms"], events[-1].ts_ms if events else None,
                   {"dagcraft.status": status, "dagcraft.events": s["events"], "dagcraft.tokens_in": s["tokens_in"],
                    "dagcraft.tokens_out": s["tokens_out"], "dagcraft.cost_usd": s["cost_usd"]},
                   None if status == "open" else status in ("succeeded", "finished"), _span_events(events))]
    spans += _tool_and_events(trace_id, root, run_id, events)
    return _envelope(spans, run_id)


def export_run_otlp(view: RunView) -> dict[str, Any]:
    """OTLP/JSON for a whole run: run → step → attempt → tool call."""
    trace_id = _id(16, view.run_id)
    root = _id(8, view.run_id, "run")
    spans = [_span(trace_id, root, None, f"run {view.name}", view.created_ms, view.finished_ms,
                   {"dagcraft.run_id": view.run_id, "dagcraft.status": view.status},
                   None if view.finished_ms is None else view.status == "succeeded")]
    for st in view.steps:
        sid = _id(8, view.run_id, "step", st.step_id)
        starts = [a.started_ms for a in st.attempts if a.started_ms] or [view.created_ms]
        ends: list[int | None] = [a.finished_ms for a in st.attempts if a.finished_ms] or [None]
        spans.append(_span(trace_id, sid, root, f"step {st.step_id}", min(starts), max(e for e in ends if e) if ends[0] else None,
                           {"dagcraft.step": st.step_id, "dagcraft.status": st.status,
                            "dagcraft.attempts": len(st.attempts)},
                           {"succeeded": True, "failed": False}.get(st.status)))
        for a in st.attempts:
            aid = _id(8, view.run_id, "attempt", st.step_id, str(a.attempt), a.status)
            spans.append(_span(trace_id, aid, sid, f"attempt {st.step_id}#{a.attempt}", a.started_ms, a.finished_ms,
                               {"dagcraft.attempt": a.attempt, "dagcraft.status": a.status, "dagcraft.worker": a.worker,
                                "dagcraft.exit_code": a.exit_code, "dagcraft.reason": a.reason},
                               {"succeeded": True, "failed": False}.get(a.status), _span_events(a.events)))
            spans += _tool_and_events(trace_id, aid, f"{view.run_id}/{st.step_id}/{a.attempt}", a.events)
    return _envelope(spans, view.run_id)
