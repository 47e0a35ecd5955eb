"""dagcraft.workflows: YAML spec → validated pydantic models → compiled step DAG; templating.

Public API: the names below (the spec format is documented in docs/spec.md). This package
imports nothing from primitives, tracing or orchestrator.

The names are imported on first use (PEP 562): a reader of compiled workflows (``status``,
a worker) loads the models of ``spec`` without the YAML loader, the compiler or jinja2.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dagcraft._lazy import lazy_names

if TYPE_CHECKING:
    from dagcraft.workflows.compile import (
        INSTANCE_FIELDS,
        MAX_STEPS,
        compile_file,
        compile_workflow,
        concrete_id,
        executable_warnings,
        matrix_id_value,
        spec_hash_of,
    )
    from dagcraft.workflows.gcpause import paused_gc
    from dagcraft.workflows.loader import SpecErrors, format_path, load_spec, parse_spec
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
        instance_key,
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
        is_plain_success,
        render_check,
        render_command,
        render_rollback,
        render_text,
        succeeded,
    )

#: public name -> the module that defines it
_HOME = {
    "INSTANCE_FIELDS": "compile",
    "MAX_FANOUT": "template",
    "MAX_STEPS": "compile",
    "AgentDef": "spec",
    "CompiledWorkflow": "spec",
    "ConcreteStep": "spec",
    "EvaluationLimit": "template",
    "InputDecl": "spec",
    "LoopDef": "spec",
    "RenderCancelled": "template",
    "RenderContext": "spec",
    "RenderTimedOut": "template",
    "RenderedCommand": "spec",
    "RetryPolicy": "spec",
    "Spec": "spec",
    "SpecErrors": "loader",
    "StepSpec": "spec",
    "coerce": "params",
    "compile_file": "compile",
    "compile_workflow": "compile",
    "concrete_id": "compile",
    "evaluate_expression": "template",
    "executable_warnings": "compile",
    "evaluate_foreach": "template",
    "evaluate_until": "template",
    "evaluate_when": "template",
    "is_plain_success": "template",
    "succeeded": "template",
    "expand_foreach": "template",
    "expand_loop": "template",
    "format_path": "loader",
    "instance_key": "spec",
    "load_spec": "loader",
    "loop_child_id": "spec",
    "matrix_id_value": "compile",
    "parse_duration": "spec",
    "parse_params": "params",
    "parse_spec": "loader",
    "paused_gc": "gcpause",
    "render_command": "template",
    "render_check": "template",
    "render_rollback": "template",
    "render_text": "template",
    "resolve_params": "params",
    "spec_hash_of": "compile",
}

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
    "is_plain_success",
    "succeeded",
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


__getattr__, __dir__ = lazy_names(__name__, _HOME)
