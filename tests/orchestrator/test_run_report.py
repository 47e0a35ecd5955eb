"""The run report of a failed run, built from a real store (issue 11, "Report"): failures first
with their reason and stderr tail, a timeline from the first claim, durations, skip reasons as
text, foreach parents summarized, spend per agent, the run's one duration."""

from __future__ import annotations

import html as htmllib
import re

from dagcraft.orchestrator import report_view, run_status, write_report
from dagcraft.tracing.render import AttemptView, RunView, StepView, render_run_html
from dagcraft.tracing.summary import fmt_dur
from tests.orchestrator.helpers import REPO, run_spec

AGENT = REPO / "examples" / "agents" / "fake_agent.py"

SPEC = f"""
    name: report-demo
    on_failure: continue
    agents:
      coder:
        command: [python3, "{AGENT}", -p, "${{{{ prompt }}}}", --output-format, stream-json]
        adapter: claude
      reviewer: {{command: [no-such-agent-cli, -p, "${{{{ prompt }}}}"]}}
    steps:
      - id: plan
        agent: coder
        prompt: "Write a plan for: a; b; c. Save the plan to plan.md and list the subtasks."
        outputs: {{values: [subtasks]}}
      - id: implement
        needs: [plan]
        foreach: "${{{{ steps.plan.outputs.subtasks }}}}"
        agent: coder
        prompt: "Implement ${{{{ item }}}}."
      - id: review
        needs: [implement]
        agent: reviewer
        prompt: "Review it."
      - id: merge
        needs: [review]
        run: "echo merged"
"""


def _text(page: str) -> str:
    """The page's visible text: tags (and so title="…" tooltips) removed."""
    body = re.sub(r"<style.*?</style>|<script.*?</script>", "", page, flags=re.S)
    return htmllib.unescape(re.sub(r"<[^>]+>", " ", body))


def test_failed_run_report_explains_the_failure(local_store, tmp_path):
    rid, st = run_spec(local_store, tmp_path, SPEC)
    assert st["status"] == "failed"
    page = write_report(local_store, rid, tmp_path / "report.html").read_text()
    text = _text(page)
    # failures first: the reason in words, the stderr tail and the command for the whole log
    failures = page[page.index('id="failures"'):page.index('class="cards"')]
    assert "review" in failures and "command not found: &#39;no-such-agent-cli&#39; (exit code 127)" in failures
    assert "cannot execute &#39;no-such-agent-cli&#39;" in failures
    assert f"dagcraft logs {rid}/review --attempt 1 --stream stderr" in htmllib.unescape(failures)
    # the failed step's section is open, its stderr tail outside any collapsed payload
    section = re.search(r'<details class="step" id="step-review"([^>]*)>(.*?)</details>\s*(?=<details class="step"|</section>)',
                        page, re.S)
    assert section and "open" in section.group(1)
    before_events = section.group(2).split('<table class="ev">')[0]
    assert '<pre class="tail">' in before_events and "cannot execute" in before_events
    # skip reasons are text, saying which need made it false
    assert "when condition is false (review failed)" in text
    # the foreach parent is summarized
    assert "3 of 3 succeeded" in text
    # spend per agent, from the adapters' model.call events
    spend = page[page.index('id="spend"'):page.index('id="timeline"')]
    assert "<td>coder</td>" in spend and "fake-sonnet-1" in spend
    calls = re.search(r"<td>coder</td><td>[^<]*</td><td class=\"n\">(\d+)</td><td class=\"n\">(\d+)</td>", spend)
    assert calls and calls.groups() == ("4", "4")  # plan + 3 children, one attempt each
    # one duration: the same figure as `status`
    dur_ms = report_view(local_store, rid).duration_ms
    assert dur_ms is not None and abs(dur_ms - st["duration_s"] * 1000) <= 1
    assert f'<div class="v">{fmt_dur(dur_ms)}</div><div class="k">Duration</div>' in page
    # the timeline starts at the first claim: the earliest bar is at the left edge
    lefts = [float(x) for x in re.findall(r'class="bar [^"]*"[^>]*style="left:([\d.]+)%', page)]
    assert min(lefts) == 0.0
    assert "queued" in text and "before it" in text
    # self-contained: nothing fetched (an SVG's xmlns names a namespace, it loads nothing)
    fetched = page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "http://" not in fetched and "https://" not in fetched and " src=" not in page
    assert 'class="dc-dag"' in page and 'data-step="review"' in page  # the DAG picture


def test_report_view_timing_is_run_status_timing(local_store, tmp_path):
    rid, st = run_spec(local_store, tmp_path, """
        name: t
        steps:
          - id: a
            run: "sleep 0.3"
    """)
    view = report_view(local_store, rid)
    again = run_status(local_store, rid)
    assert view.duration_ms == int(again["timing"]["duration_s"] * 1000)
    assert view.first_claim_ms == int(again["timing"]["first_claim_at"] * 1000)
    assert view.queued_ms == int(again["timing"]["queued_s"] * 1000)


def test_lost_and_skipped_reasons_are_visible_text():
    t = 1_700_000_000_000
    view = RunView(run_id="r", name="n", status="failed", created_ms=t, finished_ms=t + 5000, steps=[
        StepView(step_id="slow", status="failed", reason="lost worker", reason_kind="lost_worker", attempts=[
            AttemptView(attempt=1, status="lost", worker="w1", started_ms=t + 1000, finished_ms=t + 3000,
                        reason="lost worker", reason_kind="lost_worker")]),
        StepView(step_id="after", status="skipped", reason="not started: a step failed (on_failure: stop)")])
    page = render_run_html(view)
    text = _text(page)
    assert text.count("lost worker") >= 2  # the failure panel and the attempt, not only a tooltip
    assert "not started: a step failed (on_failure: stop)" in text
    assert "queued 1.0 s" in text  # submit → first claim, shown apart from the timeline
