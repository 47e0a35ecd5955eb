"""Templating: Jinja2 ``ImmutableSandboxedEnvironment`` with ``${{ … }}`` delimiters and ``StrictUndefined``.

Guarantees:
- an undefined name or attribute is an error, never an empty string, said in plain words
  (``env.X is not set in the worker's environment``, ``steps.p.outputs.x: step 'p' did not
  write output 'x'``; see :func:`explain_undefined`);
- in a shell string (``run: "…"``, ``rollback: "…"``) no template value is ever part of the
  script text: each ``${{ … }}`` value is passed to bash in an environment variable
  (``DAGCRAFT_V_1`` …) and the script refers to it in the form right for the lexical context
  (see :mod:`dagcraft.workflows.shell`); contexts where no reference can be made safe are
  refused when the spec is compiled (:func:`check_shell`);
- an argv item (``run: [...]``, agent ``command``) is rendered to exactly one argument, never split;
- Jinja statements/comments (``{% %}``, ``{# #}``) are disabled, so shell text such as
  ``${#arr[@]}`` or ``{%`` passes through untouched;
- evaluation is bounded: no constant folding of arithmetic at compile time; integer results
  of at most ``MAX_INT_BITS`` bits, strings and lists of at most ``MAX_OUTPUT`` characters/items,
  ``MAX_TOTAL`` characters produced per evaluation, at most ``MAX_EVAL_S`` seconds (each an
  :class:`EvaluationLimit`, exit 2). A step's timeout and cancel reach rendering
  (:func:`bounded`): :class:`RenderTimedOut` / :class:`RenderCancelled`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import re
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from dagcraft.errors import Interrupted, SpecError, TimedOut

if TYPE_CHECKING:
    from jinja2 import nodes
from dagcraft.workflows import shell as _shell
from dagcraft.workflows.spec import (
    CompiledWorkflow,
    ConcreteStep,
    RenderContext,
    RenderedCommand,
    loop_child_id,
)

MAX_FANOUT = 1000  # most instances one matrix/foreach step may expand to
STATUS_FUNCTIONS = ("success", "failure", "always", "cancelled")
_SINGLE_EXPR = re.compile(r"^\s*\$\{\{(?P<expr>.*)\}\}\s*$", re.S)

MAX_OUTPUT = 1 << 20  # characters of one rendered template / one value; items of one list
MAX_TOTAL = 32 << 20  # characters produced by one evaluation, all intermediate results included
MAX_INT_BITS = 4096  # an integer result larger than this is refused (2**4096 has 1234 digits)
MAX_INT_ARG = 100_000  # an integer argument of a call or filter (widths, counts, ranges)
MAX_EVAL_S = 2.0  # wall time of one evaluation
MAX_SHELL_VALUE = 100_000  # bytes of one value passed to a shell script (an env var; the OS caps them)

#: what evaluating a template may raise for a bad value (callers add context); with Jinja2's
#: TemplateError for a bad template: :func:`eval_errors`
PLAIN_EVAL_ERRORS: tuple[type[BaseException], ...] = (
    TypeError, ValueError, ArithmeticError, LookupError, AttributeError, RecursionError,
)


def _engine() -> ModuleType:
    """The Jinja2 side (:mod:`dagcraft.workflows.engine`), imported on first use."""
    from dagcraft.workflows import engine

    return engine


def eval_errors() -> tuple[type[BaseException], ...]:
    """What evaluating a template may raise (callers add context): :data:`PLAIN_EVAL_ERRORS`,
    and Jinja2's TemplateError once Jinja2 is loaded (before, nothing can raise one)."""
    jinja = sys.modules.get("jinja2")
    return PLAIN_EVAL_ERRORS if jinja is None else (jinja.TemplateError, *PLAIN_EVAL_ERRORS)


class EvaluationLimit(SpecError):
    """A template evaluation went past one of the bounds (size, integer size, time)."""


class RenderTimedOut(TimedOut):
    """Rendering ran past the step's timeout."""


class RenderCancelled(Interrupted):
    """Rendering was stopped by the step's cancel event."""


