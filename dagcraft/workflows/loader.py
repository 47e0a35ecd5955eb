"""YAML loading with source positions, and spec errors that name ``file:line:col: field.path``.

Guarantees: duplicate mapping keys are an error (never a silent override); every mapping value
and sequence item gets a position, so any error ``loc`` maps back to the line and column where
the offending value (or the nearest enclosing one) was written. Errors are raised as
:class:`~dagcraft.errors.SpecError` with a one-line message; a spec with several independent
problems raises :class:`SpecErrors`, one line per problem in file order (at most
``MAX_REPORTED`` lines, then ``… and N more errors``).

Loading is bounded, each bound a positioned SpecError checked before the data is built: at
most ``MAX_SPEC_BYTES`` of text, no NUL (or other non-printable) characters, nesting at most
``MAX_DEPTH`` deep, at most ``MAX_NODES`` values once aliases are expanded (so an alias bomb is
refused after reading it once, never expanded), integers within 64 bits.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from dagcraft.errors import SpecError
from dagcraft.workflows.gcpause import paused_gc
from dagcraft.workflows.spec import Spec

Pos = tuple[int, int]
_STR = "tag:yaml.org,2002:str"
_SEQ = "tag:yaml.org,2002:seq"
_MAP = "tag:yaml.org,2002:map"

MAX_SPEC_BYTES = 1 << 20  # 1 MiB of spec text
MAX_DEPTH = 64  # nested mappings/sequences
MAX_NODES = 100_000  # values in the document, aliases expanded
MAX_INT = 2**63 - 1  # integers in a spec fit in 64 bits
MAX_REPORTED = 50  # errors listed in a SpecErrors message (--json lists them all)




class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """SafeLoader used only to compose nodes; construction is done by :func:`_build`. The
    libyaml parser when PyYAML has it: the pure-Python one takes ~10 s for a 10,000-step spec."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._tags: dict[str, str] = {}

    def resolve(self, kind: Any, value: str, implicit: Any) -> str:
        # What SafeLoader's resolver gives (it has no path resolvers): the regex scan per
        # scalar was a third of composing a 10,000-step spec, whose keys repeat. A plain
        # scalar's tag is a pure function of its text (memoised); any other untagged scalar is
        # a string, a collection its kind's default tag.
        if kind is yaml.ScalarNode:
            if not implicit[0]:
                return _STR
            tag = self._tags.get(value)
            if tag is None:
                tag = self._tags[value] = super().resolve(kind, value, implicit)
            return tag
        return _SEQ if kind is yaml.SequenceNode else _MAP


def format_path(path: tuple) -> str:
    """``("steps", 2, "needs", 0)`` → ``steps[2].needs[0]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


class _Positions:
    """Where each value (``value``) and each mapping key (``key``) was written, by data path.
    ``locate``: how to fill them later — a load that met no problem notes no position, and
    the text is parsed again, with every position noted, only when an error needs one."""

    def __init__(self, locate: Callable[[], _Positions] | None = None) -> None:
        self._locate = locate
        self._value: dict[tuple, Pos] = {}
        self._key: dict[tuple, Pos] = {}
        self.value: Mapping[tuple, Pos] = self._value if locate is None else _Later(self, "_value")
        self.key: Mapping[tuple, Pos] = self._key if locate is None else _Later(self, "_key")

    def located(self) -> _Positions:
        if self._locate is not None:
            again = self._locate()
            self._value, self._key, self._locate = again._value, again._key, None
        return self


class _Later(Mapping[tuple, Pos]):
    """One of a :class:`_Positions`' maps, filled on first use."""

    def __init__(self, positions: _Positions, which: str) -> None:
        self._positions, self._which = positions, which

    def _map(self) -> dict[tuple, Pos]:
        got: dict[tuple, Pos] = getattr(self._positions.located(), self._which)
        return got

    def __getitem__(self, path: tuple) -> Pos:
        return self._map()[path]

    def __iter__(self) -> Iterator[tuple]:
        return iter(self._map())

    def __len__(self) -> int:
        return len(self._map())


def _mark(node: yaml.Node) -> Pos:
    return (node.start_mark.line + 1, node.start_mark.column + 1)


