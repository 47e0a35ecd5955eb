"""The Jinja2 side of templating: the sandboxed environment with ``${{ … }}`` delimiters,
``StrictUndefined`` and every operation bounded (see :mod:`dagcraft.workflows.template`, which
holds the bounds and the API). Imported by :mod:`~dagcraft.workflows.template` only when a
string holding ``${{`` is rendered or checked: a worker whose steps have no templates never
loads Jinja2 (~40 ms and ~2.5 MiB per process)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from jinja2 import ChainableUndefined, StrictUndefined, TemplateError, Undefined, UndefinedError, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import _PassArg

from dagcraft.workflows.template import (
    MAX_INT_BITS,
    MAX_OUTPUT,
    EvaluationLimit,
    _budget,
    _check_args,
    _precheck,
    _too_big,
    to_text,
)

__all__ = ["PLAIN_ENV", "ChainableUndefined", "TemplateError", "Undefined", "UndefinedError", "compiled",
           "compiled_expr", "nodes"]


def _bounded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` with the budget checked and its arguments and result size bounded."""
    pass_arg = _PassArg.from_obj(func)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        b = _budget()
        b.check()
        _check_args(args, kwargs)
        k = 1 if pass_arg is not None else 0  # skip the injected context/environment
        if len(args) > k:
            _precheck(name, args[k], args[k + 1:], kwargs)
        return b.charge(func(*args, **kwargs))

    if pass_arg is not None:
        wrapper.jinja_pass_arg = pass_arg  # type: ignore[attr-defined]
    return wrapper


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> Any:  # noqa: A002
    from jinja2.utils import generate_lorem_ipsum

    if n * max > 20_000:
        raise EvaluationLimit(f"lipsum(n={n}, max={max}) would build more than 20000 words")
    return generate_lorem_ipsum(n=n, html=html, min=min, max=max)


def _int_pow_ok(left: Any, right: Any) -> bool:
    if not (isinstance(left, int) and isinstance(right, int)):
        return True
    if right < 0 or abs(left) <= 1:
        return True
    return right * abs(left).bit_length() <= MAX_INT_BITS


class _CodeGen(CodeGenerator):
    """``a ~ b ~ …`` goes through :meth:`_Env.bounded_concat`, so its size is checked first."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Env(ImmutableSandboxedEnvironment):
    """Mapping keys win over methods: ``outputs.items`` is the output named ``items``, not dict.items.
    Every operator, call, filter and attribute access checks the evaluation budget; nothing a
    template sees can be modified (``list.append``, ``dict.update`` are refused)."""

    code_generator_class = _CodeGen
    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})
    intercepted_unops = frozenset({"-", "+"})

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}
        self.globals["lipsum"] = _lipsum

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt, name = value.__self__, value.__name__

        def checked(*args: Any, **kwargs: Any) -> str:
            _precheck(name, fmt, args, kwargs)
            return str(_budget().charge(wrapped(*args, **kwargs)))

        return checked

    def bounded_concat(self, items: tuple[Any, ...]) -> str:
        parts = [str(x) for x in items]
        _too_big("concatenation", sum(len(p) for p in parts))
        return str(_budget().charge("".join(parts)))

    def getattr(self, obj: Any, attribute: str) -> Any:
        _budget().check()
        if isinstance(obj, Mapping) and isinstance(attribute, str) and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _budget().check()
        return super().getitem(obj, argument)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        b = _budget()
        b.check()
        if operator == "**" and not _int_pow_ok(left, right):
            raise EvaluationLimit(f"{_short(left)} ** {_short(right)} is too large (more than {MAX_INT_BITS} bits)")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_OUTPUT:
                    raise EvaluationLimit(f"repetition would build {len(seq) * n} characters/items "
                                          f"(limit {MAX_OUTPUT})")
            if isinstance(left, int) and isinstance(right, int) and \
                    left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
                raise EvaluationLimit(f"the product is too large (more than {MAX_INT_BITS} bits)")
        if operator == "%" and isinstance(left, str):
            _precheck("%", left, right if isinstance(right, tuple) else (right,), {})
        return b.charge(self.binop_table[operator](left, right))

    def call_unop(self, context: Any, operator: str, arg: Any) -> Any:
        _budget().check()
        return self.unop_table[operator](arg)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        b = _budget()
        b.check()
        _check_args(args, kwargs)
        owner = getattr(__obj, "__self__", None)
        name = getattr(__obj, "__name__", "")
        if isinstance(owner, (str, list, tuple)):
            _precheck(name, owner, args, kwargs)
        return b.charge(ImmutableSandboxedEnvironment.call(__self, __context, __obj, *args, **kwargs))


def _short(v: Any) -> str:
    if isinstance(v, int) and v.bit_length() > 64:
        return f"<{v.bit_length()}-bit int>"
    r = repr(v)
    return r if len(r) <= 30 else r[:27] + "..."


def _make_env() -> _Env:
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
        finalize=lambda v: _budget().charge(to_text(v)),  # every output counts towards the budget
    )


PLAIN_ENV = _make_env()


@functools.lru_cache(maxsize=1024)
def compiled(source: str) -> Any:
    try:
        return PLAIN_ENV.from_string(source)
    except (RecursionError, SyntaxError, MemoryError):  # Jinja's parser, its compiler and Python's recurse
        raise EvaluationLimit("the template is nested too deeply") from None


@functools.lru_cache(maxsize=1024)
def compiled_expr(source: str) -> Any:
    try:
        return PLAIN_ENV.compile_expression(source, undefined_to_none=False)
    except (RecursionError, SyntaxError, MemoryError):
        raise EvaluationLimit("the expression is nested too deeply") from None