@dataclass
class _Budget:
    deadline: float  # monotonic; past it: EvaluationLimit
    step_deadline: float | None  # monotonic; past it: RenderTimedOut
    cancel: threading.Event | None
    produced: int = 0

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise RenderCancelled("rendering cancelled")
        now = time.monotonic()
        if self.step_deadline is not None and now > self.step_deadline:
            raise RenderTimedOut("timed out while rendering the step's templates")
        if now > self.deadline:
            raise EvaluationLimit(f"evaluation took longer than {MAX_EVAL_S:g}s")

    def charge(self, value: Any) -> Any:
        if isinstance(value, (str, list, tuple, dict)):
            if len(value) > MAX_OUTPUT:
                raise EvaluationLimit(f"a value of {len(value)} characters/items exceeds the limit of {MAX_OUTPUT}")
            self.produced += len(value)
            if self.produced > MAX_TOTAL:
                raise EvaluationLimit(f"evaluation produced more than {MAX_TOTAL} characters")
        elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
            raise EvaluationLimit(f"an integer of more than {MAX_INT_BITS} bits")
        self.check()
        return value


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("dagcraft_template_budget", default=None)


@contextlib.contextmanager
def bounded(timeout_s: float | None = None, cancel: threading.Event | None = None) -> Iterator[None]:
    """Evaluations inside share one budget: ``MAX_EVAL_S`` and the size limits, plus (at run
    time) the step's remaining ``timeout_s`` and its ``cancel`` event, checked at every call,
    filter, attribute access and operator. Nested uses keep the outermost budget."""
    if _BUDGET.get() is not None:
        yield
        return
    now = time.monotonic()
    token = _BUDGET.set(_Budget(now + MAX_EVAL_S, None if timeout_s is None else now + timeout_s, cancel))
    try:
        _budget().check()
        yield
    finally:
        _BUDGET.reset(token)


def _budget() -> _Budget:
    b = _BUDGET.get()
    if b is None:  # outside `bounded` (e.g. constant folding while compiling): a fresh budget
        b = _Budget(time.monotonic() + MAX_EVAL_S, None, None)
    return b


def to_text(value: Any) -> str:
    """How a value appears in rendered text: str as-is, bools lower-case, None empty, JSON for containers."""
    jinja = sys.modules.get("jinja2")  # without Jinja2 loaded, nothing is an Undefined
    if jinja is not None and isinstance(value, jinja.Undefined):
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


_PCT_SPEC = re.compile(r"%[-#0 +]*(\*|\d*)(?:\.(\*|\d*))?")
_BRACE_SPEC = re.compile(r"\{[^{}]*\}")


def _check_format(fmt: str) -> None:
    """Refuse format widths/precisions that would build huge strings (``'%999999999d'``)."""
    for m in _PCT_SPEC.finditer(fmt):
        for g in m.groups():
            if g == "*" or (g and len(g) > 5) or (g and int(g) > MAX_INT_ARG):
                raise EvaluationLimit(f"format width {m.group()!r} is too large")
    for m in _BRACE_SPEC.finditer(fmt):
        spec = m.group().partition(":")[2]
        if any(int(d) > MAX_INT_ARG for d in re.findall(r"\d+", spec)):
            raise EvaluationLimit(f"format width {m.group()!r} is too large")