def _check_bounds(root: yaml.Node, source: str) -> None:
    """Check nesting depth and alias-expanded size on the composed document, before anything
    is built: each node is visited once (an alias is the very node it names, so its size is
    remembered, never expanded), iteratively (a deep document cannot exhaust the stack).
    Checking the composed nodes instead of a second parse of the text: that parse was a
    fifth of loading a 10,000-step spec."""
    if isinstance(root, yaml.ScalarNode):
        return
    scalar = yaml.ScalarNode
    size: dict[int, int] = {}  # collections only: a scalar counts 1
    todo: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while todo:
        node, depth, children_done = todo.pop()
        kids = [k for pair in node.value for k in pair] if isinstance(node, yaml.MappingNode) else node.value
        if children_done:
            n = 1
            for k in kids:
                n += size.get(id(k), 1)
            if n > MAX_NODES:
                line, col = _mark(node)
                raise SpecError(f"{source}:{line}:{col}: more than {MAX_NODES} values once aliases are expanded "
                                "(an alias bomb?)")
            size[id(node)] = n
            continue
        if id(node) in size:
            continue  # an alias of a node already counted
        if depth > MAX_DEPTH:
            line, col = _mark(node)
            raise SpecError(f"{source}:{line}:{col}: nesting deeper than {MAX_DEPTH} levels")
        todo.append((node, depth, True))
        for k in kids:
            if not isinstance(k, scalar) and id(k) not in size:
                todo.append((k, depth + 1, False))


def _scalar(loader: _Loader, node: yaml.Node, path: tuple) -> Any:
    def where() -> str:  # built only for an error: formatting it per scalar costs ~10 % of a load
        return f"{loader.name}:{_mark(node)[0]}:{_mark(node)[1]}: {format_path(path) or '<root>'}"

    if node.tag == _STR:
        return node.value  # what construct_object gives a str node, without its bookkeeping
    if node.tag == "tag:yaml.org,2002:int" and len(str(node.value)) > 40:
        raise SpecError(f"{where()}: integer out of range (at most 64 bits)")
    try:
        value = loader.construct_object(node, deep=True)
    except (ValueError, OverflowError) as exc:
        raise SpecError(f"{where()}: invalid value: {exc}") from None
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        raise SpecError(f"{where()}: integer out of range (at most 64 bits)")
    return value


class _Unplaced(Exception):
    """A problem met while building without positions: build again with them, for its message."""


def _build(loader: _Loader, node: yaml.Node, path: tuple, pos: _Positions | None, depth: int = 0,
           budget: list[int] | None = None) -> Any:
    """The data of ``node``. ``pos`` None: no position is noted, ``path`` stays ``()``, and any
    problem raises :class:`_Unplaced` (also once more than ``budget[0]`` nodes were built,
    keys included, or a collection nests deeper than :func:`_check_bounds` allows)."""
    if pos is None:
        budget = budget if budget is not None else [MAX_NODES]
        budget[0] -= 1
        if budget[0] < 0 or (depth >= MAX_DEPTH and not isinstance(node, yaml.ScalarNode)):
            raise _Unplaced
        if isinstance(node, yaml.MappingNode):
            loader.flatten_mapping(node)
            budget[0] -= len(node.value)  # the keys
            out_fast: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != _STR:
                    raise _Unplaced  # a non-string key: its checks and conversions, with positions
                if key_node.value in out_fast:
                    raise _Unplaced
                out_fast[key_node.value] = _build(loader, value_node, (), None, depth + 1, budget)
            return out_fast
        if isinstance(node, yaml.SequenceNode):
            return [_build(loader, item, (), None, depth + 1, budget) for item in node.value]
        if node.tag == _STR:
            return node.value
        try:
            return _value(loader, node, ())
        except SpecError:
            raise _Unplaced from None
    if depth > MAX_DEPTH:
        raise SpecError(f"{loader.name}:{_mark(node)[0]}:{_mark(node)[1]}: {format_path(path)}: nesting too deep")
    pos.value.setdefault(path, _mark(node))  # type: ignore[index]  # a dict while positions are noted
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolves `<<: *anchor` merge keys
        out: dict[Any, Any] = {}
        first: dict[Any, Pos] = {}
        for key_node, value_node in node.value:
            key = _scalar(loader, key_node, path) if isinstance(key_node, yaml.ScalarNode) else \
                loader.construct_object(key_node, deep=True)
            if isinstance(key, (list, dict)):
                line, col = _mark(key_node)
                raise SpecError(f"{loader.name}:{line}:{col}: {format_path(path) or '<root>'}: mapping keys must be scalars")
            if not isinstance(key, str):
                # YAML 1.1 reads `on:`/`yes:` as booleans and `1:` as an int; keys are names here.
                key = str(key).lower() if isinstance(key, bool) else str(key)
            if key in first:
                line, col = _mark(key_node)
                where = format_path(path + (key,))
                raise SpecError(
                    f"{loader.name}:{line}:{col}: {where}: duplicate key {key!r} (first defined at line {first[key][0]})"
                )
            sub = path + (key,)
            first[key] = pos.key[sub] = _mark(key_node)  # type: ignore[index]
            out[key] = _build(loader, value_node, sub, pos, depth + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(loader, item, path + (i,), pos, depth + 1) for i, item in enumerate(node.value)]
    if node.tag == _STR:
        return node.value  # the common case, decided without _scalar's checks
    return _value(loader, node, path)


