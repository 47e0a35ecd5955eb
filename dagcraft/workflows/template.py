"""Templating: Jinja2 ``SandboxedEnvironment`` with ``${{ … }}`` delimiters and ``StrictUndefined``.

Guarantees:
- an undefined name or attribute is an error, never an empty string;
- in a shell string (``run: "…"``) every ``${{ … }}`` value is passed through ``shlex.quote``,
  so a parameter can never inject shell syntax — it reaches the command as one literal word;
- an argv item (``run: [...]``, agent ``command``) is rendered to exactly one argument, never split;
- Jinja statements/comments (``{% %}``, ``{# #}``) are disabled, so shell text such as
  ``${#arr[@]}`` or ``{%`` passes through untouched.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
from collections.abc import Mapping
from typing import Any

from jinja2 import StrictUndefined, TemplateError, Undefined, nodes
from jinja2.sandbox import SandboxedEnvironment

from dagcraft.errors import SpecError
from dagcraft.workflows.spec import (
    CompiledWorkflow,
    ConcreteStep,
    RenderContext,
    RenderedCommand,
)

MAX_FANOUT = 1000  # most instances one matrix/foreach step may expand to
STATUS_FUNCTIONS = ("success", "failure", "always", "cancelled")
_SINGLE_EXPR = re.compile(r"^\s*\$\{\{(?P<expr>.*)\}\}\s*$", re.S)


def to_text(value: Any) -> str:
    """How a value appears in rendered text: str as-is, bools lower-case, None empty, JSON for containers."""
    if isinstance(value, Undefined):
        str(value)  # raises the StrictUndefined error with its hint
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return str(value)
    try:
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    except TypeError:
        return str(value)


class _Env(SandboxedEnvironment):
    """Mapping keys win over methods: ``outputs.items`` is the output named ``items``, not dict.items."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, Mapping) and isinstance(attribute, str) and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)


def _make_env(shell: bool) -> SandboxedEnvironment:
    return _Env(
        variable_start_string="${{",
        variable_end_string="}}",
        # NUL-delimited, i.e. unreachable: blocks and comments would collide with shell syntax.
        block_start_string="\x00{%",
        block_end_string="%}\x00",
        comment_start_string="\x00{#",
        comment_end_string="#}\x00",
        undefined=StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        finalize=(lambda v: shlex.quote(to_text(v))) if shell else to_text,
    )


PLAIN_ENV = _make_env(shell=False)
SHELL_ENV = _make_env(shell=True)


@functools.lru_cache(maxsize=1024)
def _compiled(shell: bool, source: str):
    return (SHELL_ENV if shell else PLAIN_ENV).from_string(source)


@functools.lru_cache(maxsize=1024)
def _compiled_expr(source: str):
    return PLAIN_ENV.compile_expression(source, undefined_to_none=False)


def check_syntax(source: str, *, expression: bool = False) -> None:
    """Raise TemplateError if ``source`` does not compile (syntax, unknown filter/test)."""
    if expression:
        _compiled_expr(source)
    else:
        _compiled(False, source)


def render_text(source: str, variables: dict[str, Any], *, shell: bool = False) -> str:
    """Render a template string. TemplateError/undefined errors propagate (callers add context)."""
    if "${{" not in source:
        return source
    return _compiled(shell, source).render(variables)


def split_expression(raw: str) -> str | None:
    """The inner expression if ``raw`` is exactly one ``${{ expr }}``, else None."""
    m = _SINGLE_EXPR.match(raw)
    if m and "${{" not in m.group("expr") and "}}" not in m.group("expr"):
        return m.group("expr").strip()
    return None


def evaluate_expression(raw: str, variables: dict[str, Any], *, bare_is_expression: bool = False) -> Any:
    """Evaluate to a native value: ``${{ expr }}`` alone gives the expression's value (a list stays
    a list); other text is rendered to a string. With ``bare_is_expression`` text without
    ``${{`` is itself an expression (``when: success() and params.x``)."""
    expr = split_expression(raw)
    if expr is None and bare_is_expression and "${{" not in raw:
        expr = raw.strip()
    if expr is None:
        return render_text(raw, variables)
    value = _compiled_expr(expr)(**variables)
    if isinstance(value, Undefined):
        str(value)  # raise with the hint naming what was undefined
    return value


# ----------------------------------------------------------------------------- static analysis


