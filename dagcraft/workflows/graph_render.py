"""Text, Mermaid and DOT drawings of a compiled workflow. Output is deterministic (step order)."""

from __future__ import annotations

import json

import networkx as nx

from dagcraft.workflows.spec import CompiledWorkflow, ConcreteStep

FORMATS = ("text", "mermaid", "dot")


def _label(step: ConcreteStep) -> str:
    kind = f"agent {step.agent}" if step.agent else ("shell" if isinstance(step.run, str) else "argv")
    extra = [kind]
    if step.foreach:
        extra.append(f"foreach {step.foreach}")
    if step.rollback is not None:
        extra.append("rollback")
    if step.when != ("${{ always() }}" if step.is_finally else "${{ success() }}"):
        extra.append(f"when {step.when}")
    return ", ".join(extra)


def render_text(wf: CompiledWorkflow) -> str:
    """A layered listing: layer n holds the steps whose longest needs-chain has length n."""
    g = wf.graph()
    order = {sid: i for i, sid in enumerate(wf.steps)}
    lines = [f"{wf.name}: {len(wf.steps)} steps, on_failure={wf.on_failure}"]
    main = [s for s in wf.steps if not wf.steps[s].is_finally]
    layers = list(nx.topological_generations(g.subgraph(main)))
    for n, layer in enumerate(layers):
        lines.append(f"layer {n}:")
        for sid in sorted(layer, key=order.__getitem__):
            lines.append(_line(wf.steps[sid]))
    fin = [s for s in wf.steps if wf.steps[s].is_finally]
    if fin:
        lines.append("finally:")
        for sid in fin:
            lines.append(_line(wf.steps[sid]))
    return "\n".join(lines) + "\n"


def _line(step: ConcreteStep) -> str:
    s = f"  {step.id}  ({_label(step)})"
    if step.needs:
        s += "  <- " + ", ".join(step.needs)
    return s


def _q(text: str) -> str:
    return json.dumps(text)  # a double-quoted string with \" and \\ escaped: valid in DOT


def render_dot(wf: CompiledWorkflow) -> str:
    """Graphviz ``digraph``; node names are the quoted concrete ids."""
    lines = [f"digraph {_q(wf.name)} {{", "  rankdir=TB;", "  node [shape=box];"]
    for sid, step in wf.steps.items():
        shape = ", style=dashed" if step.is_finally else ""
        lines.append(f"  {_q(sid)} [label={_q(sid + chr(10) + _label(step))}{shape}];")
    for sid, step in wf.steps.items():
        for need in step.needs:
            lines.append(f"  {_q(need)} -> {_q(sid)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _mermaid_text(text: str) -> str:
    # Mermaid labels are double-quoted; quotes and angle brackets go as entity codes.
    return text.replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")


def render_mermaid(wf: CompiledWorkflow) -> str:
    """Mermaid ``flowchart TD``; node names are ``s0, s1, ...`` in step order, labelled by id."""
    names = {sid: f"s{i}" for i, sid in enumerate(wf.steps)}
    lines = ["flowchart TD"]
    for sid, step in wf.steps.items():
        label = _mermaid_text(f"{sid}<br/>{_label(step)}").replace("#lt;br/#gt;", "<br/>")
        open_, close = ("([", "])") if step.is_finally else ("[", "]")
        lines.append(f'  {names[sid]}{open_}"{label}"{close}')
    for sid, step in wf.steps.items():
        for need in step.needs:
            lines.append(f"  {names[need]} --> {names[sid]}")
    return "\n".join(lines) + "\n"


def render(wf: CompiledWorkflow, fmt: str) -> str:
    """Dispatch on ``fmt`` (one of FORMATS)."""
    return {"text": render_text, "mermaid": render_mermaid, "dot": render_dot}[fmt](wf)
