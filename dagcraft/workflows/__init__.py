"""dagcraft.workflows: YAML spec → validated pydantic models → compiled step DAG; templating.

Public API: the names below (the spec format is documented in docs/spec.md). This package
imports nothing from primitives, tracing or orchestrator.
"""

from __future__ import annotations

from dagcraft.workflows.compile import (
    INSTANCE_FIELDS,
    MAX_STEPS,
    compile_file,
    compile_workflow,
    concrete_id,
    executable_warnings,
    instance_key,
    matrix_id_value,
    spec_hash_of,
)
from dagcraft.workflows.loader import SpecErrors, format_path, load_spec, parse_spec, paused_gc
from dagcraft.workflows.params import coerce, parse_params, resolve_params
from dagcraft.workflows.spec import (
    AgentDef,
    CompiledWorkflow,
    ConcreteStep,
    InputDecl,
    LoopDef,
    RenderContext,
    RenderedCommand,
    RetryPolicy,
    Spec,
    StepSpec,
    loop_child_id,
    parse_duration,
)
from dagcraft.workflows.template import (
    MAX_FANOUT,
    EvaluationLimit,
    RenderCancelled,
    RenderTimedOut,
    evaluate_expression,
    evaluate_foreach,
    evaluate_until,
    evaluate_when,
    expand_foreach,
    expand_loop,
    render_check,
    render_command,
    render_rollback,
    render_text,
)

__all__ = [
    "INSTANCE_FIELDS",
    "MAX_FANOUT",
    "MAX_STEPS",
    "AgentDef",
    "CompiledWorkflow",
    "ConcreteStep",
    "EvaluationLimit",
    "InputDecl",
    "LoopDef",
    "RenderCancelled",
    "RenderContext",
    "RenderTimedOut",
    "RenderedCommand",
    "RetryPolicy",
    "Spec",
    "SpecErrors",
    "StepSpec",
    "coerce",
    "compile_file",
    "compile_workflow",
    "concrete_id",
    "evaluate_expression",
    "executable_warnings",
    "evaluate_foreach",
    "evaluate_until",
    "evaluate_when",
    "expand_foreach",
    "expand_loop",
    "format_path",
    "instance_key",
    "load_spec",
    "loop_child_id",
    "matrix_id_value",
    "parse_duration",
    "parse_params",
    "parse_spec",
    "paused_gc",
    "render_command",
    "render_check",
    "render_rollback",
    "render_text",
    "resolve_params",
    "spec_hash_of",
]