def _value(loader: _Loader, node: yaml.Node, path: tuple) -> Any:
    """A non-string scalar's value, as the spec's data holds it."""
    value = _scalar(loader, node, path)
    if isinstance(value, (_dt.date, _dt.datetime)):
        return value.isoformat()  # keep the data JSON-able (spec hash); dates are just strings here
    if isinstance(value, bytes):
        raise SpecError(f"{loader.name}:{_mark(node)[0]}:{_mark(node)[1]}: {format_path(path)}: binary values are not supported")
    return value


def load_yaml(text: str, source: str) -> tuple[Any, _Positions]:
    """Parse one YAML document; return plain data and its positions. SpecError on any YAML problem.

    The data is built without noting positions first (a third of building it); only a
    document that has a problem, or whose positions an error later asks for, is parsed again
    with them, so every error is positioned as before. A document without anchors (``&``) or
    merge keys (``<<``) is a tree: its size and depth are then checked while it is built."""
    try:
        return _load(text, source, noted=False)
    except _Unplaced:
        return _load(text, source, noted=True)


def _load(text: str, source: str, *, noted: bool) -> tuple[Any, _Positions]:
    pos = _Positions() if noted else _Positions(lambda: _load(text, source, noted=True)[1])
    if len(text) > MAX_SPEC_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_SPEC_BYTES:
        raise SpecError(f"{source}: the spec is larger than {MAX_SPEC_BYTES} bytes")
    nul = text.find("\x00")
    if nul >= 0:
        line = text.count("\n", 0, nul) + 1
        col = nul - (text.rfind("\n", 0, nul) + 1) + 1
        raise SpecError(f"{source}:{line}:{col}: NUL byte in the spec")
    loader = None
    try:
        loader = _Loader(text)
        loader.name = source
        node = loader.get_single_node()
        if node is None:
            raise SpecError(f"{source}:1:1: the spec is empty")
        if noted or "&" in text or "<<" in text:
            _check_bounds(node, source)  # aliases: sizes as expanded, each node counted once
        data = _build(loader, node, (), pos if noted else None)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = exc.problem or exc.context or "invalid YAML"
        if "maximum nesting depth" in problem:  # libyaml's own bound (1,000) is met first
            raise SpecError(f"{source}:{line}:{col}: nesting deeper than {MAX_DEPTH} levels") from None
        raise SpecError(f"{source}:{line}:{col}: invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: invalid YAML: {str(exc).splitlines()[0]}") from None
    except RecursionError:  # the pure-Python composer (no libyaml) on a very deep document
        raise SpecError(f"{source}: nesting deeper than {MAX_DEPTH} levels") from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, pos


def locate(pos_value: dict[tuple, Pos], path: tuple) -> Pos | None:
    """Position of ``path``, or of its nearest enclosing value that has one."""
    p = tuple(path)
    while True:
        if p in pos_value:
            return pos_value[p]
        if not p:
            return None
        p = p[:-1]


def error_at(source: str, pos_value: dict[tuple, Pos], path: tuple, message: str, *, at: Pos | None = None) -> SpecError:
    """A SpecError ``source:line:col: path: message`` (``source: path: message`` without a position).
    Its parts are kept as attributes (``source``, ``line``, ``col``, ``field``, ``detail``) for
    :func:`error_record`."""
    where = at or locate(pos_value, path)
    prefix = f"{source}:{where[0]}:{where[1]}" if where else source
    field = format_path(path)
    err = SpecError(f"{prefix}: {field}: {message}" if field else f"{prefix}: {message}")
    err.source, err.field, err.detail, err.path = source, field, message, tuple(path)  # type: ignore[attr-defined]
    err.line, err.col = where if where else (None, None)  # type: ignore[attr-defined]
    return err


