from __future__ import annotations

import json
import re
import shutil
import subprocess
import time

import pytest
from _tracehelp import DATA, make_trace

from dagcraft.tracing import TraceEvent, TraceWriter, read_trace, verify
from dagcraft.tracing.export import export_run_otlp, export_trace_otlp
from dagcraft.tracing.ingest import map_hook
from dagcraft.tracing.ledger import build_ledger, filter_entries, parse_since
from dagcraft.tracing.policy import check
from dagcraft.tracing.render import AttemptView, RunView, StepView, render_run_html, render_trace_html

HOSTILE = "<script>window.__pwned=1</script>\"'><img src=x onerror=alert(1)>"


def ev(seq, kind, payload, t, run="r1"):
    return TraceEvent(version=1, run_id=run, event_id=f"e{seq}-{t}", kind=kind, ts_ms=1_700_000_000_000 + t,
                      seq=seq, payload=payload)


def sample_events(status="failed"):
    return [ev(1, "run.started", {"step": "plan"}, 0),
            ev(2, "tool.call", {"tool": "sh", "command": f"echo {HOSTILE}"}, 10),
            ev(3, "model.call", {"model": "claude", "tokens_in": 100, "tokens_out": 20, "cost_usd": 0.01}, 400),
            ev(4, "tool.result", {"tool": "sh", "success": False, "exit_code": 2, "stdout_preview": HOSTILE,
                                  "duration_ms": 1200}, 1210),
            ev(5, "run.finished", {"status": status}, 1300)]


def sample_view():
    t = 1_700_000_000_000
    evs = sample_events()
    return RunView(run_id="01RUN", name="feature-review", status="failed", created_ms=t, finished_ms=t + 9000,
                   params={"feature": HOSTILE},
                   steps=[StepView(step_id="plan", status="succeeded", attempts=[
                       AttemptView(attempt=1, status="succeeded", worker="w1", started_ms=t, finished_ms=t + 2000,
                                   exit_code=0, events=sample_events("succeeded"))]),
                          StepView(step_id="review[reviewer=security]", status="failed", needs=["plan"], attempts=[
                              AttemptView(attempt=1, status="failed", started_ms=t + 2100, finished_ms=t + 4000,
                                          exit_code=1, reason="exit 1", events=evs),
                              AttemptView(attempt=2, status="failed", started_ms=t + 5000, finished_ms=t + 8000,
                                          exit_code=None, reason="timed out", events=evs)]),
                          StepView(step_id="report", status="skipped", needs=["review"])])


def test_run_html_escapes_and_is_self_contained():
    html = render_run_html(sample_view())
    assert html.count("<script>") == 1  # only our own inline script
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in html
    assert "<img src=x" not in html
    assert "http://" not in html and "https://" not in html and "src=" not in html.replace("src=x", "")
    assert 'id="run-status" data-status="failed"' in html
    for label in ("Steps", "Attempts", "Retries", "Failed attempts", "Tokens", "Cost", "Duration"):
        assert f'<div class="k">{label}</div>' in html
    assert "↻ #2" in html and "bar failed" in html and "<details" in html
    assert "review[reviewer=security]" in html


def test_trace_html_escapes():
    html = render_trace_html(sample_events(), title=HOSTILE)
    assert html.count("<script>") == 1 and "<img src=x" not in html
    assert "&lt;script&gt;window.__pwned=1" in html and 'data-status="failed"' in html


