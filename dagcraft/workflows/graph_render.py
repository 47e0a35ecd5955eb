"""Text, Mermaid, DOT and SVG drawings of a compiled workflow. Output is deterministic (step order)."""

from __future__ import annotations

import json

import networkx as nx

from dagcraft.workflows.spec import CompiledWorkflow, ConcreteStep

FORMATS = ("text", "mermaid", "dot", "svg")


def _label(step: ConcreteStep) -> str:
    if step.loop is not None:
        kind = (f"loop of {len(step.loop.body)} step{'s' if len(step.loop.body) != 1 else ''}, "
                f"at most {step.loop.max_iterations}, until {step.loop.until}")
    elif step.agent:
        kind = f"agent {step.agent}"
    elif step.run is None:
        kind = "approval gate"  # only ``approval:``: it waits for a person, runs nothing
    else:
        kind = "shell" if isinstance(step.run, str) else "argv"
    extra = [kind]
    if step.approval is not None and step.run is not None:
        extra.append("approval first")
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
    return {"text": render_text, "mermaid": render_mermaid, "dot": render_dot, "svg": to_svg}[fmt](wf)


#: Colours of :func:`to_svg` nodes by status class (``st-<status>``). Embedded in the SVG by
#: default; ``dagcraft ui`` serves it as a stylesheet instead (its CSP forbids inline styles).
SVG_CSS = """\
.dc-dag { font: 12px system-ui, -apple-system, "Segoe UI", sans-serif; }
.dc-node rect { fill: #ffffff; stroke: #9aa3af; stroke-width: 1.2; }
.dc-node.dc-finally rect { stroke-dasharray: 5 3; }
.dc-node .dc-id { font-weight: 600; fill: #111827; }
.dc-node .dc-sub { fill: #4b5563; font-size: 11px; }
.dc-edge { fill: none; stroke: #9aa3af; stroke-width: 1.2; }
.dc-arrow { fill: #9aa3af; }
.st-pending rect { fill: #f9fafb; }
.st-running rect, .st-rolling_back rect { fill: #dbeafe; stroke: #2563eb; stroke-width: 2; }
.st-retrying rect { fill: #fef3c7; stroke: #d97706; stroke-width: 2; }
.st-expanded rect { fill: #e0e7ff; stroke: #4f46e5; }
.st-succeeded rect { fill: #dcfce7; stroke: #16a34a; }
.st-failed rect { fill: #fee2e2; stroke: #dc2626; stroke-width: 2; }
.st-skipped rect { fill: #f3f4f6; stroke: #d1d5db; }
.st-skipped .dc-id { fill: #6b7280; }
.st-cancelled rect { fill: #f3f4f6; stroke: #6b7280; stroke-dasharray: 2 2; }
.st-rolled_back rect { fill: #ede9fe; stroke: #7c3aed; }
"""

_NODE_W, _NODE_H, _GAP_X, _GAP_Y, _PAD = 184, 42, 56, 14, 12


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _fit(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _columns(wf: CompiledWorkflow) -> list[list[str]]:
    """Layers left to right (main steps by longest needs-chain, then ``finally``), each ordered
    by the mean row of its needs (fewer crossings), ties broken by step order."""
    g = wf.graph()
    order = {sid: i for i, sid in enumerate(wf.steps)}
    main = [s for s in wf.steps if not wf.steps[s].is_finally]
    cols = [sorted(layer, key=order.__getitem__) for layer in nx.topological_generations(g.subgraph(main))]
    fin = [s for s in wf.steps if wf.steps[s].is_finally]
    if fin:
        cols.append(fin)
    row: dict[str, float] = {}
    for col in cols:
        def key(sid: str) -> tuple[float, int]:
            ups = [row[n] for n in wf.steps[sid].needs if n in row]
            return (sum(ups) / len(ups) if ups else float(order[sid]), order[sid])
        col.sort(key=key)
        for i, sid in enumerate(col):
            row[sid] = i
    return cols


def to_svg(wf: CompiledWorkflow, statuses: dict[str, str] | None = None, *, embed_style: bool = True) -> str:
    """The DAG as a standalone SVG drawing, layers left to right, edges from each need.

    Each node is ``<g class="dc-node st-<status>" data-step="<id>">`` (status ``pending`` for a
    step missing from ``statuses``; no status class without ``statuses``), so a page can recolour
    it live by changing its class; its ``.dc-sub`` text shows the status (else the step's kind).
    Every text is XML-escaped; long ids are shortened on screen and given whole in ``<title>``.
    Deterministic: the same workflow and statuses give the same bytes."""
    cols = _columns(wf)
    height = max((len(c) for c in cols), default=1) * (_NODE_H + _GAP_Y) - _GAP_Y + 2 * _PAD
    width = max(1, len(cols)) * (_NODE_W + _GAP_X) - _GAP_X + 2 * _PAD
    pos: dict[str, tuple[float, float]] = {}
    for c, col in enumerate(cols):
        top = (height - (len(col) * (_NODE_H + _GAP_Y) - _GAP_Y)) / 2
        for r, sid in enumerate(col):
            pos[sid] = (_PAD + c * (_NODE_W + _GAP_X), top + r * (_NODE_H + _GAP_Y))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="dc-dag" viewBox="0 0 {width} {height:g}" '
           f'width="{width}" height="{height:g}" role="img" aria-label="{_xml(wf.name)} DAG">']
    if embed_style:
        out.append(f"<style>{SVG_CSS}</style>")
    out.append('<defs><marker id="dc-arrow" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="7" '
               'markerHeight="7" orient="auto"><path class="dc-arrow" d="M0,0 L8,4 L0,8 z"/></marker></defs>')
    for sid, step in wf.steps.items():
        for need in step.needs:
            if need not in pos:
                continue
            (x1, y1), (x2, y2) = pos[need], pos[sid]
            x1, y1, y2 = x1 + _NODE_W, y1 + _NODE_H / 2, y2 + _NODE_H / 2
            mid = (x1 + x2) / 2
            out.append(f'<path class="dc-edge" data-from="{_xml(need)}" data-to="{_xml(sid)}" '
                       f'd="M{x1:g},{y1:g} C{mid:g},{y1:g} {mid:g},{y2:g} {x2 - 1:g},{y2:g}" '
                       f'marker-end="url(#dc-arrow)"/>')
    for sid, step in wf.steps.items():
        x, y = pos[sid]
        classes = ["dc-node"] + (["dc-finally"] if step.is_finally else [])
        sub = _label(step)
        if statuses is not None:
            status = statuses.get(sid, "pending")
            classes.append(f"st-{status}")
            sub = status
        out.append(f'<g class="{" ".join(classes)}" data-step="{_xml(sid)}" transform="translate({x:g},{y:g})">'
                   f"<title>{_xml(sid)} ({_xml(_label(step))})</title>"
                   f'<rect width="{_NODE_W}" height="{_NODE_H}" rx="7"/>'
                   f'<text class="dc-id" x="10" y="17">{_xml(_fit(sid, 24))}</text>'
                   f'<text class="dc-sub" x="10" y="33">{_xml(_fit(sub, 28))}</text></g>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