def template_refs(source: str, *, expression: bool = False) -> list[tuple[str, list[Any]]]:
    """Every variable reference as ``(root name, [attr/const-key chain])``; ``None`` in the chain
    marks a dynamic subscript. ``steps.plan.outputs['x']`` → ``("steps", ["plan", "outputs", "x"])``."""
    env = PLAIN_ENV
    if expression:
        tree: nodes.Node = env.parse("${{ " + source + " }}")
    else:
        tree = env.parse(source)
    out: list[tuple[str, list[Any]]] = []
    _walk(tree, out)
    return out


def _walk(node: nodes.Node, out: list[tuple[str, list[Any]]]) -> None:
    if isinstance(node, (nodes.Getattr, nodes.Getitem)):
        chain: list[Any] = []
        cur: nodes.Node = node
        while isinstance(cur, (nodes.Getattr, nodes.Getitem)):
            if isinstance(cur, nodes.Getattr):
                chain.append(cur.attr)
            else:
                chain.append(cur.arg.value if isinstance(cur.arg, nodes.Const) else None)
                _walk(cur.arg, out)
            cur = cur.node
        chain.reverse()
        if isinstance(cur, nodes.Name):
            out.append((cur.name, chain))
        else:
            _walk(cur, out)
        return
    if isinstance(node, nodes.Name):
        out.append((node.name, []))
        return
    for child in node.iter_child_nodes():
        _walk(child, out)


# ----------------------------------------------------------------------------- run time


def _variables(wf: CompiledWorkflow | None, step: ConcreteStep, ctx: RenderContext) -> dict[str, Any]:
    run = dict(ctx.run)
    params = dict(ctx.params)
    if wf is not None:
        run.setdefault("name", wf.name)
        if wf.spec_dir is not None:
            run.setdefault("spec_dir", wf.spec_dir)
        params = {**wf.params, **params}
    # The step's own matrix values and item always win: they are what makes this instance itself.
    matrix = {**ctx.matrix, **step.matrix}
    item = step.item if step.item is not None else ctx.item
    return {
        "params": params,
        "run": run,
        "steps": ctx.steps,
        "matrix": matrix,
        "item": item,
        "env": dict(ctx.env),
    }


def _fail(step: ConcreteStep, field: str, exc: Exception) -> SpecError:
    msg = getattr(exc, "message", None) or str(exc)
    return SpecError(f"step {step.id!r}: {field}: {msg}")


def _render_cmd(cmd: list[str] | str, variables: dict[str, Any], step: ConcreteStep, field: str) -> tuple[list[str], bool]:
    try:
        if isinstance(cmd, list):
            return [render_text(a, variables) for a in cmd], False
        return ["sh", "-c", render_text(cmd, variables, shell=True)], True
    except (TemplateError, TypeError, ValueError) as exc:
        raise _fail(step, field, exc) from None


def _render_env(env: dict[str, str], variables: dict[str, Any], step: ConcreteStep, field: str) -> dict[str, str]:
    out = {}
    for k, v in env.items():
        try:
            out[k] = render_text(v, variables)
        except (TemplateError, TypeError, ValueError) as exc:
            raise _fail(step, f"{field}.{k}", exc) from None
    return out


def render_command(wf: CompiledWorkflow, step: ConcreteStep, ctx: RenderContext) -> RenderedCommand:
    """Render a step's command for exec.

    - agent step: the agent's ``command`` argv, each item rendered with the extra variable
      ``prompt`` (the rendered step prompt) — one item stays one argument;
    - ``run`` list: each item rendered, never split, no shell;
    - ``run`` string: ``["sh", "-c", rendered]`` with every ``${{ }}`` value shell-quoted.
    ``env`` is the agent's env overlaid by the step's, rendered (no DAGCRAFT_* variables: the
    engine adds those). Raises SpecError naming the step and field if a template fails.
    """
    variables = _variables(wf, step, ctx)
    workdir = None
    if step.workdir:
        try:
            workdir = render_text(step.workdir, variables)
        except (TemplateError, TypeError, ValueError) as exc:
            raise _fail(step, "workdir", exc) from None
    if step.agent is not None:
        agent = wf.agents.get(step.agent)
        if agent is None:
            raise SpecError(f"step {step.id!r}: unknown agent {step.agent!r}")
        try:
            prompt = render_text(step.prompt or "", variables)
        except (TemplateError, TypeError, ValueError) as exc:
            raise _fail(step, "prompt", exc) from None
        argv, _ = _render_cmd(list(agent.command), {**variables, "prompt": prompt}, step, f"agents.{step.agent}.command")
        env = _render_env(agent.env, variables, step, f"agents.{step.agent}.env")
        env.update(_render_env(step.env, variables, step, "env"))
        return RenderedCommand(argv=argv, shell=False, env=env, adapter=agent.adapter, workdir=workdir)
    if step.run is None:
        raise SpecError(f"step {step.id!r}: nothing to run")
    argv, shell = _render_cmd(step.run, variables, step, "run")
    env = _render_env(step.env, variables, step, "env")
    return RenderedCommand(argv=argv, shell=shell, env=env, adapter="generic", workdir=workdir)


