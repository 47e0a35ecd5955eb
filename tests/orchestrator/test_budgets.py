"""Issue 10, budgets: limits on money and tokens per run, per agent and per step, enforced from
what the agent adapters read while the agent runs; the spend ledger in the store counts every
attempt once (across hosts, retries, failures); a budget stop ends the run ``budget_exceeded``
(exit 6) and ``resume --budget`` raises the limit and continues. End to end through
``dagcraft run`` on the local store and on the moto server."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dagcraft.orchestrator import budget, layout, list_runs, run_status, write_report
from dagcraft.orchestrator.model import AttemptStatus
from dagcraft.orchestrator.ops import load_states
from dagcraft.primitives import open_store
from tests.conftest import server_store_url
from tests.orchestrator.helpers import REPO, cli, read_trace_events, steps, write_spec

AGENT = REPO / "examples" / "agents" / "fake_agent.py"
PY, FAKE = json.dumps(sys.executable), json.dumps(str(AGENT))
#: the fake agent in spend mode: 1000 tokens in + 500 out per message; at these prices that is
#: 1000*3e-6 + 500*15e-6 = $0.0105 per message
TICK_USD = 0.0105
TICK_TOKENS = 1500


def _agent(name: str, *, adapter: str = "claude", fmt: str = "stream-json", extra: str = "") -> str:
    return f"""
      {name}:
        command: [{PY}, {FAKE}, -p, "${{{{ prompt }}}}", --output-format, {fmt}]
        adapter: {adapter}
        prices: {{input_per_mtok: 3.0, output_per_mtok: 15.0}}
        {extra}"""


@pytest.fixture(params=["local", "s3server"])
def store_url(request: Any, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return server_store_url(request.getfixturevalue("moto_server"))


def _run(tmp_path: Path, store_url: str, text: str, code: int, *args: str) -> tuple[dict[str, Any], Any]:
    spec = write_spec(tmp_path, text)
    proc = cli("run", str(spec), "--store", store_url, "--no-report", *args, cwd=tmp_path, timeout=240)
    assert proc.returncode == code, proc.stdout + proc.stderr
    st = open_store(store_url)
    runs = list_runs(st)
    assert runs, proc.stdout + proc.stderr
    return run_status(st, runs[0]["run_id"]), st


def _ledger(store: Any, rid: str) -> dict[tuple[str, int], budget.Spend]:
    return {(e.step, e.attempt): e for e in budget.ledger(store, rid)}


class _Watch(threading.Thread):
    """Waits for the spend log's ``pid`` line, then polls that process until it is gone (a
    zombie counts as gone: it runs nothing) and records when, on CLOCK_MONOTONIC — the clock
    the fake agent logs its messages with."""

    def __init__(self, log: Path) -> None:
        super().__init__(daemon=True)
        self.log = log
        self.pid: int | None = None
        self.gone_at: float | None = None

    def run(self) -> None:
        deadline = time.monotonic() + 200
        while self.pid is None and time.monotonic() < deadline:
            if self.log.exists() and self.log.read_text().startswith("pid "):
                self.pid = int(self.log.read_text().splitlines()[0].split()[1])
            else:
                time.sleep(0.01)
        while self.pid is not None and time.monotonic() < deadline:
            try:
                state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:
                state = "gone"
            if state in ("gone", "Z", "X"):
                self.gone_at = time.monotonic()
                return
            time.sleep(0.005)


def _crossing(log: Path, limit_usd: float) -> float:
    """When the agent printed the message that took its spend to the limit."""
    for line in log.read_text().splitlines()[1:]:
        t, tokens = line.split()
        if int(tokens) / TICK_TOKENS * TICK_USD >= limit_usd - 1e-12:
            return float(t)
    raise AssertionError(f"the agent never crossed ${limit_usd}: {log.read_text()}")


def test_run_limit_kills_agent_within_a_second_then_resume_counts_spend_once(tmp_path, store_url):
    log = tmp_path / "spend.log"
    text = f"""
    name: budgeted
    budget: {{usd: 0.05}}
    agents:{_agent("coder")}
    steps:
      - id: implement
        agent: coder
        prompt: keep going
        env: {{FAKE_AGENT_MODE: spend, FAKE_AGENT_ROUNDS: "8", FAKE_AGENT_SPEND_LOG: {json.dumps(str(log))}}}
      - id: after
        needs: [implement]
        run: echo done
    """
    watch = _Watch(log)
    watch.start()
    status, store = _run(tmp_path, store_url, text, 6)
    watch.join(30)
    rid = status["run_id"]
    assert status["status"] == "budget_exceeded"
    st = steps(status)
    assert st["implement"]["status"] == "failed" and st["implement"]["reason_kind"] == "budget_exceeded"
    assert st["after"]["status"] == "skipped"
    # the agent was killed within a second of the message that crossed the limit
    assert watch.pid is not None and watch.gone_at is not None, "agent pid never seen or never exited"
    assert watch.gone_at - _crossing(log, 0.05) < 1.0
    first = _ledger(store, rid)[("implement", 1)]
    assert first.final and first.cost_from == "prices"
    assert 0.05 <= first.cost_usd <= 0.05 + 2 * TICK_USD  # stopped at the crossing (a line in flight at most)
    assert status["budget"]["run"]["usd"] == pytest.approx(first.cost_usd)
    assert status["budget"]["run"]["limit_usd"] == 0.05
    # the attempt's trace says why it stopped
    kinds = [e["kind"] for e in read_trace_events(store, rid, "implement", 1)]
    assert "x.dagcraft.budget_exceeded" in kinds

    # resume with a raised limit: the stopped step runs again, the earlier spend still counts
    proc = cli("resume", rid, "--store", store_url, "--no-report", "--budget", "usd=1.5", cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = run_status(store, rid)
    assert status["status"] == "succeeded"
    assert steps(status)["after"]["status"] == "succeeded"
    ledger = _ledger(store, rid)
    assert sorted(ledger) == [("implement", 1), ("implement", 2)]
    assert ledger[("implement", 1)] == first  # attempt 1's record is untouched
    assert ledger[("implement", 2)].cost_usd == pytest.approx(8 * TICK_USD)
    assert status["budget"]["run"]["usd"] == pytest.approx(first.cost_usd + 8 * TICK_USD)
    assert status["budget"]["run"]["limit_usd"] == 1.5
    # the raise is recorded in control.json
    ctl = json.loads(store.get(layout.control(rid))[0])
    assert ctl["budget"] == {"usd": 1.5}


def test_agent_and_step_limits(tmp_path, local_store):
    store_url = str(tmp_path / "store")
    text = f"""
    name: scoped
    on_failure: continue
    agents:{_agent("cheap", extra="budget: {tokens: 4000}")}{_agent("other")}
    steps:
      - id: capped_by_agent
        agent: cheap
        prompt: go
        env: {{FAKE_AGENT_MODE: spend, FAKE_AGENT_ROUNDS: "50"}}
      - id: capped_by_step
        agent: other
        prompt: go
        budget: {{usd: 0.03}}
        env: {{FAKE_AGENT_MODE: spend, FAKE_AGENT_ROUNDS: "50"}}
      - id: free
        agent: other
        prompt: go
        env: {{FAKE_AGENT_MODE: spend, FAKE_AGENT_ROUNDS: "2"}}
    """
    status, store = _run(tmp_path, store_url, text, 6)
    st = steps(status)
    assert st["capped_by_agent"]["reason_kind"] == "budget_exceeded"
    assert st["capped_by_agent"]["reason"].startswith("agent 'cheap' budget reached: 4,500 tokens spent of 4,000")
    assert st["capped_by_step"]["reason_kind"] == "budget_exceeded"
    assert st["capped_by_step"]["reason"].startswith("step 'capped_by_step' budget reached")
    assert st["free"]["status"] == "succeeded"  # other limits do not stop it
    b = status["budget"]
    assert b["agents"]["cheap"]["limit_tokens"] == 4000 and b["agents"]["cheap"]["tokens"] >= 4000
    assert b["steps"]["capped_by_step"]["limit_usd"] == 0.03 and b["steps"]["capped_by_step"]["usd"] >= 0.03
    assert b["steps"]["free"]["tokens"] == 2 * TICK_TOKENS
    # raising only the agent's limit (and the step's) continues both
    rid = status["run_id"]
    proc = cli("resume", rid, "--store", store_url, "--no-report", "--budget", "agent.cheap.tokens=1000000",
               "--budget", "step.capped_by_step.usd=5", cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert run_status(store, rid)["status"] == "succeeded"


def test_no_agent_call_starts_once_the_run_budget_is_spent(tmp_path, local_store):
    store_url = str(tmp_path / "store")
    text = f"""
    name: nomore
    budget: {{tokens: 3000}}
    agents:{_agent("coder")}
    steps:
      - id: first
        agent: coder
        prompt: go
        env: {{FAKE_AGENT_MODE: spend}}
      - id: second
        needs: [first]
        when: "${{{{ always() }}}}"
        agent: coder
        prompt: go
        env: {{FAKE_AGENT_MODE: spend}}
      - id: shell
        needs: [first]
        when: "${{{{ always() }}}}"
        run: echo shell steps cost nothing
    """
    status, store = _run(tmp_path, store_url, text, 6)
    rid = status["run_id"]
    st = steps(status)
    assert st["first"]["reason_kind"] == "budget_exceeded"
    assert st["second"]["reason_kind"] == "budget_exceeded"
    assert st["second"]["reason"].startswith("not started: run budget reached")
    assert st["shell"]["status"] == "succeeded"
    # the second agent never ran: no exec in its trace, no spend
    kinds = [e["kind"] for e in read_trace_events(store, rid, "second", 1)]
    assert "tool.call" not in kinds and "x.dagcraft.budget_exceeded" in kinds
    assert _ledger(store, rid)[("second", 1)].tokens == 0


def test_price_table_for_a_tokens_only_adapter(tmp_path, local_store):
    store_url = str(tmp_path / "store")
    text = f"""
    name: priced
    agents:{_agent("codex", adapter="codex", fmt="json")}{_agent("claude")}
    steps:
      - id: by_prices
        agent: codex
        prompt: Summarise the change
      - id: reported
        agent: claude
        prompt: Summarise the change
    """
    status, store = _run(tmp_path, store_url, text, 0)
    ledger = _ledger(store, status["run_id"])
    codex = ledger[("by_prices", 1)]
    assert codex.tokens_in > 0 and codex.tokens_out > 0 and codex.cost_from == "prices"
    assert codex.cost_usd == pytest.approx((codex.tokens_in * 3.0 + codex.tokens_out * 15.0) / 1e6)
    claude = ledger[("reported", 1)]
    assert claude.cost_from == "reported" and claude.cost_usd > 0  # the CLI's own total wins over prices
    assert status["budget"]["agents"]["codex"]["usd"] == pytest.approx(codex.cost_usd)
    assert status["budget"]["run"]["usd"] == pytest.approx(codex.cost_usd + claude.cost_usd)
    # `status` prints spend per agent and per step
    proc = cli("status", status["run_id"], "--store", store_url)
    assert proc.returncode == 0, proc.stderr
    assert "spend: $" in proc.stdout and "agent codex" in proc.stdout and "step  by_prices" in proc.stdout
    # and the report, from the same ledger: the priced cost (in no trace) per agent and per step
    html = write_report(store, status["run_id"], tmp_path / "report.html").read_text()
    assert "Spend per agent" in html and "Spend per step" in html
    assert f"${codex.cost_usd:.4f}" in html


def test_failed_attempts_spend_counts(tmp_path, local_store):
    store_url = str(tmp_path / "store")
    text = f"""
    name: failing
    agents:{_agent("coder")}
    steps:
      - id: broken
        agent: coder
        prompt: try
        retries: {{limit: 1, backoff: 0.05s}}
        env: {{FAKE_AGENT_MODE: fail}}
    """
    status, store = _run(tmp_path, store_url, text, 1)
    rid = status["run_id"]
    hist = load_states(store, rid)["broken"].history
    assert [h.status for h in hist] == [AttemptStatus.FAILED, AttemptStatus.FAILED]
    ledger = _ledger(store, rid)
    assert sorted(ledger) == [("broken", 1), ("broken", 2)]
    assert all(e.cost_usd == pytest.approx(0.0004) and e.final for e in ledger.values())
    assert status["budget"]["steps"]["broken"]["usd"] == pytest.approx(0.0008)


def test_two_workers_never_double_count(tmp_path, store_url):
    text = f"""
    name: parallel
    budget: {{usd: 100}}
    agents:{_agent("coder")}
    steps:
      - id: work
        matrix: {{n: [1, 2, 3, 4, 5, 6]}}
        agent: coder
        prompt: "part ${{{{ matrix.n }}}}"
        env: {{FAKE_AGENT_MODE: spend, FAKE_AGENT_ROUNDS: "3", FAKE_AGENT_TICK: "0.05"}}
    """
    status, store = _run(tmp_path, store_url, text, 0, "--workers", "2")
    rid = status["run_id"]
    ledger = _ledger(store, rid)
    states = load_states(store, rid)
    # one entry per attempt that ran, written by the worker that ran it
    attempts = {(sid, h.attempt): h.worker for sid, st in states.items() for h in st.history}
    assert {k: e.worker for k, e in ledger.items()} == attempts
    assert all(e.tokens == 3 * TICK_TOKENS for e in ledger.values())
    assert status["budget"]["run"]["tokens"] == len(ledger) * 3 * TICK_TOKENS
    assert status["budget"]["run"]["usd"] == pytest.approx(len(ledger) * 3 * TICK_USD)


def test_schema_has_budget_fields(tmp_path):
    proc = cli("schema")
    assert proc.returncode == 0, proc.stderr
    schema = json.loads(proc.stdout)
    defs = schema["$defs"]
    assert "budget" in schema["properties"]
    assert "budget" in defs["StepSpec"]["properties"]
    assert {"budget", "prices"} <= set(defs["AgentDef"]["properties"])
    assert set(defs["BudgetSpec"]["properties"]) == {"usd", "tokens"}
    assert set(defs["PricesSpec"]["properties"]) == {"input_per_mtok", "output_per_mtok"}


def test_bad_budget_values_exit_2_with_one_line(tmp_path):
    store_url = str(tmp_path / "store")
    spec = write_spec(tmp_path, f"""
    name: bad
    budget: {{usd: -1}}
    agents:{_agent("coder")}
    steps:
      - id: a
        agent: coder
        prompt: go
    """)
    proc = cli("run", str(spec), "--store", store_url, "--no-report", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "budget.usd" in lines[0] and "pipeline.yaml:" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "store" / "objects" / "runs")  # nothing written

    ok = write_spec(tmp_path, f"""
    name: good
    agents:{_agent("coder")}
    steps:
      - id: a
        agent: coder
        prompt: go
    """, name="good.yaml")
    proc = cli("run", str(ok), "--store", store_url, "--no-report", cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rid = list_runs(open_store(store_url))[0]["run_id"]
    before = open_store(store_url).get(layout.control(rid))
    for arg, words in (("bogus=1", "unknown key"), ("usd=-2", "non-negative"), ("agent.nobody.usd=1", "no agent"),
                       ("step.nope.tokens=5", "no step"), ("tokens=lots", "not a number"), ("usd", "KEY=VALUE")):
        proc = cli("resume", rid, "--store", store_url, "--budget", arg, cwd=tmp_path)
        assert proc.returncode == 2, (arg, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (arg, proc.stderr)
    assert open_store(store_url).get(layout.control(rid)) == before  # nothing written