@pytest.mark.browser
@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed")
def test_report_in_headless_chromium(tmp_path):
    page = tmp_path / "report.html"
    page.write_text(render_run_html(sample_view()))
    base = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    r = subprocess.run(base + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    html_tag = re.search(r"<html[^>]*>", dom).group(0)
    assert 'data-js="ok"' in html_tag and "data-js-error" not in html_tag  # our script ran, no onerror
    # chromium logs every console message and uncaught error as INFO:CONSOLE lines on stderr
    console = [ln for ln in r.stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]
    assert console == []
    assert 'id="run-status" data-status="failed">failed<' in dom
    # the hostile payload is still text in the live DOM, not an element
    assert "&lt;script&gt;window.__pwned=1" in dom
    shot = tmp_path / "shot.png"
    subprocess.run(base + ["--window-size=1300,1000", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=90)
    assert shot.exists() and shot.stat().st_size > 10_000


def test_otlp_export_shapes():
    doc = export_run_otlp(sample_view())
    spans = doc["resourceSpans"][0]["scopeSpans"][0]["spans"]
    by_id = {s["spanId"]: s for s in spans}
    names = [s["name"] for s in spans]
    assert names[0] == "run feature-review" and "step plan" in names and "attempt review[reviewer=security]#2" in names
    tool = [s for s in spans if s["name"] == "tool sh"]
    assert len(tool) == 3
    # tool → attempt → step → run
    chain = [tool[-1]]
    while "parentSpanId" in chain[-1]:
        chain.append(by_id[chain[-1]["parentSpanId"]])
    assert [c["name"].split()[0] for c in chain] == ["tool", "attempt", "step", "run"]
    assert all(len(s["traceId"]) == 32 and len(s["spanId"]) == 16 for s in spans)
    assert tool[-1]["status"]["code"] == 2
    assert export_run_otlp(sample_view()) == doc  # deterministic
    single = export_trace_otlp(sample_events())
    assert [s["name"] for s in single["resourceSpans"][0]["scopeSpans"][0]["spans"]] == ["trace r1", "tool sh"]


def test_policy_check():
    evs = [ev(1, "run.started", {}, 0),
           ev(2, "tool.call", {"tool": "Bash", "tool_use_id": "a", "input": {"command": "git  push origin main"}}, 1),
           ev(3, "permission.decision", {"tool": "Bash", "tool_use_id": "b", "decision": "allow",
                                         "input": {"command": "git push --tags"}}, 2),
           ev(4, "tool.call", {"tool": "Bash", "tool_use_id": "b", "input": {"command": "git push --tags"}}, 3),
           ev(5, "permission.decision", {"tool": "Bash", "tool_use_id": "c", "decision": "deny",
                                         "input": {"command": "rm -rf /"}}, 4),
           ev(6, "permission.decision", {"tool": "Bash", "tool_use_id": "d", "decision": "deny"}, 5),
           ev(7, "permission.decision", {"tool": "Bash", "tool_use_id": "d", "decision": "allow"}, 6),
           ev(8, "tool.call", {"tool": "sh", "command": "make deploy"}, 7),
           ev(9, "run.finished", {}, 8)]
    v = check(evs)
    assert [(x.rule, x.seq) for x in v] == [("sensitive_without_allow", 2), ("unresolved_deny", 5)]
    v = check(evs, ["make deploy"])
    assert ("sensitive_without_allow", 8) in [(x.rule, x.seq) for x in v]
    assert check(evs[:1] + evs[2:4], ["git push"]) == []


@pytest.mark.parametrize("payload,kind,checks", [
    ({"hook_event_name": "PreToolUse", "session_id": "s", "tool_name": "Bash", "tool_use_id": "t1",
      "tool_input": {"command": "ls"}}, "tool.call", {"tool": "Bash", "command": "ls", "tool_use_id": "t1"}),
    ({"hook_event_name": "PostToolUse", "tool_name": "Bash", "tool_input": {"command": "false"},
      "tool_response": {"stdout": "", "stderr": "x", "is_error": True}}, "tool.result", {"success": False}),
    ({"hook_event_name": "PostToolUse", "tool_name": "Read", "tool_input": {"file_path": "a"},
      "tool_response": {"content": "ok"}}, "tool.result", {"success": True}),
    ({"hook_event_name": "PermissionRequest", "tool_name": "Bash", "tool_input": {"command": "git push"},
      "decision": "deny"}, "permission.decision", {"decision": "deny", "command": "git push"}),
    ({"hook_event_name": "PreToolUse", "tool_name": "Bash", "tool_input": {"command": "x"},
      "hookSpecificOutput": {"permissionDecision": "allow"}}, "permission.decision", {"decision": "allow"}),
    ({"hook_event_name": "Notification", "message": "Claude needs your permission"}, "x.hook.notification", {}),
    ({"hook_event_name": "Stop", "session_id": "s"}, "x.hook.stop", {}),
    ({"hook_event_name": "SessionStart", "source": "startup"}, "x.hook.session_start", {}),
    ({"hook_event_name": "Stop", "error": "boom"}, "error", {"message": "boom"}),
    ({"kind": "x.custom", "payload": {"a": 1}}, "x.custom", {"a": 1}),
])
def test_hook_mapping(payload, kind, checks):
    k, p = map_hook(payload)
    assert k == kind
    for key, val in checks.items():
        assert p[key] == val


def test_ledger_filters_and_rebuild(tmp_path):
    root = tmp_path / "traces"
    make_trace(root / "a" / "1" / "trace.jsonl", run_id="runA")
    with TraceWriter(root / "b" / "trace.jsonl", "runB", fsync=False) as w:
        w.append("run.started", {"step": "review"})
        w.append("tool.call", {"command": "grep needle-xyz"})
        w.append("run.finished", {"status": "failed"})
    (root / "notes.jsonl").write_text('{"not": "a trace"}\n')
    entries = build_ledger(root)
    assert sorted(e.path for e in entries) == ["a/1/trace.jsonl", "b/trace.jsonl"]
    assert (root / ".dagcraft-ledger.json").exists()
    assert [e.run_id for e in filter_entries(entries, root, status="failed")] == ["runB"]
    assert [e.run_id for e in filter_entries(entries, root, step="rev*")] == ["runB"]
    assert [e.run_id for e in filter_entries(entries, root, text="NEEDLE-xyz")] == ["runB"]
    assert filter_entries(entries, root, since_ms=int(time.time() * 1000) + 10**7) == []
    # the index is a cache: damage it and the catalog is rebuilt from the traces
    (root / ".dagcraft-ledger.json").write_text("{garbage")
    assert len(build_ledger(root)) == 2
    idx = json.loads((root / ".dagcraft-ledger.json").read_text())
    assert set(idx["entries"]) == {"a/1/trace.jsonl", "b/trace.jsonl"}
    assert parse_since("2h", now_ms=10_000_000) == 10_000_000 - 7_200_000
    assert parse_since("2024-01-01") == 1704067200000


def test_sample_traceframe_file_reads_everywhere(tmp_path):
    p = DATA / "traceframe_sample.jsonl"
    rep = verify(p)
    assert rep.ok and rep.status == "unchained"
    evs = read_trace(p)
    assert render_trace_html(evs) and export_trace_otlp(evs)