def _check_args(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_INT_ARG:
            raise EvaluationLimit(f"argument {a if a.bit_length() < 64 else 'of ' + str(a.bit_length()) + ' bits'} "
                                  f"exceeds the limit of {MAX_INT_ARG}")


def _size(v: Any) -> int:
    """Characters ``v`` contributes when rendered (cheap: containers count their items' size)."""
    if isinstance(v, str):
        return len(v)
    if isinstance(v, (list, tuple)):
        return sum(_size(x) for x in v) + len(v)
    if isinstance(v, Mapping):
        return sum(_size(k) + _size(x) for k, x in v.items()) + len(v)
    return 24


def _too_big(what: str, est: int) -> None:
    if est > MAX_OUTPUT:
        raise EvaluationLimit(f"{what} would build about {est} characters (limit {MAX_OUTPUT})")


#: filters and str methods whose result is never much bigger than their inputs
_NON_EXPANDING = {
    "abs", "attr", "batch", "capitalize", "casefold", "count", "d", "default", "dictsort", "e", "endswith",
    "escape", "filesizeformat", "find", "first", "float", "forceescape", "groupby", "index", "int", "isalnum",
    "isalpha", "isdigit", "islower", "isspace", "istitle", "isupper", "items", "join", "keys", "last", "length",
    "list", "lower", "lstrip", "map", "max", "min", "partition", "pprint", "random", "reject", "rejectattr",
    "removeprefix", "removesuffix", "reverse", "rfind", "rindex", "round", "rpartition", "rsplit", "rstrip",
    "safe", "select", "selectattr", "slice", "sort", "split", "splitlines", "startswith", "string", "strip",
    "striptags", "sum", "swapcase", "title", "tojson", "trim", "truncate", "unique", "upper", "urlencode",
    "values", "wordcount", "xmlattr", "center", "ljust", "rjust", "zfill", "get", "format", "format_map",
    "replace", "indent", "expandtabs", "wordwrap",
}


def _precheck(name: str, value: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """Size checks that must happen *before* an expanding operation runs (a single C-level
    call cannot be interrupted, so its result size is estimated from its inputs)."""
    others = [*args, *kwargs.values()]
    if name == "join":
        if isinstance(value, str) and args and isinstance(args[0], (list, tuple)):  # sep.join(items)
            _too_big("join", _size(args[0]) + len(value) * len(args[0]))
        elif isinstance(value, (list, tuple)):  # items | join(sep)
            sep = args[0] if args else kwargs.get("d", "")
            _too_big("join", _size(value) + (len(sep) if isinstance(sep, str) else 0) * len(value))
        return
    if not isinstance(value, str):
        return
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        hits = len(value) + 1 if not args[0] else value.count(args[0])
        _too_big("replace", len(value) + hits * len(args[1]))
    elif name == "indent":
        width = args[0] if args else kwargs.get("width", 4)
        w = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        _too_big("indent", len(value) + (value.count("\n") + 1) * w)
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(size, int):
            _too_big("expandtabs", len(value) + value.count("\t") * size)
    elif name == "wordwrap":
        width = args[0] if args else kwargs.get("width", 79)
        wrap = args[2] if len(args) > 2 else kwargs.get("wrapstring", "\n")
        if isinstance(width, int) and width > 0:
            _too_big("wordwrap", len(value) + (len(value) // width + 1) * (_size(wrap) + 1))
    elif name in ("format", "format_map") or name == "%":
        _check_format(value)
        specs = value.count("%") + value.count("{")
        _too_big("formatting", len(value) + specs * max((_size(a) for a in others), default=0))
    elif name not in _NON_EXPANDING and others:  # e.g. urlize(target=...), translate(table)
        _too_big(name or "the call", len(value) + (len(value) + 1) * max(_size(a) for a in others))


@dataclass(frozen=True)
class ShellPlan:
    """A shell-string template taken apart: the literal ``pieces`` around its ``${{ }}``, the
    ``exprs`` inside them, and where each sits (``slots``)."""

    pieces: tuple[str, ...]
    exprs: tuple[str, ...]
    slots: tuple[_shell.Slot, ...]


def _split(source: str) -> tuple[list[str], list[str], list[tuple[int, int]]]:
    """Literal pieces, expression sources and (start, end) spans of each ``${{ … }}``, as
    Jinja's own lexer sees them (so ``}}`` inside a string literal does not end an expression)."""
    pieces, exprs, spans = [""], [], []
    pos = 0
    cur: list[str] | None = None
    start = 0
    for _, kind, value in _engine().PLAIN_ENV.lexer.tokeniter(source, None):
        if kind == "variable_begin":
            cur, start = [], pos
        elif kind == "variable_end":
            assert cur is not None
            exprs.append("".join(cur))
            spans.append((start, pos + len(value)))
            pieces.append("")
            cur = None
        elif cur is not None:
            cur.append(value)
        else:
            pieces[-1] += value
        pos += len(value)
    return pieces, exprs, spans


@functools.lru_cache(maxsize=1024)
def shell_plan(source: str) -> ShellPlan:
    """Analyse a shell-string template. Raises TemplateError (bad syntax) or
    :class:`~dagcraft.workflows.shell.ShellRefused` (an unsafe context, with its offset)."""
    _engine().compiled(source)  # syntax check first: a bad template is reported as such
    pieces, exprs, spans = _split(source)
    slots = _shell.analyze(pieces, spans) if exprs else []
    for e in exprs:
        _engine().compiled_expr(e)
    return ShellPlan(tuple(pieces), tuple(exprs), tuple(slots))


def check_shell(source: str) -> tuple[str, int] | None:
    """None if every ``${{ }}`` of shell string ``source`` can be referenced safely, else
    ``(why, offset in source)`` of the first that cannot. TemplateError on bad syntax."""
    try:
        shell_plan(source)
    except _shell.ShellRefused as exc:
        return exc.message, exc.offset
    return None


def render_shell(source: str, variables: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """The script to run and the environment variables carrying its template values."""
    plan = shell_plan(source)
    env: dict[str, str] = {}
    out = [plan.pieces[0]]
    with bounded():
        for slot, expr, after in zip(plan.slots, plan.exprs, plan.pieces[1:], strict=True):
            with _explained(expr, variables, expression=True):
                value = _engine().compiled_expr(expr)(**variables)
                text = _budget().charge(to_text(value))
            if "\x00" in text:
                raise ValueError(f"the value of ${{{{{expr}}}}} contains a NUL byte, which cannot be passed to a command")
            if len(text.encode("utf-8", "surrogateescape")) > MAX_SHELL_VALUE:
                raise EvaluationLimit(f"the value of ${{{{{expr}}}}} is longer than {MAX_SHELL_VALUE} bytes")
            name = _shell.var_name(slot.index)
            env[name] = text
            out.append(_shell.reference(slot.context, name))
            out.append(after)
    return "".join(out), env


def check_syntax(source: str, *, expression: bool = False) -> None:
    """Raise TemplateError if ``source`` does not compile (syntax, unknown filter/test)."""
    with bounded():
        if expression:
            _engine().compiled_expr(source)
        else:
            _engine().compiled(source)


def expressions(raw: str, *, expression: bool = False) -> list[str]:
    """The sources of the ``${{ }}`` expressions of ``raw`` (``raw`` itself for an expression)."""
    if expression:
        return [raw]
    return _split(raw)[1]


def check_bounds(expr: str, variables: dict[str, Any]) -> None:
    """Evaluate ``expr`` (whose names are all in ``variables`` or Jinja's globals) now and raise
    :class:`EvaluationLimit` if it exceeds a bound; any other error is left to run time, where
    the expression may never be reached (a ``when`` may skip the step)."""
    try:
        with bounded():
            _engine().compiled_expr(expr)(**variables)
    except EvaluationLimit:
        raise
    except Exception:  # noqa: BLE001 - reported at run time, where it matters
        pass


def render_text(source: str, variables: dict[str, Any]) -> str:
    """Render a template string (bounded, see :func:`bounded`). TemplateError/undefined errors
    and :class:`EvaluationLimit` propagate (callers add context)."""
    if "${{" not in source:
        return source
    with bounded(), _explained(source, variables):
        out: str = _engine().compiled(source).render(variables)
    if len(out) > MAX_OUTPUT:
        raise EvaluationLimit(f"the rendered text is longer than {MAX_OUTPUT} characters")
    return out


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
    with bounded(), _explained(expr, variables, expression=True):
        value = _engine().compiled_expr(expr)(**variables)
        if isinstance(value, _engine().Undefined):
            str(value)  # raise with the hint naming what was undefined
    return value


_UNDEFINED_NAME = re.compile(r"has no (?:attribute|element) (?P<name>.+)$")


@contextlib.contextmanager
def _explained(source: str, variables: dict[str, Any], *, expression: bool = False) -> Iterator[None]:
    """Jinja's UndefinedError re-raised in plain words (:func:`explain_undefined`)."""
    try:
        yield
    except _engine().UndefinedError as exc:
        better = explain_undefined(source, variables, exc.message or str(exc), expression=expression)
        if better is None:
            raise
        raise _engine().UndefinedError(better) from None


def _dotted(name: str, chain: list[Any]) -> str:
    return name + "".join(f".{k}" if isinstance(k, str) else f"[{k}]" for k in chain)


def _missing(name: str, chain: list[Any], variables: dict[str, Any]) -> tuple[int, Any] | None:
    """(index in ``chain`` of the first key that ``variables[name]`` lacks, the value that
    lacks it), or None if the whole chain resolves (or turns dynamic / into a method)."""
    if name not in variables:
        return None
    cur = variables[name]
    for i, key in enumerate(chain):
        if key is None:
            return None
        if isinstance(cur, Mapping) and key in cur:
            cur = cur[key]
        elif isinstance(cur, (list, tuple)) and isinstance(key, int) and -len(cur) <= key < len(cur):
            cur = cur[key]
        elif isinstance(key, str) and hasattr(cur, key):
            return None  # a method (``items``) or attribute: not what went undefined
        else:
            return i, cur
    return None


def _words(name: str, chain: list[Any], i: int, holder: Any) -> str:
    path, key = _dotted(name, chain[: i + 1]), chain[i]
    if name == "env" and i == 0:
        return f"env.{key} is not set in the worker's environment"
    if name == "params" and i == 0:
        return f"params.{key} has no value (it was not given and has no default)"
    if name == "steps":
        ref = chain[0]
        if i == 0:
            return f"steps.{ref}: step {ref!r} has no result here (it did not run)"
        if i == 2 and chain[1] == "outputs":
            return f"{path}: step {ref!r} did not write output {key!r}"
        if i == 2 and chain[1] == "artifacts":
            return f"{path}: step {ref!r} has no artifact {key!r}"
    if name in ("matrix", "run") and i == 0:
        return f"{path} is not set"
    owner = _dotted(name, chain[:i])
    if isinstance(holder, Mapping):
        return f"{path}: {owner} has no key {key!r}"
    if isinstance(holder, (list, tuple)):
        return f"{path}: {owner} has {len(holder)} items, no item {key!r}"
    return f"{path}: {owner} is {type(holder).__name__ if holder is not None else 'empty'}, it has no {key!r}"


def explain_undefined(source: str, variables: dict[str, Any], message: str, *,
                      expression: bool = False) -> str | None:
    """Jinja's ``'dict object' has no attribute 'X'`` for ``source`` in words naming the
    reference (``env.X is not set in the worker's environment``), or None when no reference
    of ``source`` is missing from ``variables``. The reference whose missing key is the one
    Jinja named wins (a missing one under ``| default`` never raised)."""
    m = _UNDEFINED_NAME.search(message)
    named = m.group("name") if m else None
    try:
        refs = template_refs(source, expression=expression)
    except (_engine().TemplateError, EvaluationLimit):
        return None
    first: str | None = None
    for name, chain in refs:
        got = _missing(name, chain, variables)
        if got is None:
            continue
        words = _words(name, chain, got[0], got[1])
        if named is not None and repr(chain[got[0]]) == named:
            return words
        first = first or words
    return first


# ----------------------------------------------------------------------------- static analysis


def template_refs(source: str, *, expression: bool = False) -> list[tuple[str, list[Any]]]:
    """Every variable reference as ``(root name, [attr/const-key chain])``; ``None`` in the chain
    marks a dynamic subscript. ``steps.plan.outputs['x']`` → ``("steps", ["plan", "outputs", "x"])``."""
    env = _engine().PLAIN_ENV
    out: list[tuple[str, list[Any]]] = []
    try:
        tree: nodes.Node = env.parse("${{ " + source + " }}" if expression else source)
        _walk(tree, out)
    except RecursionError:
        raise EvaluationLimit("the template is nested too deeply") from None
    return out


def _walk(node: nodes.Node, out: list[tuple[str, list[Any]]]) -> None:
    jn = _engine().nodes
    if isinstance(node, (jn.Getattr, jn.Getitem)):
        chain: list[Any] = []
        cur: nodes.Node = node
        while isinstance(cur, (jn.Getattr, jn.Getitem)):
            if isinstance(cur, jn.Getattr):
                chain.append(cur.attr)
            else:
                chain.append(cur.arg.value if isinstance(cur.arg, jn.Const) else None)
                _walk(cur.arg, out)
            cur = cur.node
        chain.reverse()
        if isinstance(cur, jn.Name):
            out.append((cur.name, chain))
        else:
            _walk(cur, out)
        return
    if isinstance(node, jn.Name):
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
    variables = {
        "params": params,
        "run": run,
        "steps": ctx.steps,
        "matrix": matrix,
        "item": item,
        "env": dict(ctx.env),
    }
    if ctx.attempt is not None:  # only an attempt's own command, prompt, env and check
        variables["attempt"] = ctx.attempt
    if ctx.loop is not None:  # only a loop's body steps (and its `until`)
        loop = dict(ctx.loop)
        if loop.get("previous") is None:
            # iteration 1 has no previous one: undefined, and so is anything read through it, so
            # `loop.previous.steps.fix.outputs.x | default('none')` works in every iteration
            loop["previous"] = _engine().ChainableUndefined(name="loop.previous")
        variables["loop"] = loop
    return variables


def _caught() -> tuple[type[BaseException], ...]:
    """What a render step turns into a SpecError naming the step and field."""
    return (*eval_errors(), EvaluationLimit)


def _fail(step: ConcreteStep, field: str, exc: BaseException) -> SpecError:
    msg = getattr(exc, "message", None) or str(exc)
    return SpecError(f"step {step.id!r}: {field}: {msg}")


#: how a shell string runs: bash, so the script is analysed as the shell that runs it reads it
SHELL_ARGV = ("bash", "-c")


def _render_cmd(cmd: list[str] | str, variables: dict[str, Any], step: ConcreteStep,
                field: str) -> tuple[list[str], bool, dict[str, str]]:
    """argv, whether it is a shell script, and the env carrying the script's template values."""
    try:
        if isinstance(cmd, list):
            return [render_text(a, variables) for a in cmd], False, {}
        script, values = render_shell(cmd, variables)
        return [*SHELL_ARGV, script], True, values
    except _shell.ShellRefused as exc:
        raise SpecError(f"step {step.id!r}: {field}: {exc.message}") from None
    except _caught() as exc:
        raise _fail(step, field, exc) from None


def _render_env(env: dict[str, str], variables: dict[str, Any], step: ConcreteStep, field: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in env.items():
        try:
            out[k] = render_text(v, variables)
        except _caught() as exc:
            raise _fail(step, f"{field}.{k}", exc) from None
    return out


def render_command(wf: CompiledWorkflow, step: ConcreteStep, ctx: RenderContext, *,
                   timeout_s: float | None = None, cancel: threading.Event | None = None) -> RenderedCommand:
    """Render a step's command for exec.

    - agent step: the agent's ``command`` argv, each item rendered with the extra variable
      ``prompt`` (the rendered step prompt) — one item stays one argument;
    - ``run`` list: each item rendered, never split, no shell;
    - ``run`` string: ``["bash", "-c", script]`` where each ``${{ }}`` became a reference to a
      ``DAGCRAFT_V_<n>`` variable of ``env`` holding its value (the value is never script text).
    ``env`` is the agent's env overlaid by the step's, rendered, then the template values (no
    other DAGCRAFT_* variables: the engine adds those). Raises SpecError naming the step and
    field if a template fails or exceeds a bound; RenderTimedOut past ``timeout_s`` seconds,
    RenderCancelled once ``cancel`` is set.
    """
    with bounded(timeout_s, cancel):
        return _render_command(wf, step, ctx)


def _render_command(wf: CompiledWorkflow, step: ConcreteStep, ctx: RenderContext) -> RenderedCommand:
    variables = _variables(wf, step, ctx)
    workdir = None
    if step.workdir:
        try:
            workdir = render_text(step.workdir, variables)
        except _caught() as exc:
            raise _fail(step, "workdir", exc) from None
    if step.agent is not None:
        agent = wf.agents.get(step.agent)
        if agent is None:
            raise SpecError(f"step {step.id!r}: unknown agent {step.agent!r}")
        try:
            prompt = render_text(step.prompt or "", variables)
        except _caught() as exc:
            raise _fail(step, "prompt", exc) from None
        argv, _, _ = _render_cmd(list(agent.command), {**variables, "prompt": prompt}, step,
                                 f"agents.{step.agent}.command")
        env = _render_env(agent.env, variables, step, f"agents.{step.agent}.env")
        env.update(_render_env(step.env, variables, step, "env"))
        return RenderedCommand(argv=argv, shell=False, env=env, adapter=agent.adapter, workdir=workdir)
    if step.run is None:
        raise SpecError(f"step {step.id!r}: nothing to run")
    argv, shell, values = _render_cmd(step.run, variables, step, "run")
    env = _render_env(step.env, variables, step, "env")
    env.update(values)  # last: a step's env cannot shadow a template value
    return RenderedCommand(argv=argv, shell=shell, env=env, adapter="generic", workdir=workdir)


def render_rollback(wf: CompiledWorkflow, step: ConcreteStep, ctx: RenderContext, *,
                    timeout_s: float | None = None,
                    cancel: threading.Event | None = None) -> RenderedCommand | None:
    """The step's compensation command rendered like ``run`` (None if it has none)."""
    if step.rollback is None:
        return None
    with bounded(timeout_s, cancel):
        variables = _variables(wf, step, ctx)
        argv, shell, values = _render_cmd(step.rollback, variables, step, "rollback")
        env: dict[str, str] = {}
        if step.agent is not None and step.agent in wf.agents:
            env = _render_env(wf.agents[step.agent].env, variables, step, f"agents.{step.agent}.env")
        env.update(_render_env(step.env, variables, step, "env"))
        env.update(values)
    return RenderedCommand(argv=argv, shell=shell, env=env, adapter="generic")


def render_check(wf: CompiledWorkflow, step: ConcreteStep, ctx: RenderContext, *,
                 timeout_s: float | None = None,
                 cancel: threading.Event | None = None) -> RenderedCommand | None:
    """The step's ``check`` rendered like ``run`` (a list is argv, a string a bash script whose
    template values are env references), with the step's env; None if it has none."""
    if step.check is None:
        return None
    with bounded(timeout_s, cancel):
        variables = _variables(wf, step, ctx)
        argv, shell, values = _render_cmd(step.check, variables, step, "check")
        env = _render_env(step.env, variables, step, "env")
        env.update(values)  # last: a step's env cannot shadow a template value
    return RenderedCommand(argv=argv, shell=shell, env=env, adapter="generic")


@functools.lru_cache(maxsize=4096)
def uses_status_function(raw: str) -> bool:
    """True if a ``when`` expression calls success()/failure()/always()/cancelled()."""
    expr = split_expression(raw)
    if expr is None and "${{" not in raw:
        expr = raw.strip()
    refs = template_refs(expr, expression=True) if expr is not None else template_refs(raw)
    return any(name in STATUS_FUNCTIONS and not chain for name, chain in refs)


def is_plain_success(raw: str) -> bool:
    """Whether a ``when`` is ``${{ success() }}`` alone (the default), whatever its spacing."""
    return raw.replace(" ", "") == "${{success()}}"


def succeeded(needs_status: Mapping[str, str], run_cancelled: bool = False) -> bool:
    """``success()``: every need succeeded (a skipped need skips its dependants) and the run
    is not cancelled. What a plain ``success()`` condition evaluates to, with no context."""
    return all(s == "succeeded" for s in needs_status.values()) and not run_cancelled


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
        "success": lambda: succeeded(needs_status, run_cancelled),
        "failure": lambda: any(s == "failed" for s in statuses),
        "always": lambda: True,
        "cancelled": lambda: run_cancelled or any(s == "cancelled" for s in statuses),
    }
    raw = step.when or "${{ success() }}"
    if is_plain_success(raw):  # nearly every step: no expression to evaluate
        return funcs["success"]()
    variables = {**_variables(None, step, ctx), **funcs}
    try:
        value = evaluate_expression(raw, variables, bare_is_expression=True)
        implicit = not uses_status_function(raw)
    except _caught() as exc:
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
    except _caught() as exc:
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


def evaluate_until(step: ConcreteStep, ctx: RenderContext) -> bool:
    """Whether loop ``step`` is done after the iteration ``ctx`` describes (its ``steps`` are
    that iteration's body results). A string result of ``false``/``0``/``no``/empty is false.
    SpecError naming the step if it cannot be evaluated."""
    if step.loop is None:
        raise SpecError(f"step {step.id!r}: not a loop step")
    try:
        value = evaluate_expression(step.loop.until, _variables(None, step, ctx), bare_is_expression=True)
    except _caught() as exc:
        raise _fail(step, "until", exc) from None
    return _truthy(value)


def expand_loop(step: ConcreteStep, iteration: int) -> list[ConcreteStep]:
    """The body steps of iteration ``iteration`` of loop ``step``, as concrete steps
    ``<loop>#<k>.<body id>`` (:func:`loop_child_id`): needs and inputs between body steps point
    at the same iteration's instances; every body step also needs the loop's own needs (so it
    sees what the loop sees)."""
    if step.loop is None:
        raise SpecError(f"step {step.id!r}: not a loop step")
    body = {b.id for b in step.loop.body}

    def here(sid: str) -> str:
        return loop_child_id(step.id, iteration, sid) if sid in body else sid

    out = []
    for b in step.loop.body:
        needs = [here(n) for n in b.needs] + [n for n in step.needs if n not in b.needs]
        inputs = [i.model_copy(update={"step": here(i.step)}) for i in b.inputs]
        out.append(b.model_copy(update={"id": here(b.id), "needs": needs, "inputs": inputs, "iteration": iteration},
                                deep=True))
    return out