def render_rollback(wf: CompiledWorkflow, step: ConcreteStep, ctx: RenderContext) -> RenderedCommand | None:
    """The step's compensation command rendered like ``run`` (None if it has none)."""
    if step.rollback is None:
        return None
    variables = _variables(wf, step, ctx)
    argv, shell = _render_cmd(step.rollback, variables, step, "rollback")
    env = {}
    if step.agent is not None and step.agent in wf.agents:
        env = _render_env(wf.agents[step.agent].env, variables, step, f"agents.{step.agent}.env")
    env.update(_render_env(step.env, variables, step, "env"))
    return RenderedCommand(argv=argv, shell=shell, env=env, adapter="generic")


@functools.lru_cache(maxsize=4096)
def uses_status_function(raw: str) -> bool:
    """True if a ``when`` expression calls success()/failure()/always()/cancelled()."""
    expr = split_expression(raw)
    if expr is None and "${{" not in raw:
        expr = raw.strip()
    refs = template_refs(expr, expression=True) if expr is not None else template_refs(raw)
    return any(name in STATUS_FUNCTIONS and not chain for name, chain in refs)


def evaluate_when(step: ConcreteStep, ctx: RenderContext, needs_status: dict[str, str]) -> bool:
    """Whether the step should run, given its needs' statuses.

    ``needs_status`` maps need ids to ``succeeded|failed|skipped|cancelled`` (the engine may also
    pass every ancestor; the functions look at whatever is passed). As in GitHub Actions:
    ``success()`` — every need succeeded (a skipped need skips its dependants);
    ``failure()`` — some need failed; ``cancelled()`` — some need was cancelled (or
    ``run.status == "cancelled"``); ``always()`` — true. A ``when`` that calls none of these is
    implicitly ``success() and (when)``. A string result of ``false``/``0``/``no``/empty is false.
    """
    statuses = list(needs_status.values())
    run_cancelled = ctx.run.get("status") == "cancelled"
    funcs = {
        "success": lambda: all(s == "succeeded" for s in statuses) and not run_cancelled,
        "failure": lambda: any(s == "failed" for s in statuses),
        "always": lambda: True,
        "cancelled": lambda: run_cancelled or any(s == "cancelled" for s in statuses),
    }
    raw = step.when or "${{ success() }}"
    variables = {**_variables(None, step, ctx), **funcs}
    try:
        value = evaluate_expression(raw, variables, bare_is_expression=True)
        implicit = not uses_status_function(raw)
    except (TemplateError, TypeError, ValueError) as exc:
        raise _fail(step, "when", exc) from None
    result = _truthy(value)
    if implicit:
        result = result and funcs["success"]()
    return result


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("", "false", "0", "no", "off", "none", "null")
    return bool(value)


def evaluate_foreach(step: ConcreteStep, ctx: RenderContext) -> list[Any]:
    """The items a foreach step fans out over. A string result is parsed as JSON (outputs written
    as ``key=value`` arrive as strings). SpecError if not a list or longer than MAX_FANOUT."""
    if step.foreach is None:
        raise SpecError(f"step {step.id!r}: not a foreach step")
    try:
        value = evaluate_expression(step.foreach, _variables(None, step, ctx))
    except (TemplateError, TypeError, ValueError) as exc:
        raise _fail(step, "foreach", exc) from None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            pass
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise SpecError(f"step {step.id!r}: foreach: expected a list, got {type(value).__name__} {to_text(value)[:60]!r}")
    if len(value) > MAX_FANOUT:
        raise SpecError(f"step {step.id!r}: foreach: {len(value)} items exceed the fan-out limit of {MAX_FANOUT}")
    return value


def expand_foreach(step: ConcreteStep, items: list[Any]) -> list[ConcreteStep]:
    """Children ``f"{step.id}[{i}]"`` with ``item`` set, ``foreach=None`` and the parent's needs."""
    if len(items) > MAX_FANOUT:
        raise SpecError(f"step {step.id!r}: foreach: {len(items)} items exceed the fan-out limit of {MAX_FANOUT}")
    return [
        step.model_copy(update={"id": f"{step.id}[{i}]", "foreach": None, "item": it, "needs": list(step.needs)}, deep=True)
        for i, it in enumerate(items)
    ]
