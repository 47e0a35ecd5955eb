"""Budgets: the spend ledger in the store, the limits in force, and the check against them.

Guarantees:
- Spend is recorded per run attempt under its own key (``layout.spend_entry``), written only
  by the worker running that attempt (attempt numbers are unique per step): updated as usage
  streams in, final just before the commit. A total is the sum over those keys, so an
  attempt's spend counts exactly once whichever host reads it, across retries, and failed,
  cancelled and lost attempts count too (a lost attempt with whatever it last wrote).
- An attempt's cost is what its agent CLI reported; where the CLI reports tokens but no cost
  (yet), tokens × the agent's ``prices`` (no prices: no cost). Tokens are tokens_in + tokens_out.
- The limits in force are the spec's (``budget:`` at run, agent and step level), each
  overridden by a value raised with ``resume --budget KEY=VALUE`` (kept in ``control.json``).
  A limit is reached when spend >= limit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from dagcraft.errors import InvalidInput
from dagcraft.orchestrator import layout
from dagcraft.primitives.store import Store
from dagcraft.workflows import CompiledWorkflow, ConcreteStep
from dagcraft.workflows.spec import AgentDef

Metric = Literal["usd", "tokens"]
METRICS: tuple[Metric, ...] = ("usd", "tokens")


class Spend(BaseModel):
    """One run attempt's spend (``runs/<run>/spend/<step>/<n>``)."""

    step: str
    attempt: int
    agent: str | None = None
    worker: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    #: where the cost came from: the CLI's report, the agent's price table, or nothing
    cost_from: Literal["reported", "prices", "none"] = "none"
    #: written by the attempt's end (else: the attempt is running, or was lost)
    final: bool = False
    updated_at: float = 0.0

    @property
    def tokens(self) -> int:
        return self.tokens_in + self.tokens_out


def spend_of(usage: Mapping[str, Any], agent: AgentDef | None) -> tuple[int, int, float, str]:
    """(tokens_in, tokens_out, cost_usd, cost_from) from an adapter's running ``usage``."""
    tin, tout = int(usage.get("tokens_in") or 0), int(usage.get("tokens_out") or 0)
    reported = usage.get("cost_usd")
    if reported is not None:
        return tin, tout, float(reported), "reported"
    if agent is not None and agent.prices is not None:
        cost = (tin * agent.prices.input_per_mtok + tout * agent.prices.output_per_mtok) / 1_000_000
        return tin, tout, round(cost, 9), "prices"
    return tin, tout, 0.0, "none"


def record(store: Store, run_id: str, spend: Spend) -> None:
    """Write one attempt's spend (its own key: only its worker writes it)."""
    store.put(layout.spend_entry(run_id, spend.step, spend.attempt),
              json.dumps(spend.model_dump(mode="json"), sort_keys=True).encode())


def ledger(store: Store, run_id: str) -> list[Spend]:
    """Every attempt's spend in the run. An unreadable entry is skipped (it was never a
    valid write of a worker)."""
    out: list[Spend] = []
    for key in store.list(layout.spend_prefix(run_id)):
        got = store.get(key)
        if got is None:
            continue
        try:
            out.append(Spend.model_validate_json(got[0]))
        except ValidationError:
            continue
    return out


class Totals(BaseModel):
    """Spend summed over a ledger: the run's, per agent and per step (concrete step id)."""

    usd: float = 0.0
    tokens: int = 0
    agents: dict[str, dict[str, float]] = {}
    steps: dict[str, dict[str, float]] = {}

    def get(self, scope: str, name: str | None, metric: Metric) -> float:
        if scope == "run":
            return self.usd if metric == "usd" else self.tokens
        table = self.agents if scope == "agent" else self.steps
        return table.get(name or "", {}).get(metric, 0.0)


def totals(entries: Iterable[Spend], skip: tuple[str, int] | None = None) -> Totals:
    """Sum ``entries``, leaving out attempt ``skip`` = (step, n) (the caller's live one)."""
    t = Totals()
    for e in entries:
        if skip is None or (e.step, e.attempt) != skip:
            _plus(t, e)
    return t


def add(t: Totals, spend: Spend) -> Totals:
    """``t`` with one more attempt's spend (a copy; ``t`` is unchanged)."""
    return _plus(t.model_copy(deep=True), spend)


def _plus(t: Totals, e: Spend) -> Totals:
    t.usd += e.cost_usd
    t.tokens += e.tokens
    for table, name in ((t.agents, e.agent), (t.steps, e.step)):
        if name is None:
            continue
        row = table.setdefault(name, {"usd": 0.0, "tokens": 0})
        row["usd"] += e.cost_usd
        row["tokens"] += e.tokens
    return t


