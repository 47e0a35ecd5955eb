"""Parameter parsing and typing: ``-p key=value`` strings → typed values, checked against the spec."""

from __future__ import annotations

import difflib
import json
import math
from typing import TYPE_CHECKING, Any

import yaml

from dagcraft.errors import InvalidInput

if TYPE_CHECKING:
    from dagcraft.workflows.spec import ParamSpec

MAX_INT = 2**63 - 1  # int params fit in 64 bits (and their text in a few dozen digits)
_TRUE = {"true", "yes", "on", "1"}


def _short(v: Any) -> str:
    r = repr(v) if not (isinstance(v, int) and v.bit_length() > 64) else f"<{v.bit_length()}-bit int>"
    return r if len(r) <= 60 else r[:57] + "..."
_FALSE = {"false", "no", "off", "0"}


class ParamError(InvalidInput):
    """A declared parameter got a bad value or is missing; ``param`` names it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def parse_params(pairs: list[str]) -> dict[str, str]:
    """``["k=v", ...]`` → ``{"k": "v"}`` (split at the first ``=``; a later pair wins).

    Raises InvalidInput for a pair without ``=`` or with an invalid key.
    """
    from dagcraft.workflows.spec import ID_RE

    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise InvalidInput(f"-p expects KEY=VALUE, got {pair!r}")
        key = key.strip()
        if not ID_RE.match(key):
            raise InvalidInput(f"-p {pair!r}: invalid parameter name {key!r}")
        out[key] = value
    return out


def check_type(value: Any, typ: str, what: str = "value") -> Any:
    """Return ``value`` if it already has param type ``typ`` (int accepted for float), else ValueError."""
    ok = {
        "string": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "list": isinstance(value, list),
        "object": isinstance(value, dict),
    }[typ]
    if not ok:
        raise ValueError(f"{what} {_short(value)} is not of type {typ}")
    if typ == "int" and abs(value) > MAX_INT:
        raise ValueError(f"{what} is out of range (integers are at most 64 bits)")
    if typ == "float":
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{what} {value!r} is not a finite number")
    return value


def coerce(value: Any, typ: str) -> Any:
    """Coerce a ``-p`` string to ``typ`` (list/object parse as JSON or YAML); typed values are checked."""
    if not isinstance(value, str) or typ == "string":
        return check_type(value, typ)
    s = value.strip()
    if typ == "int":
        if len(s) > 25:
            raise ValueError(f"{_short(value)} is out of range (integers are at most 64 bits)")
        try:
            number = int(s, 10)
        except ValueError:
            raise ValueError(f"{_short(value)} is not an int") from None
        return check_type(number, "int")
    if typ == "float":
        try:
            return check_type(float(s), "float")
        except ValueError:
            raise ValueError(f"{value!r} is not a float") from None
    if typ == "bool":
        if s.lower() in _TRUE:
            return True
        if s.lower() in _FALSE:
            return False
        raise ValueError(f"{value!r} is not a bool (use true/false)")
    try:
        parsed = json.loads(s)
    except RecursionError:
        raise ValueError("the value is nested too deeply") from None
    except ValueError:
        try:
            parsed = yaml.safe_load(s)
        except RecursionError:
            raise ValueError("the value is nested too deeply") from None
        except (yaml.YAMLError, ValueError, OverflowError):
            raise ValueError(f"{_short(value)} is not valid JSON or YAML") from None
    return check_type(parsed, typ)


def resolve_params(declared: dict[str, ParamSpec], given: dict[str, Any]) -> dict[str, Any]:
    """Typed values for every declared param: given (coerced) → default → None if optional.

    Raises InvalidInput naming the param for an unknown key, a bad value, a value outside
    ``choices``, or a required param that was not given.
    """
    for key in given:
        if key not in declared:
            hint = difflib.get_close_matches(key, list(declared), n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            known = ", ".join(declared) or "none"
            raise InvalidInput(f"unknown parameter {key!r}{extra}; declared: {known}")
    out: dict[str, Any] = {}
    for name, p in declared.items():
        if name in given:
            try:
                value = coerce(given[name], p.type)
            except ValueError as exc:
                raise ParamError(f"parameter {name!r}: {exc}", name) from None
        elif p.has_default:
            value = p.default
        elif p.required is False:
            value = None
        else:
            raise ParamError(f"parameter {name!r} is required (pass -p {name}=VALUE)", name)
        if p.choices is not None and value is not None and value not in p.choices:
            raise ParamError(f"parameter {name!r}: {value!r} is not one of {p.choices!r}", name)
        out[name] = value
    return out