_POSITIONED = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?P<message>.*)$", re.S)


def error_record(err: SpecError) -> dict[str, Any]:
    """``{"file", "line", "col", "field", "message", "text"}`` of one spec error (``line``/``col``/
    ``field`` None when the error has none); ``text`` is the whole one-line message."""
    text = str(err)
    if hasattr(err, "detail"):
        return {"file": err.source, "line": err.line, "col": err.col, "field": err.field or None,  # type: ignore[attr-defined]
                "message": err.detail, "text": text}  # type: ignore[attr-defined]
    m = _POSITIONED.match(text)
    if m:
        return {"file": m["file"], "line": int(m["line"]), "col": int(m["col"]), "field": None,
                "message": m["message"], "text": text}
    return {"file": None, "line": None, "col": None, "field": None, "message": text, "text": text}


class SpecErrors(SpecError):
    """Several independent problems of one spec. ``errors`` holds them in file order; the
    message is one line per error (the first ``MAX_REPORTED``, then ``… and N more errors``)."""

    def __init__(self, errors: list[SpecError]) -> None:
        def key(e: SpecError) -> tuple[int, int]:
            r = error_record(e)
            return (r["line"] or 0, r["col"] or 0)

        self.errors = sorted(errors, key=key)
        lines = [str(e) for e in self.errors[:MAX_REPORTED]]
        rest = len(self.errors) - MAX_REPORTED
        if rest > 0:
            lines.append(f"… and {rest} more error{'s' if rest > 1 else ''}")
        super().__init__("\n".join(lines))


def spec_errors(exc: SpecError) -> list[SpecError]:
    """Every error ``exc`` stands for: its ``errors`` if it is a :class:`SpecErrors`, else itself."""
    return list(exc.errors) if isinstance(exc, SpecErrors) else [exc]


def raise_all(errors: list[SpecError]) -> None:
    """Raise nothing for no errors, the error itself for one, else :class:`SpecErrors`.
    Duplicates (the same message twice) are reported once."""
    unique = list({str(e): e for e in errors}.values())
    if len(unique) == 1:
        raise unique[0]
    if unique:
        raise SpecErrors(unique)


def _all_field_names(model: type[BaseModel], seen: set[type] | None = None) -> set[str]:
    seen = seen if seen is not None else set()
    if model in seen:
        return set()
    seen.add(model)
    names: set[str] = set()
    for name, field in model.model_fields.items():
        names.add(field.alias or name)
        ann = field.annotation
        for cand in _types_in(ann):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                names |= _all_field_names(cand, seen)
    return names


def _types_in(ann: Any) -> list[Any]:
    args = getattr(ann, "__args__", None)
    if not args:
        return [ann]
    out = []
    for a in args:
        out.extend(_types_in(a))
    return out


def _clean_loc(data: Any, loc: tuple) -> tuple:
    # Pydantic adds union/validator tags ("list[str]", "function-after[...]") to loc; keep only
    # the parts that really index the data, plus a trailing missing/unknown key.
    out: list[Any] = []
    cur = data
    for i, part in enumerate(loc):
        if isinstance(cur, dict) and part in cur:
            out.append(part)
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
            out.append(part)
            cur = cur[part]
        elif i == len(loc) - 1 and isinstance(part, str) and isinstance(cur, dict):
            out.append(part)
        # else: a tag, skip it
    return tuple(out)


#: which model each spec section is, in words ("X is a <where> field")
_WHERE = {"Spec": "workflow-level", "StepSpec": "step", "DefaultsSpec": "defaults", "AgentDef": "agent",
          "ParamSpec": "param", "RetrySpec": "retries", "RetryOnSpec": "retries.retry_on",
          "OutputsSpec": "outputs", "InputSpec": "inputs", "ApprovalSpec": "approval", "WorktreeSpec": "worktree"}


