"""Self-contained HTML reports: one trace (:func:`render_trace_html`) or a whole run
(:func:`render_run_html`, from a :class:`RunView` that the orchestrator builds — tracing does not
know the store layout).

The page is one file: inline CSS, a CSS Gantt chart, ``<details>`` for payloads, no external
URL of any kind. Jinja2 autoescaping is on, so hostile content in a payload (``<script>``, quotes)
is shown as text. The tiny inline script (expand/collapse all) is optional: the report reads the
same without JavaScript. Large traces are capped per attempt (:data:`MAX_EVENTS` events,
:data:`MAX_PAYLOAD` chars per payload) with a note saying how much was left out.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Iterable
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from pydantic import BaseModel, Field

from dagcraft.tracing.event import TraceEvent
from dagcraft.tracing.summary import describe, event_status, fmt_dur, short, summarize

MAX_EVENTS = 2000
MAX_PAYLOAD = 20_000


class AttemptView(BaseModel):
    attempt: int
    status: str
    worker: str | None = None
    started_ms: int | None = None
    finished_ms: int | None = None
    exit_code: int | None = None
    reason: str | None = None
    events: list[TraceEvent] = Field(default_factory=list)


class StepView(BaseModel):
    step_id: str
    status: str
    attempts: list[AttemptView] = Field(default_factory=list)
    needs: list[str] = Field(default_factory=list)


class RunView(BaseModel):
    run_id: str
    name: str
    status: str
    created_ms: int
    finished_ms: int | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    steps: list[StepView] = Field(default_factory=list)


_env: Environment | None = None


def _jinja() -> Environment:
    global _env
    if _env is None:
        _env = Environment(loader=PackageLoader("dagcraft.tracing", "templates"),
                           autoescape=select_autoescape(default=True, default_for_string=True),
                           trim_blocks=True, lstrip_blocks=True)
    return _env


def status_class(status: str | None) -> str:
    s = (status or "").lower()
    for key, cls in (("rollback", "rollback"), ("timeout", "failed"), ("timed", "failed"), ("fail", "failed"),
                     ("fenced", "failed"), ("lost", "failed"), ("error", "failed"), ("cancel", "cancelled"),
                     ("skip", "skipped"), ("retry", "retry"), ("pending", "pending"), ("running", "running"),
                     ("open", "running"), ("succeed", "ok"), ("success", "ok"), ("finished", "ok"), ("ok", "ok")):
        if key in s:
            return cls
    return "other"


def fmt_time(ms: int | None) -> str:
    if ms is None:
        return "—"
    return _dt.datetime.fromtimestamp(ms / 1000, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _event_rows(events: list[TraceEvent], t0: int | None) -> tuple[list[dict[str, Any]], int]:
    rows = []
    shown = events[:MAX_EVENTS]
    for ev in shown:
        p = dict(ev.payload)
        previews = [(name, p.pop(name)) for name in ("stdout_preview", "stderr_preview", "output_preview",
                                                       "text_preview", "result_preview")
                    if isinstance(p.get(name), str) and p.get(name)]
        body = json.dumps(p, indent=2, ensure_ascii=False, default=str)
        if len(body) > MAX_PAYLOAD:
            body = body[:MAX_PAYLOAD] + f"\n… [{len(body) - MAX_PAYLOAD} chars omitted]"
        cls = "ev-bad" if (ev.kind == "error" or ev.kind.startswith("step.") and ev.kind in (
            "step.timeout", "step.fenced", "step.heartbeat_lost") or (ev.kind == "tool.result" and p.get("success") is False)
            or (ev.kind == "permission.decision" and str(p.get("decision", "")).lower() == "deny")) else ""
        rows.append({"seq": ev.seq, "kind": ev.kind, "family": ev.kind.split(".")[0], "cls": cls,
                     "rel": f"+{fmt_dur(ev.ts_ms - t0)}" if t0 is not None else "",
                     "time": fmt_time(ev.ts_ms), "summary": short(describe(ev), 200),
                     "payload": body if p else "", "previews": previews})
    return rows, len(events) - len(shown)


def _ticks(t0: int, span: int) -> list[dict[str, Any]]:
    return [{"left": round(i * 20.0, 3), "label": fmt_dur(span * i / 5)} for i in range(6)]


def _bar(t0: int, span: int, start: int | None, end: int | None, now: int) -> tuple[float, float]:
    s = start if start is not None else t0
    e = end if end is not None else now
    left = max(0.0, min(100.0, (s - t0) * 100.0 / span))
    width = max(0.6, min(100.0 - left, (max(e, s) - s) * 100.0 / span))
    return round(left, 3), round(width, 3)


def render_run_html(view: RunView) -> str:
    """One self-contained HTML page for a run: status header, metric cards, Gantt of steps and
    attempts (retries and failures visible), per-step sections with attempt timelines."""
    all_events = [e for s in view.steps for a in s.attempts for e in a.events]
    summ = summarize(all_events)
    stamps = [view.created_ms] + [x for s in view.steps for a in s.attempts
                                  for x in (a.started_ms, a.finished_ms) if x is not None]
    stamps += [e.ts_ms for e in all_events]
    end = view.finished_ms or max(stamps)
    t0 = min(stamps)
    span = max(1, end - t0)
    attempts = sum(len(s.attempts) for s in view.steps)
    run_attempts = [(s, a) for s in view.steps for a in s.attempts if not a.status.startswith("rollback")]
    retries = sum(max(0, len([a for a in s.attempts if not a.status.startswith("rollback")]) - 1) for s in view.steps)
    failures = sum(1 for _, a in run_attempts if status_class(a.status) == "failed")
    cards = [("Steps", len(view.steps)), ("Attempts", attempts), ("Retries", retries), ("Failed attempts", failures),
             ("Tokens", f"{summ['tokens_in'] + summ['tokens_out']:,}"),
             ("Cost", f"${summ['cost_usd']:.4f}" if summ["cost_usd"] is not None else "—"),
             ("Duration", fmt_dur((view.finished_ms or end) - view.created_ms))]
    rows = []
    sections = []
    for s in view.steps:
        bars = []
        for a in s.attempts:
            left, width = _bar(t0, span, a.started_ms or (a.events[0].ts_ms if a.events else None),
                               a.finished_ms or (a.events[-1].ts_ms if a.events else None), end)
            label = ("↺ " if a.status.startswith("rollback") else ("↻ " if a.attempt > 1 else "")) + f"#{a.attempt}"
            dur = (a.finished_ms - a.started_ms) if a.finished_ms and a.started_ms else None
            bars.append({"left": left, "width": width, "cls": status_class(a.status), "label": label,
                         "title": f"{s.step_id} attempt {a.attempt}: {a.status}"
                                  + (f" ({a.reason})" if a.reason else "") + f" · {fmt_dur(dur)}",
                         "anchor": f"step-{_anchor(s.step_id)}-a{a.attempt}"})
        rows.append({"label": s.step_id, "status": s.status, "cls": status_class(s.status), "bars": bars,
                     "anchor": f"step-{_anchor(s.step_id)}"})
        atts = []
        for a in s.attempts:
            base = [x for x in (a.started_ms, a.events[0].ts_ms if a.events else None) if x is not None]
            evrows, omitted = _event_rows(a.events, min(base) if base else None)
            a_sum = summarize(a.events) if a.events else None
            meta = [("worker", a.worker or "—"), ("started", fmt_time(a.started_ms)),
                    ("duration", fmt_dur((a.finished_ms - a.started_ms) if a.finished_ms and a.started_ms else None)),
                    ("exit code", "—" if a.exit_code is None else a.exit_code)]
            if a.reason:
                meta.append(("reason", a.reason))
            if a_sum and (a_sum["tokens_in"] or a_sum["tokens_out"]):
                meta.append(("tokens", f"{a_sum['tokens_in']:,} in / {a_sum['tokens_out']:,} out"))
            atts.append({"title": f"Attempt {a.attempt}", "status": a.status, "cls": status_class(a.status),
                         "anchor": f"step-{_anchor(s.step_id)}-a{a.attempt}", "meta": meta, "events": evrows,
                         "omitted": omitted})
        sections.append({"title": s.step_id, "anchor": f"step-{_anchor(s.step_id)}", "status": s.status,
                         "cls": status_class(s.status), "needs": s.needs, "attempts": atts,
                         "open": status_class(s.status) in ("failed", "running")})
    ctx = {"title": f"{view.name} · {view.run_id}", "heading": view.name, "subtitle": f"run {view.run_id}",
           "status": view.status, "status_cls": status_class(view.status),
           "times": [("submitted", fmt_time(view.created_ms)), ("finished", fmt_time(view.finished_ms))],
           "cards": cards, "gantt": {"rows": rows, "ticks": _ticks(t0, span)} if rows else None,
           "params": json.dumps(view.params, indent=2, ensure_ascii=False, default=str) if view.params else "",
           "sections": sections}
    return _jinja().get_template("report.html.j2").render(**ctx)


def _anchor(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in s)


def _tool_spans(events: list[TraceEvent]) -> list[tuple[TraceEvent, TraceEvent | None]]:
    """Pair tool.call with its tool.result (by tool_use_id, else the next unmatched result)."""
    spans: list[tuple[TraceEvent, TraceEvent | None]] = []
    open_by_id: dict[str, int] = {}
    open_plain: list[int] = []
    for ev in events:
        if ev.kind == "tool.call":
            spans.append((ev, None))
            tid = ev.payload.get("tool_use_id")
            if tid:
                open_by_id[str(tid)] = len(spans) - 1
            else:
                open_plain.append(len(spans) - 1)
        elif ev.kind == "tool.result":
            tid = ev.payload.get("tool_use_id")
            idx = open_by_id.pop(str(tid), None) if tid else (open_plain.pop() if open_plain else None)
            if idx is not None:
                spans[idx] = (spans[idx][0], ev)
    return spans


def render_trace_html(events: Iterable[TraceEvent], title: str = "dagcraft trace") -> str:
    """One self-contained HTML page for a single trace: status, metric cards, a chart of tool
    calls, and the event timeline with collapsible payloads and output previews."""
    evs = list(events)
    summ = summarize(evs)
    status = event_status(evs)
    t0 = evs[0].ts_ms if evs else 0
    end = evs[-1].ts_ms if evs else 0
    span = max(1, end - t0)
    cards = [("Events", summ["events"]), ("Model calls", summ["model_calls"]),
             ("Tokens", f"{summ['tokens_in'] + summ['tokens_out']:,}"),
             ("Cost", f"${summ['cost_usd']:.4f}" if summ["cost_usd"] is not None else "—"),
             ("Tool calls", summ["tool_calls"]), ("Failures", summ["failures"]), ("Errors", summ["errors"]),
             ("Duration", fmt_dur(summ["duration_ms"]))]
    rows = []
    for call, res in _tool_spans(evs)[:200]:
        left, width = _bar(t0, span, call.ts_ms, res.ts_ms if res else None, end)
        ok = res.payload.get("success") if res else None
        cls = "ok" if ok else ("failed" if ok is False else "running")
        name = str(call.payload.get("tool") or "?")
        rows.append({"label": name, "status": "", "cls": cls, "anchor": f"timeline-ev{call.seq}",
                     "bars": [{"left": left, "width": width, "cls": cls, "label": "",
                               "title": short(describe(call), 120), "anchor": f"timeline-ev{call.seq}"}]})
    evrows, omitted = _event_rows(evs, t0 if evs else None)
    section = {"title": "Events", "anchor": "events", "status": status, "cls": status_class(status), "needs": [],
               "open": True,
               "attempts": [{"title": f"{summ['events']} events", "status": "", "cls": "", "anchor": "timeline",
                             "meta": [("run", summ["run_id"] or "—"), ("started", fmt_time(summ["started_ms"]))],
                             "events": evrows, "omitted": omitted}]}
    ctx = {"title": title, "heading": title, "subtitle": f"run {summ['run_id'] or '—'}", "status": status,
           "status_cls": status_class(status), "times": [("started", fmt_time(summ["started_ms"])),
                                                         ("finished", fmt_time(summ["finished_ms"]))],
           "cards": cards, "gantt": {"rows": rows, "ticks": _ticks(t0, span)} if rows else None, "params": "",
           "sections": [section]}
    return _jinja().get_template("report.html.j2").render(**ctx)
