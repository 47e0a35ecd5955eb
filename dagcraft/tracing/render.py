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
    #: ``orchestrator.model.ReasonKind`` value (``command_not_found``, ``timed_out`` …)
    reason_kind: str | None = None
    #: last lines of its stderr (redacted, bounded), kept for attempts that did not succeed
    stderr_tail: str | None = None
    events: list[TraceEvent] = Field(default_factory=list)


class StepView(BaseModel):
    step_id: str
    status: str
    attempts: list[AttemptView] = Field(default_factory=list)
    needs: list[str] = Field(default_factory=list)
    #: why it is skipped / cancelled / failed (shown as text, not only in a tooltip)
    reason: str | None = None
    reason_kind: str | None = None
    #: the step's span as the orchestrator defines it (a foreach parent: its children's)
    started_ms: int | None = None
    finished_ms: int | None = None
    agent: str | None = None
    #: a foreach child's parent, and a parent's children (in item order)
    parent: str | None = None
    children: list[str] = Field(default_factory=list)
    #: the command that prints the whole stderr of its last failed attempt
    more: str | None = None
    #: a loop body step's iteration (1-based); a loop's progress (``statusrows.loop_summary``)
    iteration: int | None = None
    loop: dict[str, Any] | None = None


class RunView(BaseModel):
    run_id: str
    name: str
    status: str
    created_ms: int
    finished_ms: int | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    steps: list[StepView] = Field(default_factory=list)
    reason: str | None = None
    #: the run's duration and queue time as ``orchestrator.model.RunTiming`` defines them
    #: (first claim → finish; submit → first claim); None: derived from the attempts here
    first_claim_ms: int | None = None
    duration_ms: int | None = None
    queued_ms: int | None = None
    #: DAG picture slot: inline SVG markup (``workflows.graph_render.to_svg``, trusted: built by
    #: dagcraft, node labels escaped there) shown above the timeline; None: no picture
    dag_svg: str | None = None
    #: spend against the limits (``orchestrator.budget.summary``: run, agents, steps), from the
    #: store's ledger; None: no ledger (a trace file rendered on its own)
    budget: dict[str, Any] | None = None


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
    for key, cls in (("rollback", "rollback"), ("rolled", "rollback"), ("timeout", "failed"), ("timed", "failed"), ("fail", "failed"),
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


def _span(a: AttemptView) -> tuple[int | None, int | None]:
    return (a.started_ms or (a.events[0].ts_ms if a.events else None),
            a.finished_ms or (a.events[-1].ts_ms if a.events else None))


def _spend(view: RunView) -> list[dict[str, Any]]:
    """Tokens and cost per agent, from the ``model.call`` events (and ``cost_usd`` payloads)
    of every attempt's trace; steps without an agent are grouped under their model's name."""
    rows: dict[str, dict[str, Any]] = {}
    for s in view.steps:
        for a in s.attempts:
            summ = summarize(a.events) if a.events else None
            if summ is None or not (summ["model_calls"] or summ["cost_usd"] is not None):
                continue
            key = s.agent or ", ".join(sorted(summ["models"])) or "(no agent)"
            row = rows.setdefault(key, {"agent": key, "steps": set(), "attempts": 0, "calls": 0, "tokens_in": 0,
                                        "tokens_out": 0, "cost": None, "models": set()})
            row["steps"].add(s.step_id)
            row["attempts"] += 1
            row["calls"] += summ["model_calls"]
            row["tokens_in"] += summ["tokens_in"]
            row["tokens_out"] += summ["tokens_out"]
            row["models"].update(summ["models"])
            if summ["cost_usd"] is not None:
                row["cost"] = (row["cost"] or 0.0) + summ["cost_usd"]
    # the ledger, when there is one, is the spend: it has what price tables computed and what
    # lost attempts spent, which no trace holds; the traces still give calls and models
    ledger = (view.budget or {}).get("agents", {})
    for name, b in ledger.items():
        if not (b["usd"] or b["tokens"] or b["limit_usd"] is not None or b["limit_tokens"] is not None):
            continue
        row = rows.setdefault(name, {"agent": name, "steps": set(), "attempts": 0, "calls": 0, "tokens_in": 0,
                                     "tokens_out": 0, "cost": None, "models": set()})
        row["cost"] = b["usd"]
        row["limit"] = _limits(b)
    out = []
    for row in sorted(rows.values(), key=lambda r: (-(r["cost"] or 0.0), -r["tokens_in"] - r["tokens_out"])):
        out.append({"limit": "—", **row, "steps": len(row["steps"]), "models": ", ".join(sorted(row["models"])) or "—",
                    "cost": "—" if row["cost"] is None else f"${row['cost']:.4f}"})
    return out


def _limits(b: dict[str, Any]) -> str:
    """A budget row's limits in words (``$5.0000 · 200,000 tokens``), or ``—``."""
    parts = ([f"${b['limit_usd']:.4f}"] if b.get("limit_usd") is not None else []) + \
        ([f"{int(b['limit_tokens']):,} tokens"] if b.get("limit_tokens") is not None else [])
    return " · ".join(parts) or "—"


def _step_spend(view: RunView) -> list[dict[str, Any]]:
    """Spend per step against its limits, from the ledger (every attempt, each instance on its
    own), with the run's total first."""
    if not view.budget or not (view.budget.get("attempts") or _limits(view.budget["run"]) != "—"):
        return []
    rows = [{"step": "(run)", "usd": f"${view.budget['run']['usd']:.4f}", "tokens": view.budget["run"]["tokens"],
             "limit": _limits(view.budget["run"])}]
    for sid, b in view.budget.get("steps", {}).items():
        rows.append({"step": sid, "usd": f"${b['usd']:.4f}", "tokens": b["tokens"], "limit": _limits(b)})
    return rows


def render_run_html(view: RunView) -> str:
    """One self-contained HTML page for a run: status header, the failures first (reason in
    words, stderr tail, the command for the whole log), metric cards, spend per agent, a Gantt
    of steps and attempts starting at the first claim (queue time shown apart), and per-step
    sections (durations and skip/lost reasons visible; failed steps open)."""
    all_events = [e for s in view.steps for a in s.attempts for e in a.events]
    summ = summarize(all_events)
    starts = [x for s in view.steps for a in s.attempts for x in (_span(a)[0],) if x is not None]
    stamps = starts + [x for s in view.steps for a in s.attempts for x in (_span(a)[1],) if x is not None]
    # the axis starts at the first claim: worker start-up before it is queue time, shown apart
    t0 = view.first_claim_ms or (min(starts) if starts else view.created_ms)
    end = view.finished_ms or max(stamps + [t0])
    span = max(1, end - t0)
    duration = view.duration_ms if view.duration_ms is not None else (end - t0 if starts else None)
    queued = view.queued_ms if view.queued_ms is not None else (t0 - view.created_ms if starts else None)
    top = [s for s in view.steps if not s.parent]
    by_id = {s.step_id: s for s in view.steps}
    attempts = sum(len(s.attempts) for s in view.steps)
    run_attempts = [(s, a) for s in view.steps for a in s.attempts if not a.status.startswith("rollback")]
    retries = sum(max(0, len([a for a in s.attempts if not a.status.startswith("rollback")]) - 1) for s in view.steps)
    failures = sum(1 for _, a in run_attempts if status_class(a.status) == "failed")
    cards = [("Steps", len(top)), ("Attempts", attempts), ("Retries", retries), ("Failed attempts", failures),
             ("Tokens", f"{summ['tokens_in'] + summ['tokens_out']:,}"),
             ("Cost", f"${summ['cost_usd']:.4f}" if summ["cost_usd"] is not None else "—"),
             ("Duration", fmt_dur(duration)), ("Queued", fmt_dur(queued))]
    rows = []
    sections: list[dict[str, Any]] = []
    failed_steps = []
    for s in view.steps:
        kids = [by_id[c] for c in s.children if c in by_id]
        bars = []
        if kids:  # a foreach parent: one bar over its children's span
            left, width = _bar(t0, span, s.started_ms, s.finished_ms, end)
            bars.append({"left": left, "width": width, "cls": "group " + status_class(s.status),
                         "label": _fanout(s, kids), "title": f"{s.step_id}: {_fanout(s, kids)}",
                         "anchor": f"step-{_anchor(s.step_id)}"})
        for a in s.attempts:
            a_start, a_end = _span(a)
            left, width = _bar(t0, span, a_start, a_end, end)
            label = ("↺ " if a.status.startswith("rollback") else ("↻ " if a.attempt > 1 else "")) + f"#{a.attempt}"
            dur = (a_end - a_start) if a_end and a_start else None
            bars.append({"left": left, "width": width, "cls": status_class(a.status), "label": label,
                         "title": f"{s.step_id} attempt {a.attempt}: {a.status}"
                                  + (f" ({a.reason})" if a.reason else "") + f" · {fmt_dur(dur)}",
                         "anchor": f"step-{_anchor(s.step_id)}-a{a.attempt}"})
        step_dur = (s.finished_ms - s.started_ms) if s.finished_ms and s.started_ms else None
        if step_dur is None and s.attempts:
            a_start, a_end = _span(s.attempts[-1])
            step_dur = (a_end - a_start) if a_end and a_start else None
        # why it did not run (or failed): as text in the row, not only in a tooltip
        note = s.reason if s.reason and status_class(s.status) in ("skipped", "cancelled", "failed") else ""
        rows.append({"label": s.step_id, "status": s.status, "cls": status_class(s.status), "bars": bars,
                     "anchor": f"step-{_anchor(s.step_id)}", "child": bool(s.parent), "dur": fmt_dur(step_dur),
                     "note": note})
        atts = []
        for a in s.attempts:
            base = [x for x in (a.started_ms, a.events[0].ts_ms if a.events else None) if x is not None]
            evrows, omitted = _event_rows(a.events, min(base) if base else None)
            a_sum = summarize(a.events) if a.events else None
            a_start, a_end = _span(a)
            meta = [("worker", a.worker or "—"), ("started", fmt_time(a.started_ms)),
                    ("duration", fmt_dur((a_end - a_start) if a_end and a_start else None)),
                    ("exit code", "—" if a.exit_code is None else a.exit_code)]
            if a_sum and (a_sum["tokens_in"] or a_sum["tokens_out"]):
                meta.append(("tokens", f"{a_sum['tokens_in']:,} in / {a_sum['tokens_out']:,} out"))
            atts.append({"title": f"Attempt {a.attempt}", "status": a.status, "cls": status_class(a.status),
                         "anchor": f"step-{_anchor(s.step_id)}-a{a.attempt}", "meta": meta, "events": evrows,
                         "omitted": omitted, "reason": a.reason, "kind": _words(a.reason_kind, a.reason),
                         "stderr_tail": a.stderr_tail, "more": None})
        failed = status_class(s.status) == "failed" and not kids
        last = s.attempts[-1] if s.attempts else None
        failure = None
        if failed:
            failure = {"step": s.step_id, "anchor": f"step-{_anchor(s.step_id)}",
                       "kind": _words(s.reason_kind or (last.reason_kind if last else None),
                                      s.reason or (last.reason if last else None)),
                       "reason": s.reason or (last.reason if last else None) or "failed",
                       "attempt": last.attempt if last else None,
                       "stderr_tail": last.stderr_tail if last and status_class(last.status) == "failed" else None,
                       "more": s.more}
            failed_steps.append(failure)
            if atts and s.more:
                atts[-1]["more"] = s.more
        sections.append({"title": s.step_id + (f" (iteration {s.iteration})" if s.iteration else ""), "anchor": f"step-{_anchor(s.step_id)}", "status": s.status,
                         "cls": status_class(s.status), "needs": s.needs, "attempts": atts, "child": bool(s.parent),
                         "dur": fmt_dur(step_dur), "note": note, "failure": failure,
                         "fanout": _fanout(s, kids) if kids else "", "agent": s.agent,
                         "open": failed or status_class(s.status) == "running"})
    times = [("submitted", fmt_time(view.created_ms)), ("first claim", fmt_time(t0 if starts else None)),
             ("finished", fmt_time(view.finished_ms))]
    ctx = {"title": f"{view.name} · {view.run_id}", "heading": view.name, "subtitle": f"run {view.run_id}",
           "status": view.status, "status_cls": status_class(view.status), "run_reason": view.reason,
           "times": times, "cards": cards, "failures": failed_steps, "spend": _spend(view), "step_spend": _step_spend(view),
           "dag_svg": view.dag_svg,
           "gantt": {"rows": rows, "ticks": _ticks(t0, span),
                     "queued": fmt_dur(queued) if queued else None} if rows else None,
           "params": json.dumps(view.params, indent=2, ensure_ascii=False, default=str) if view.params else "",
           "sections": sections}
    return _jinja().get_template("report.html.j2").render(**ctx)


def _words(kind: str | None, reason: str | None = None) -> str:
    """The reason kind in words, or "" when the reason's text already starts with them."""
    words = kind.replace("_", " ") if kind else ""
    return "" if words and (reason or "").lower().startswith(words) else words


def _fanout(s: StepView, kids: list[StepView]) -> str:
    ok = sum(1 for k in kids if status_class(k.status) == "ok")
    dur = (s.finished_ms - s.started_ms) if s.finished_ms and s.started_ms else None
    if s.loop:
        until = "" if s.loop.get("until") is None else f", until {str(s.loop['until']).lower()}"
        return f"iteration {s.loop.get('iterations')} of max {s.loop.get('max_iterations')}{until} · total {fmt_dur(dur)}"
    return f"{ok} of {len(kids)} succeeded · total {fmt_dur(dur)}"


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