def _models(model: type[BaseModel], seen: set[type] | None = None) -> list[type[BaseModel]]:
    seen = seen if seen is not None else set()
    if model in seen:
        return []
    seen.add(model)
    out = [model]
    for field in model.model_fields.values():
        for cand in _types_in(field.annotation):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                out += _models(cand, seen)
    return out


def _field_names(model: type[BaseModel]) -> list[str]:
    return [f.alias or n for n, f in model.model_fields.items()]


def _model_at(path: tuple) -> type[BaseModel] | None:
    """The spec model that holds the mapping at ``path`` (``("steps", 0)`` → StepSpec)."""
    cur: Any = Spec
    for part in path:
        models = [t for t in _types_in(cur) if isinstance(t, type) and issubclass(t, BaseModel)]
        if isinstance(part, str) and models:
            fields = {f.alias or n: f for n, f in models[0].model_fields.items()}
            if part not in fields:
                return None
            cur = fields[part].annotation
        else:  # a list index or a dict key: the container's item type
            args = [a for a in getattr(cur, "__args__", ()) if a is not type(None)]
            origin = getattr(cur, "__origin__", None)
            if origin is None and args:  # a union (Optional[...]): the container in it
                cont = [a for a in args if getattr(a, "__origin__", None) in (list, dict)]
                if not cont:
                    return None
                cur, args, origin = cont[0], list(cont[0].__args__), cont[0].__origin__
            if origin not in (list, dict) or not args:
                return None
            cur = args[-1]
    models = [t for t in _types_in(cur) if isinstance(t, type) and issubclass(t, BaseModel)]
    return models[0] if models else None


def _unknown_field(path: tuple) -> str:
    """Why ``path[-1]`` is not a field here: where it belongs if it is a field elsewhere,
    else the closest field name of this section."""
    key = str(path[-1]) if path else "?"
    here = _model_at(path[:-1])
    local = _field_names(here) if here is not None else sorted(_all_field_names(Spec))
    order = list(_WHERE)
    homes = [_WHERE.get(m.__name__, m.__name__) for m in sorted(
        (m for m in _models(Spec) if key in _field_names(m)),
        key=lambda m: order.index(m.__name__) if m.__name__ in order else len(order))]
    if homes and here is not None:
        homes_text = homes[0] if len(homes) == 1 else ", ".join(homes[:-1]) + " or " + homes[-1]
        return f"{key!r} is a {homes_text} field, not a {_WHERE.get(here.__name__, here.__name__)} field"
    hint = difflib.get_close_matches(key, local, n=1)
    return f"unknown field {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")


def validation_errors(exc: ValidationError, data: Any, source: str, pos: _Positions) -> list[SpecError]:
    """Every pydantic error as a positioned one-line SpecError (one per field path and message)."""
    out: list[SpecError] = []
    for err in exc.errors(include_url=False):
        path = _clean_loc(data, tuple(err["loc"]))
        kind = err["type"]
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        at = None
        if kind == "extra_forbidden":
            msg = _unknown_field(path)
            at = pos.key.get(path)
        elif kind == "missing":
            msg = f"missing required field {path[-1]!r}" if path else "missing required field"
            path, at = path[:-1], locate(pos.value, path[:-1])
        elif "input" in err and (kind.endswith("_type") or kind.endswith("_parsing")):
            msg = f"{msg}, got {_short(err.get('input'))}"
        out.append(error_at(source, pos.value, path, msg, at=at))
    return out


def validation_error(exc: ValidationError, data: Any, source: str, pos: _Positions) -> SpecError:
    """Every pydantic error of ``exc`` as one SpecError (a :class:`SpecErrors` if several)."""
    try:
        raise_all(validation_errors(exc, data, source, pos))
    except SpecError as err:
        return err
    return SpecError(f"{source}: invalid spec")  # pydantic always reports at least one error


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def parse_spec(text: str, source: str = "<spec>", spec_dir: str | None = None) -> Spec:
    """Parse and validate spec text. SpecError (positioned, one line) on any problem."""
    with paused_gc():
        return _parse_spec(text, source, spec_dir)


def _parse_spec(text: str, source: str, spec_dir: str | None) -> Spec:
    data, pos = load_yaml(text, source)
    if not isinstance(data, dict):
        raise SpecError(f"{source}:1:1: the spec must be a mapping (name:, steps:, ...), got {type(data).__name__}")
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        errors = validation_errors(exc, data, source, pos)
        errors += _reference_errors(data, errors, source, pos, spec_dir)
        raise_all(errors)
        raise validation_error(exc, data, source, pos) from None  # not reached: pydantic reported errors
    spec._positions = pos.value
    spec._key_positions = pos.key
    spec._source = source
    spec._spec_dir = spec_dir
    return spec