# -- limits ------------------------------------------------------------------------------------
def parse_raise(text: str, wf: CompiledWorkflow) -> tuple[str, float]:
    """``KEY=VALUE`` of ``resume --budget``: ``usd``, ``tokens``, ``agent.NAME.usd|tokens``,
    ``step.ID.usd|tokens`` (ID: a step id or a matrix/foreach template id). Raises InvalidInput
    (one line) for an unknown key, agent or step, or a value that is not a non-negative number."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep:
        raise InvalidInput(f"--budget {text!r}: expected KEY=VALUE (e.g. usd=10, agent.coder.tokens=50000)")
    parts = key.split(".")
    metric = parts[-1]
    if metric not in METRICS or len(parts) not in (1, 3) or (len(parts) == 3 and parts[0] not in ("agent", "step")):
        raise InvalidInput(f"--budget {key!r}: unknown key (use usd, tokens, agent.NAME.usd|tokens or "
                           "step.ID.usd|tokens)")
    if len(parts) == 3:
        scope, name = parts[0], parts[1]
        if scope == "agent" and name not in wf.agents:
            raise InvalidInput(f"--budget {key!r}: no agent {name!r} in the workflow "
                               f"(agents: {', '.join(sorted(wf.agents)) or 'none'})")
        if scope == "step" and not any(name in (s.id, s.template_id) for s in wf.steps.values()):
            raise InvalidInput(f"--budget {key!r}: no step {name!r} in the workflow")
    try:
        number = float(value)
    except ValueError:
        raise InvalidInput(f"--budget {key}={value!r}: not a number") from None
    if not math.isfinite(number) or number < 0:
        raise InvalidInput(f"--budget {key}={value}: must be a non-negative number")
    if metric == "tokens" and number != int(number):
        raise InvalidInput(f"--budget {key}={value}: tokens must be a whole number")
    return key, number


def limit(wf: CompiledWorkflow, raised: Mapping[str, float], scope: str, name: str | None, metric: Metric,
          step: ConcreteStep | None = None) -> float | None:
    """The limit in force for ``scope`` ("run", "agent" NAME, "step" with its ConcreteStep)."""
    if scope == "run":
        if metric in raised:
            return raised[metric]
        spec = wf.budget
    elif scope == "agent":
        k = f"agent.{name}.{metric}"
        if k in raised:
            return raised[k]
        agent = wf.agents.get(name or "")
        spec = agent.budget if agent is not None else None
    else:
        assert step is not None
        for k in (f"step.{step.id}.{metric}", f"step.{step.template_id}.{metric}"):
            if k in raised:
                return raised[k]
        spec = step.budget
    value = None if spec is None else getattr(spec, metric)
    return None if value is None else float(value)


def exceeded(wf: CompiledWorkflow, raised: Mapping[str, float], t: Totals, step: ConcreteStep) -> str | None:
    """The first limit ``t`` reaches that applies to ``step`` (run, its agent, itself), in
    words, or None while every one has room."""
    scopes: list[tuple[str, str | None]] = [("run", None)]
    if step.agent:
        scopes.append(("agent", step.agent))
    scopes.append(("step", step.id))
    for scope, name in scopes:
        for metric in METRICS:
            lim = limit(wf, raised, scope, name, metric, step)
            if lim is None:
                continue
            spent = t.get(scope, name, metric)
            if spent >= lim:
                what = "run" if scope == "run" else f"{scope} {name!r}"
                return f"{what} budget reached: {fmt(metric, spent)} spent of {fmt(metric, lim)}"
    return None


def fmt(metric: str, value: float) -> str:
    return f"${value:.4f}" if metric == "usd" else f"{int(value):,} tokens"


def summary(wf: CompiledWorkflow, raised: Mapping[str, float], entries: list[Spend],
            steps: Mapping[str, ConcreteStep]) -> dict[str, Any]:
    """Spend against the limits, for ``status`` and the report: the run's, per agent (every
    agent declared or spending) and per step that spent or has a limit. Each row is
    ``{usd, tokens, limit_usd, limit_tokens}`` (a limit None when there is none)."""
    t = totals(entries)

    def row(scope: str, name: str | None, spent: Mapping[str, float], step: ConcreteStep | None = None
            ) -> dict[str, Any]:
        return {"usd": round(float(spent.get("usd", 0.0)), 6), "tokens": int(spent.get("tokens", 0)),
                "limit_usd": limit(wf, raised, scope, name, "usd", step),
                "limit_tokens": limit(wf, raised, scope, name, "tokens", step)}

    agents = {name: row("agent", name, t.agents.get(name, {}))
              for name in sorted(set(wf.agents) | set(t.agents))}
    by_step: dict[str, Any] = {}
    for sid in sorted(set(t.steps) | {s for s, st in steps.items() if st.budget is not None}):
        st = steps.get(sid)
        spent = t.steps.get(sid, {})
        if st is not None:
            by_step[sid] = row("step", sid, spent, st)
        else:  # a step no longer known by its definition (never: kept for a hand-edited ledger)
            by_step[sid] = {"usd": round(float(spent.get("usd", 0.0)), 6), "tokens": int(spent.get("tokens", 0)),
                            "limit_usd": None, "limit_tokens": None}
    return {"run": row("run", None, {"usd": t.usd, "tokens": t.tokens}), "agents": agents, "steps": by_step,
            "attempts": len(entries)}
