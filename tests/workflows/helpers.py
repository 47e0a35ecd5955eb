from __future__ import annotations

import textwrap

from dagcraft.workflows import CompiledWorkflow, compile_workflow, parse_spec


def compile_text(text: str, params: dict | None = None, source: str = "t.yaml") -> CompiledWorkflow:
    return compile_workflow(parse_spec(textwrap.dedent(text), source), params or {}, source=source)