_PLACEHOLDER = "_invalid_step_{}_{}"


def _reference_errors(data: dict[str, Any], errors: list[SpecError], source: str, pos: _Positions,
                      spec_dir: str | None) -> list[SpecError]:
    """The compiler's structure and reference errors of a spec whose only field errors are
    inside ``steps``/``finally`` items, so one ``validate`` reports both kinds: each faulty
    item is checked as a stand-in that keeps its valid ``id``, ``needs`` and ``outputs``.
    Errors its lost fields could make wrong are left out (those naming a stand-in without its
    id or outputs; "not upstream" ones once a stand-in lost its needs); [] when the field
    errors are elsewhere (params, agents, ... feed every reference check)."""
    from dagcraft.workflows.compile import reference_errors  # compile imports this module
    from dagcraft.workflows.spec import ID_RE, OutputsSpec, StepSpec

    bad: dict[tuple[str, int], set[str]] = {}  # faulty item -> its faulty fields
    for e in errors:
        path = getattr(e, "path", ())
        if len(path) < 2 or path[0] not in ("steps", "finally") or not isinstance(path[1], int):
            return []
        fields = bad.setdefault((path[0], path[1]), set())
        if len(path) > 2 and isinstance(path[2], str):
            fields.add(path[2])
    salvaged = dict(data)
    lossy: set[str] = set()  # stand-ins without their own id or outputs
    lost_needs = False
    lost_scope: set[tuple[str, int]] = set()  # stand-ins that lost matrix/foreach/agent
    for (section, i), fields in sorted(bad.items()):
        items = list(salvaged[section])
        item = items[i] if isinstance(items[i], dict) else {}
        sid = item.get("id")
        good_id = isinstance(sid, str) and ID_RE.match(sid) is not None and "id" not in fields
        # first the item without its faulty fields (its templates are still checked), else
        # only its id, needs and outputs
        stand_in = {k: v for k, v in item.items() if k not in fields}
        stand_in["id"] = sid if good_id else _PLACEHOLDER.format(section, i)
        if "run" not in stand_in and "agent" not in stand_in:
            stand_in["run"] = ["true"]
        try:
            StepSpec.model_validate(stand_in)
        except ValidationError:
            stand_in = {"id": stand_in["id"], "run": ["true"]}
            needs = item.get("needs")
            if "needs" not in fields and (isinstance(needs, str) or (
                    isinstance(needs, list) and all(isinstance(n, str) for n in needs))):
                stand_in["needs"] = needs
            try:
                stand_in["outputs"] = OutputsSpec.model_validate(item.get("outputs", {})).model_dump()
            except ValidationError:
                lossy.add(stand_in["id"])
        lost = {k for k in item if k not in stand_in}
        lost_needs = lost_needs or "needs" in lost
        if lost & {"outputs"} or stand_in["id"] != sid:
            lossy.add(stand_in["id"])
        if lost & {"matrix", "foreach", "agent", "prompt"}:
            lost_scope.add((section, i))
        items[i] = stand_in
        salvaged[section] = items
    try:
        spec = Spec.model_validate(salvaged)
    except ValidationError:
        return []
    spec._positions, spec._key_positions, spec._source, spec._spec_dir = pos.value, pos.key, source, spec_dir
    out = []
    for e in reference_errors(spec):
        where = tuple(getattr(e, "path", ()))[:2]
        text = str(e)
        if (where not in bad and any(f"{n!r}" in text for n in lossy)) \
                or (lost_needs and "is not upstream of" in text) \
                or (where in lost_scope and "is not available here" in text):
            continue  # a stand-in's lost fields could make this wrong
        out.append(e)
    return out


def load_spec(path: Path) -> Spec:
    """Load and validate a spec file. Errors: ``SpecError("file:line:col: field.path: message")``."""
    path = Path(path)
    try:
        if path.is_file() and path.stat().st_size > MAX_SPEC_BYTES:
            raise SpecError(f"{path}: the spec is larger than {MAX_SPEC_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a directory, not a spec file") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_spec(text, str(path), spec_dir=str(path.resolve().parent))
