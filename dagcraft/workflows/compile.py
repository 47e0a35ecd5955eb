"""Compile a validated spec + params into a :class:`CompiledWorkflow` (a DAG of concrete steps).

Guarantees:
- every spec error (unknown/duplicate id, cycle, unknown template reference, reference to a step
  not upstream, bad input, fan-out over the limit, bad param) raises SpecError *before* anything
  is written anywhere, naming ``file:line:col: field.path``; the structure and reference checks
  (ids, needs, agents, params, every template) all run first and their errors are raised
  together (:class:`~dagcraft.workflows.loader.SpecErrors` when there are several);
- the result is deterministic: same spec + params → same steps order, same JSON, same
  ``spec_hash`` (sha256 of the canonical JSON, secret values replaced by their sha256);
- ``steps`` is in a topological order (spec order breaks ties), matrix templates are expanded to
  concrete ids like ``review[reviewer=security]``, a foreach step stays ONE node.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import functools
import hashlib
import itertools
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from jinja2 import TemplateError

from dagcraft.errors import InvalidInput, SpecError
from dagcraft.workflows.gcpause import paused_gc
from dagcraft.workflows.loader import error_at, format_path, load_spec, raise_all, spec_errors
from dagcraft.workflows.params import ParamError, resolve_params
from dagcraft.workflows.shell import SPECIAL_VARS
from dagcraft.workflows.spec import (
    MATRIX_MODIFIERS,
    CompiledWorkflow,
    ConcreteStep,
    InputDecl,
    LoopDef,
    RetryPolicy,
    RetrySpec,
    Spec,
    StepSpec,
    check_matrix_entries,
    check_relpath,
    instance_key,
)
from dagcraft.workflows.template import (
    MAX_FANOUT,
    PLAIN_EVAL_ERRORS,
    STATUS_FUNCTIONS,
    EvaluationLimit,
    check_bounds,
    check_shell,
    check_syntax,
    evaluate_expression,
    expressions,
    split_expression,
    template_refs,
    to_text,
)

_NO_RETRIES = RetrySpec()  # read only: a step without retries shares it
_EVAL_OR_LIMIT: tuple[type[BaseException], ...] = (TemplateError, *PLAIN_EVAL_ERRORS, EvaluationLimit)
MAX_STEPS = 10_000  # concrete steps in one compiled workflow
_JINJA_GLOBALS = {"range", "dict", "lipsum", "cycler", "joiner", "namespace", "true", "false", "none",
                  "True", "False", "None"}
_RUN_KEYS = ("id", "name", "spec_dir")
_SAFE_ID_VALUE = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")
#: a step id is one store key segment, also inside a journal entry `<ulid>~<rev>~<status>~<step>`
#: (primitives.keys.MAX_SEGMENT = 200: 26 + 3 + at most 12 for the status leave 9 digits of rev)
MAX_STEP_ID = 150


def matrix_id_value(value: Any) -> str:
    """A matrix value as it appears in a concrete id: itself if made of ``[A-Za-z0-9_.-]`` (≤ 40
    chars, not only dots), else a readable prefix plus an 8-hex digest, so ids stay one valid
    path segment (no ``/``, NUL, ``..``) and stable across runs."""
    text = to_text(value)
    if _SAFE_ID_VALUE.match(text) and text.strip("."):
        return text
    digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:8]
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", text)[:24].strip("_")
    return f"{safe}-{digest}" if safe else digest


def concrete_id(template_id: str, values: dict[str, Any]) -> str:
    """``t[a=1,b=x]``: keys sorted, values via :func:`matrix_id_value`."""
    if not values:
        return template_id
    inner = ",".join(f"{k}={matrix_id_value(values[k])}" for k in sorted(values))
    return f"{template_id}[{inner}]"




#: what ``steps.X.instances[i]`` / ``steps.X.by_key[K]`` hold (see docs/spec.md "Fan-in")
INSTANCE_FIELDS = ("id", "key", "matrix", "item", "outputs", "artifacts", "status")


def spec_hash_of(wf: CompiledWorkflow) -> str:
    """sha256 of the JSON of ``wf`` as pydantic serialises it (fields in model order, mappings
    in spec order), without hash/location fields and with each secret param's value replaced
    by its own sha256. Serialised in Rust: a canonical sorted-keys dump of a 10,000-step
    workflow in Python was a sixth of its submit."""
    params = dict(wf.params)
    for name in wf.secret_params:
        v = params.get(name)
        if v is not None:
            params[name] = "sha256:" + hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()
    blob = wf.model_copy(update={"params": params}).model_dump_json(exclude={"spec_hash", "spec_dir", "source"})
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


_F = TypeVar("_F", bound=Callable[..., None])


def _collects(method: _F) -> _F:
    """A check whose SpecError is noted in ``self.errors`` (not raised), so one run of the
    checks reports every independent problem of the spec."""

    @functools.wraps(method)
    def wrapper(self: _Compiler, *args: Any, **kwargs: Any) -> None:
        try:  # what self.collect() does, without a generator context manager per template
            method(self, *args, **kwargs)
        except SpecError as exc:
            self.errors.extend(spec_errors(exc))

    return wrapper  # type: ignore[return-value]


def _matrix_keys(step: StepSpec) -> set[str] | None:
    """The keys ``matrix.K`` may name in ``step``: its axes and the keys of its ``include``
    entries (None: not known before run time, ``include`` is an expression)."""
    if step.matrix is None:
        return set()
    keys = {k for k in step.matrix if k not in MATRIX_MODIFIERS}
    include = step.matrix.get("include", [])
    if isinstance(include, str):
        return None
    for entry in include:
        keys.update(entry)
    return keys


def _plain(raw: str) -> bool:
    """Text with no template in it: no ``${{``, and no NUL (jinja2 blocks and comments need one)."""
    return "${{" not in raw and "\x00" not in raw


def _hint(word: str, candidates: Any) -> str:
    m = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1)
    return f" (did you mean {m[0]!r}?)" if m else ""


class _Graph:
    """The step DAG as the compiler builds, checks and orders it: successor and predecessor
    sets in insertion order (the order networkx keeps, so a cycle is reported the same way).
    Not networkx: importing it was a quarter of a second of every ``submit``; it is loaded
    only to describe a cycle (:meth:`find_cycle`)."""

    def __init__(self, nodes: Any = ()) -> None:
        self.succ: dict[str, dict[str, None]] = {n: {} for n in nodes}
        self.pred: dict[str, dict[str, None]] = {n: {} for n in self.succ}

    def add_edge(self, u: str, v: str) -> None:
        for n in (u, v):
            if n not in self.succ:
                self.succ[n], self.pred[n] = {}, {}
        self.succ[u][v] = None
        self.pred[v][u] = None

    def successors(self, n: str) -> Iterator[str]:
        return iter(self.succ[n])

    def predecessors(self, n: str) -> Iterator[str]:
        return iter(self.pred[n])

    def ancestors(self, n: str) -> set[str]:
        """Every node with a path to ``n`` (``n`` itself excluded)."""
        seen: set[str] = set()
        todo = list(self.pred[n])
        while todo:
            u = todo.pop()
            if u not in seen:
                seen.add(u)
                todo.extend(self.pred[u])
        return seen

    def topological(self, key: Callable[[str], Any], nodes: Any = None) -> list[str]:
        """The order of ``nodes`` (default all; edges leaving them ignored) that is smallest
        by ``key`` at each place (Kahn's algorithm with a heap). ``key`` is unique per node,
        so the order is unique: the one networkx's ``lexicographical_topological_sort`` gives.
        Nodes on a cycle are left out."""
        import heapq

        if nodes is None:
            indeg = {n: len(ps) for n, ps in self.pred.items()}
        else:
            within = {n: None for n in nodes}
            indeg = {n: sum(1 for p in self.pred[n] if p in within) for n in within}
        heap = [(key(n), n) for n, d in indeg.items() if d == 0]
        heapq.heapify(heap)
        out: list[str] = []
        while heap:
            _, n = heapq.heappop(heap)
            out.append(n)
            for v in self.succ[n]:
                if v in indeg:
                    indeg[v] -= 1
                    if indeg[v] == 0:
                        heapq.heappush(heap, (key(v), v))
        return out

    def acyclic(self) -> bool:
        """Whether the graph has no cycle (Kahn's algorithm, in no particular order)."""
        indeg = {n: len(ps) for n, ps in self.pred.items()}
        todo = [n for n, d in indeg.items() if d == 0]
        done = 0
        while todo:
            n = todo.pop()
            done += 1
            for v in self.succ[n]:
                indeg[v] -= 1
                if indeg[v] == 0:
                    todo.append(v)
        return done == len(self.succ)

    def find_cycle(self) -> list[tuple[str, str]]:
        """The edges of one cycle, [] if there is none: networkx's ``find_cycle`` over the
        same graph (it is imported only here, for a spec with a cycle)."""
        if self.acyclic():
            return []
        import networkx as nx

        g = nx.DiGraph()
        g.add_nodes_from(self.succ)
        g.add_edges_from((u, v) for u, vs in self.succ.items() for v in vs)
        return [(u, v) for u, v, *_ in nx.find_cycle(g)]


class _Compiler:
    def __init__(self, spec: Spec, params: dict[str, Any], source: str) -> None:
        self.spec = spec
        self.given = params
        self.source = spec._source if source == "<spec>" else source
        self.pos = spec._positions
        self.keypos = spec._key_positions
        # (path, StepSpec, is_finally) in spec order; main steps first.
        self.templates: list[tuple[tuple, StepSpec, bool]] = []
        #: body step id -> its loop's id (a loop's body steps follow it in ``templates``)
        self.loop_of: dict[str, str] = {}
        for section, fin, seq in (("steps", False, spec.steps), ("finally", True, spec.finally_)):
            for i, s in enumerate(seq):
                self.templates.append(((section, i), s, fin))
                for j, b in enumerate(s.loop.steps if s.loop is not None else []):
                    self.templates.append(((section, i, "loop", "steps", j), b, fin))
                    self.loop_of.setdefault(b.id, s.id)
        self.by_id: dict[str, tuple[tuple, StepSpec, bool]] = {}
        self.params: dict[str, Any] = {}
        self.errors: list[SpecError] = []  # noted by the checks; raised together after them
        self._combos: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}

    @contextlib.contextmanager
    def collect(self) -> Iterator[None]:
        """Note a SpecError raised inside instead of raising it."""
        try:
            yield
        except SpecError as exc:
            self.errors.extend(spec_errors(exc))

    def err(self, path: tuple, msg: str, *, key: bool = False) -> SpecError:
        return error_at(self.source, self.pos, path, msg, at=self.keypos.get(path) if key else None)

    # ------------------------------------------------------------------ structure
    def check_ids_and_needs(self) -> _Graph:
        for path, s, fin in self.templates:
            if s.id in self.by_id:
                first = format_path(self.by_id[s.id][0])
                self.errors.append(self.err(path + ("id",), f"duplicate step id {s.id!r} (first defined at {first})"))
                continue
            self.by_id[s.id] = (path, s, fin)
        g = _Graph(self.by_id)
        for path, s, fin in self.templates:
            loop = self._loop_at(path)
            for j, need in enumerate(s.needs):
                if need == s.id:
                    self.errors.append(self.err(path + ("needs", j), f"step {s.id!r} cannot need itself"))
                elif need not in self.by_id:
                    self.errors.append(self.err(path + ("needs", j), f"unknown step {need!r}{_hint(need, self.by_id)}"))
                elif self.by_id[need][2] and not fin:
                    self.errors.append(self.err(path + ("needs", j),
                                                f"{need!r} is a finally step; only finally steps may need it"))
                elif loop is not None and self._loop_at(self.by_id[need][0]) != loop:
                    self.errors.append(self.err(path + ("needs", j), f"{need!r} is outside loop {loop!r}: a body "
                                                f"step may need only steps of its loop's body (put {need!r} in "
                                                f"the needs of {loop!r})"))
                elif loop is None and self._loop_at(self.by_id[need][0]) is not None:
                    inner = self._loop_at(self.by_id[need][0])
                    self.errors.append(self.err(path + ("needs", j), f"{need!r} is a step of loop {inner!r}'s "
                                                f"body; need the loop {inner!r} (then steps.{need} is its last "
                                                "iteration's)"))
                else:
                    g.add_edge(need, s.id)
            if loop is not None:
                self._check_body_step(path, s)
                # a body step runs after the loop's needs, and before whatever follows the loop
                for need in self.by_id[loop][1].needs:
                    if need in self.by_id and self._loop_at(self.by_id[need][0]) is None:
                        g.add_edge(need, s.id)
                g.add_edge(s.id, loop)
        cycle = g.find_cycle()
        if cycle:
            nodes_in = [u for u, _ in cycle]
            # Report at the spec-earliest step of the cycle, for a stable message.
            first = min(nodes_in, key=lambda n: self.templates.index(self.by_id[n]))
            k = nodes_in.index(first)
            ring = nodes_in[k:] + nodes_in[:k] + [first]
            path, s, _ = self.by_id[ring[1]]
            j = s.needs.index(first)
            self.errors.append(self.err(path + ("needs", j), "dependency cycle: " + " -> ".join(ring)))
        # finally steps run after every main leaf, whatever happened.
        main = [t for t, (_, _, fin) in self.by_id.items() if not fin]
        leaves = [t for t in main if not any(not self.by_id[d][2] for d in g.successors(t))]
        for _, s, fin in self.templates:
            if fin:
                for leaf in leaves:
                    g.add_edge(leaf, s.id)
        self.graph = g
        return g

    def _loop_at(self, path: tuple) -> str | None:
        """The id of the loop whose body ``path`` (a step's path) is in, else None."""
        if len(path) < 5 or path[2] != "loop":
            return None
        return self.spec_step(path[:2]).id

    def spec_step(self, path: tuple) -> StepSpec:
        seq = self.spec.steps if path[0] == "steps" else self.spec.finally_
        return seq[path[1]]

    def _check_body_step(self, path: tuple, s: StepSpec) -> None:
        for field, what in (("loop", "nested loops are not supported"),
                            ("foreach", "'foreach' inside a loop body is not supported"),
                            ("matrix", "'matrix' inside a loop body is not supported")):
            if getattr(s, field) is not None:
                self.errors.append(self.err(path + (field,), what, key=True))

    def check_agents(self) -> None:
        for path, s, _ in self.templates:
            if s.agent is not None and s.agent not in self.spec.agents:
                known = ", ".join(self.spec.agents) or "none defined"
                self.errors.append(self.err(path + ("agent",), f"unknown agent {s.agent!r}{_hint(s.agent, self.spec.agents)}; agents: {known}"))

    def resolve_params(self) -> dict[str, Any]:
        try:
            return resolve_params(self.spec.params, self.given)
        except ParamError as exc:
            raise self.err(("params", exc.param), str(exc), key=True) from None
        except InvalidInput as exc:
            raise SpecError(f"{self.source}: {exc}") from None

    # ------------------------------------------------------------------ templates
    @_collects
    def check_template(
        self,
        path: tuple,
        raw: str,
        *,
        step: StepSpec | None = None,
        allow: set[str],
        expression: bool = False,
    ) -> None:
        if not expression and _plain(raw):
            return  # plain text (blocks and comments need a NUL): no names, nothing to parse
        expr = split_expression(raw)
        if expr is None and expression and "${{" not in raw:
            expr = raw.strip()
        try:
            if expr is not None:
                check_syntax(expr, expression=True)
                refs = template_refs(expr, expression=True)
            else:
                check_syntax(raw)
                refs = template_refs(raw)
        except (TemplateError, EvaluationLimit) as exc:
            msg = getattr(exc, "message", None) or str(exc)
            raise self.err(path, f"bad template: {msg}") from None
        # ancestors only when a `steps.` reference needs them: one graph walk per step adds
        # up to seconds on a 10,000-step spec
        needs_anc = step is not None and any(name == "steps" for name, _ in refs)
        ancestors = self.graph.ancestors(step.id) if needs_anc and step is not None else set()
        for name, chain in refs:
            head = chain[0] if chain else None
            if name not in allow:
                if name in ("params", "steps", "matrix", "item", "run", "env", "prompt", "attempt", "loop") or name in STATUS_FUNCTIONS:
                    raise self.err(path, f"{name!r} is not available here{self._why(name, step)}")
                if name in _JINJA_GLOBALS:
                    continue
                raise self.err(path, f"unknown name {name!r}{_hint(name, sorted(allow))}")
            if name == "params" and isinstance(head, str) and head not in self.spec.params:
                raise self.err(path, f"unknown param {head!r}{_hint(head, self.spec.params)}")
            if name == "run" and isinstance(head, str) and head not in _RUN_KEYS:
                raise self.err(path, f"unknown run field {head!r}; available: {', '.join(_RUN_KEYS)}")
            if name == "matrix" and isinstance(head, str) and step is not None:
                keys = _matrix_keys(step)
                if keys is not None and head not in keys:
                    raise self.err(path, f"unknown matrix key {head!r}{_hint(head, sorted(keys))}")
            if name == "steps" and isinstance(head, str) and step is not None:
                self._check_step_ref(path, step, ancestors, chain)
            if name == "loop" and step is not None:
                self._check_loop_ref(path, step, chain)
        self.check_static_bounds(path, raw if expr is None else expr, expression=expr is not None)

    @_collects
    def check_until(self, path: tuple, s: StepSpec) -> None:
        """``until`` is an expression over the loop's body results (and params, run, env, loop)."""
        assert s.loop is not None
        where = path + ("loop", "until")
        body = {b.id for b in s.loop.steps}
        try:
            refs = template_refs(split_expression(s.loop.until) or s.loop.until.strip(), expression=True)
        except (TemplateError, EvaluationLimit):
            refs = []  # bad syntax: the check below reports it
        for name, chain in refs:
            if name == "steps" and chain and isinstance(chain[0], str) and chain[0] not in body:
                raise self.err(where, f"until may reference only steps of the loop's body "
                                      f"({', '.join(sorted(body))}), not {chain[0]!r}{_hint(chain[0], body)}")
        # checked as if it were a step after the whole body: every body step is upstream of it
        self.check_template(where, s.loop.until, step=s, allow={"params", "run", "env", "steps", "loop"},
                            expression=True)

    def check_static_bounds(self, path: tuple, raw: str, *, expression: bool) -> None:
        """Expressions that depend only on params and Jinja's globals are evaluated now, so one
        that would exceed an evaluation bound (``9 ** 999999999``) is refused by ``validate``."""
        for e in expressions(raw, expression=expression):
            names = {name for name, _ in template_refs(e, expression=True)}
            if names <= _JINJA_GLOBALS | {"params"}:
                try:
                    check_bounds(e, {"params": self.params})
                except EvaluationLimit as exc:
                    raise self.err(path, str(exc)) from None

    @_collects
    def check_env(self, path: tuple, env: dict[str, str]) -> None:
        """A variable that bash (or what it starts) uses to run or find code (``BASH_ENV``,
        ``PS4``, ``PATH``, ``LD_PRELOAD`` …) may not get a template value, except from the
        worker's own environment or run fields."""
        for key, value in env.items():
            if key in SPECIAL_VARS and "${{" in value:
                try:
                    names = {n for n, _ in template_refs(value)}
                except (TemplateError, EvaluationLimit):
                    continue  # bad syntax: check_template reports it
                if not names <= {"env", "run"}:
                    raise self.err(path + (key,), f"{key} is used by bash or the programs it starts to run or "
                                   "find code: it may only use env.* and run.* in templates", key=True)

    @_collects
    def check_workdir(self, path: tuple, raw: str) -> None:
        """A static relative workdir must stay inside the spec's directory (a templated one is
        checked when rendered)."""
        if "${{" in raw or raw.startswith("/"):
            return
        try:
            check_relpath(raw.rstrip("/") or ".", "workdir")
        except ValueError as exc:
            raise self.err(path, f"{exc} (it is relative to the spec's directory and may not leave it)") from None

    @_collects
    def check_shell_string(self, path: tuple, raw: str) -> None:
        """A ``run``/``rollback`` string: every ``${{ }}`` must sit where a reference is safe."""
        if "${{" not in raw:
            return
        try:
            refused = check_shell(raw)
        except (TemplateError, EvaluationLimit):
            return  # bad syntax: check_template reports it
        if refused is not None:
            why, offset = refused
            line = raw.count("\n", 0, offset) + 1
            col = offset - (raw.rfind("\n", 0, offset) + 1) + 1
            raise self.err(path, f"{why} (script line {line}, column {col})")

    def _why(self, name: str, step: StepSpec | None) -> str:
        if name == "matrix":
            return " (only in a step with 'matrix')"
        if name == "item":
            return " (only in a step with 'foreach')"
        if name in STATUS_FUNCTIONS:
            return " (status functions are only for 'when')"
        if name == "prompt":
            return " (only in an agent's command)"
        if name == "attempt":
            return " (only in a step's run, prompt, env and check)"
        if name == "loop":
            return " (only in the body steps of a loop)"
        return ""

    def _check_loop_ref(self, path: tuple, step: StepSpec, chain: list[Any]) -> None:
        """``loop.iteration`` / ``loop.previous.steps.<body id>`` of the loop ``step`` is in (or is)."""
        if not chain or not isinstance(chain[0], str):
            return
        if chain[0] not in ("iteration", "previous"):
            raise self.err(path, f"unknown loop field {chain[0]!r}; available: iteration, previous")
        loop = step if step.loop is not None else self.by_id[self.loop_of[step.id]][1] if step.id in self.loop_of else None
        if loop is None or loop.loop is None or len(chain) < 3 or chain[0] != "previous" or chain[1] != "steps":
            return
        body = [b.id for b in loop.loop.steps]
        if isinstance(chain[2], str) and chain[2] not in body:
            raise self.err(path, f"loop.previous.steps.{chain[2]}: {chain[2]!r} is not a step of loop "
                                 f"{loop.id!r}'s body{_hint(chain[2], body)}")

    def _check_step_ref(self, path: tuple, step: StepSpec, ancestors: set[str], chain: list[Any]) -> None:
        ref = chain[0]
        if ref == step.id:
            raise self.err(path, f"step {ref!r} cannot reference its own outputs")
        if ref not in self.by_id:
            raise self.err(path, f"unknown step {ref!r}{_hint(ref, self.by_id)}")
        if ref not in ancestors:
            raise self.err(path, f"step {ref!r} is not upstream of {step.id!r} (add it to needs)")
        if len(chain) < 2 or not isinstance(chain[1], str):
            return
        part = chain[1]
        src = self.by_id[ref][1]
        fanout = src.matrix is not None or src.foreach is not None
        if part in ("instances", "by_key") and not fanout:
            raise self.err(path, f"steps.{ref}.{part}: step {ref!r} is not a fan-out step (no matrix or foreach); "
                                 f"use steps.{ref}.outputs, .artifacts or .status")
        if part not in ("outputs", "artifacts", "status", "instances", "by_key"):
            more = ", .status, .instances or .by_key" if fanout else " or .status"
            raise self.err(path, f"steps.{ref}.{part}: use steps.{ref}.outputs, .artifacts{more}")
        if len(chain) < 3 or part == "status":
            return
        if not fanout:
            self._check_result(path, ref, src, part, chain[2])
            return
        sel = chain[2]
        if part == "by_key" and isinstance(sel, str) and src.matrix is not None:
            keys = self._instance_keys(ref)
            if sel not in keys:
                raise self.err(path, f"step {ref!r} has no instance {sel!r}{_hint(sel, keys)}; "
                                     f"instances: {', '.join(keys)}")
        if part in ("outputs", "artifacts") and isinstance(sel, str):
            # one entry per instance: a name here would have to pick one of them
            raise self.err(path, self._ambiguous(ref, src, part, sel))
        if sel is None and part in ("outputs", "artifacts"):
            return  # a dynamic index: checked when rendered
        rest = chain[3:]
        if part in ("outputs", "artifacts"):
            if rest:
                self._check_result(path, ref, src, part, rest[0])
            return
        if rest and isinstance(rest[0], str):
            if rest[0] not in INSTANCE_FIELDS:
                raise self.err(path, f"steps.{ref}.{part}[...].{rest[0]}: an instance has "
                                     f"{', '.join(INSTANCE_FIELDS)}{_hint(rest[0], INSTANCE_FIELDS)}")
            if rest[0] in ("outputs", "artifacts") and len(rest) > 1:
                self._check_result(path, ref, src, rest[0], rest[1])

    def _check_result(self, path: tuple, ref: str, src: StepSpec, part: str, name: Any) -> None:
        """``name`` (a literal key; anything else is checked when rendered) must be one of the
        declared output values, or match a declared artifact glob, of step ``ref``."""
        if not isinstance(name, str):
            return
        if (part == "outputs" and src.outputs.values and name not in src.outputs.values
                and not (src.worktree and name in ("branch", "commit"))):  # added by the worktree
            raise self.err(
                path,
                f"step {ref!r} declares no output {name!r}{_hint(name, src.outputs.values)}; "
                f"declared: {', '.join(src.outputs.values)}",
            )
        if part == "artifacts" and not any(fnmatch.fnmatchcase(name, g) for g in src.outputs.artifacts):
            declared = ", ".join(src.outputs.artifacts) or "none"
            raise self.err(path, f"step {ref!r} declares no artifact matching {name!r}; declared: {declared}")

    def _ambiguous(self, ref: str, src: StepSpec, part: str, name: str) -> str:
        """What to write instead of ``steps.<ref>.<part>.<name>`` on fan-out step ``ref``."""
        keys = self._instance_keys(ref) if src.matrix is not None else ["0"]
        one = f"steps.{ref}.by_key['{keys[0]}'].{part}"
        head = (f"steps.{ref}.{part} is a list (one entry per instance of fan-out step {ref!r}), "
                f"so steps.{ref}.{part}[{name!r}] would be ambiguous; ")
        if part == "outputs":
            return (head + f"write steps.{ref}.outputs | map(attribute='{name}') | join(',') for every "
                    f"instance's value, or {one}.{name} for one instance's")
        return (head + f"take every instance's file with inputs: [{{from: {ref}, artifact: {name}}}] (one file "
                f"per instance at {ref}/<instance key>/{name}), or one instance's with {one}[{name!r}]")

    def _instance_keys(self, tid: str) -> list[str]:
        """Instance keys of matrix step ``tid``, in instance order (evaluated with the params)."""
        path, s, _ = self.by_id[tid]
        return [instance_key(concrete_id(tid, idv), tid) for idv, _ in self.matrix_instances(path, s, self.params)]

    def check_templates(self) -> None:
        base = {"params", "run", "env"}
        for k, v in self.spec.defaults.env.items():
            self.check_template(("defaults", "env", k), v, allow=base)
        self.check_env(("defaults", "env"), self.spec.defaults.env)
        if self.spec.defaults.workdir:
            self.check_template(("defaults", "workdir"), self.spec.defaults.workdir, allow=base)
            self.check_workdir(("defaults", "workdir"), self.spec.defaults.workdir)
        for name, agent in self.spec.agents.items():
            for i, item in enumerate(agent.command):
                self.check_template(("agents", name, "command", i), item, allow=base | {"prompt"})
            for k, v in agent.env.items():
                self.check_template(("agents", name, "env", k), v, allow=base)
            self.check_env(("agents", name, "env"), agent.env)
        # the names a step's templates may use (read only: shared by the steps that add none)
        step_allow = base | {"steps"}
        step_cmd_allow = step_allow | {"attempt"}
        for path, s, _ in self.templates:
            allow = step_allow
            if self._loop_at(path) is not None:
                allow = allow | {"loop"}
            if s.loop is not None:
                self.check_until(path, s)
            if s.matrix is not None:
                allow = allow | {"matrix"}
                for k, v in s.matrix.items():
                    if isinstance(v, str):
                        self.check_template(path + ("matrix", k), v, allow={"params", "run"})
            if s.foreach is not None:
                if "${{" not in s.foreach:
                    raise self.err(path + ("foreach",), "foreach must be a '${{ ... }}' expression giving a list")
                self.check_template(path + ("foreach",), s.foreach, step=s, allow=allow)
                allow = allow | {"item"}
            # `attempt` (number, previous) exists when an attempt renders its command: not in
            # `when`, `foreach`, `workdir` or `rollback`, which render outside any one attempt
            cmd_allow = step_cmd_allow if allow is step_allow else allow | {"attempt"}
            for f, c in (("run", s.run), ("check", s.check)):
                if isinstance(c, str):
                    self.check_template(path + (f,), c, step=s, allow=cmd_allow)
                    self.check_shell_string(path + (f,), c)
                elif isinstance(c, list):
                    for i, item in enumerate(c):
                        if _plain(item):
                            continue  # what check_template decides first, without a path built
                        self.check_template(path + (f, i), item, step=s, allow=cmd_allow)
            if isinstance(s.rollback, str):
                self.check_template(path + ("rollback",), s.rollback, step=s, allow=allow)
                self.check_shell_string(path + ("rollback",), s.rollback)
            elif isinstance(s.rollback, list):
                for i, item in enumerate(s.rollback):
                    self.check_template(path + ("rollback", i), item, step=s, allow=allow)
            if s.prompt is not None:
                self.check_template(path + ("prompt",), s.prompt, step=s, allow=cmd_allow)
            for k, v in s.env.items():
                self.check_template(path + ("env", k), v, step=s, allow=cmd_allow)
            self.check_env(path + ("env",), s.env)
            if s.workdir:
                self.check_template(path + ("workdir",), s.workdir, step=s, allow=allow)
                self.check_workdir(path + ("workdir",), s.workdir)
            if s.when is not None:
                self.check_template(path + ("when",), s.when, step=s, allow=allow | set(STATUS_FUNCTIONS), expression=True)
            if s.worktree is not None:
                for name in ("repo", "base", "branch"):
                    self.check_template(path + ("worktree", name), getattr(s.worktree, name), step=s,
                                        allow=allow | {"step", "attempt"})

    # ------------------------------------------------------------------ expansion
    def matrix_instances(self, path: tuple, s: StepSpec, params: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """The instances of ``s`` as ``(id values, matrix values)``, in instance order: the
        product of the axes in spec order, less the ``exclude`` matches, with ``include`` applied
        as GitHub Actions does. An included entry whose axis values match no combination is
        added; one that matches extends those combinations (its other keys are added or
        overwrite earlier additions, never an axis value) and leaves their ids unchanged."""
        if s.matrix is None:
            return [({}, {})]
        cached = self._combos.get(s.id)
        if cached is not None:
            return cached
        axes: list[tuple[str, list[Any]]] = []
        for key, raw in s.matrix.items():
            if key in MATRIX_MODIFIERS:
                continue
            where = path + ("matrix", key)
            values = self._matrix_value(where, raw, params)
            if not isinstance(values, list):
                raise self.err(where, f"must give a list, got {type(values).__name__} {to_text(values)[:40]!r}")
            if not values:
                raise self.err(where, "empty list: a matrix axis needs at least one value")
            axes.append((key, values))
        total = 1
        for _, vals in axes:
            total *= len(vals)
        if total > MAX_FANOUT:
            raise self.err(path + ("matrix",), f"{total} instances exceed the fan-out limit of {MAX_FANOUT}")
        names = [k for k, _ in axes]
        exclude = self._matrix_entries(path, s, "exclude", params)
        include = self._matrix_entries(path, s, "include", params)
        for j, entry in enumerate(exclude):
            for key in entry:
                if key not in names:
                    raise self.err(path + ("matrix", "exclude", j, key),
                                   f"{key!r} is not a matrix axis; axes: {', '.join(names) or 'none'}", key=True)
        combos = [dict(zip(names, combo, strict=True)) for combo in itertools.product(*[v for _, v in axes])] if axes else []
        combos = [c for c in combos if not any(all(c[k] == v for k, v in e.items()) for e in exclude)]
        if not combos and axes and not include:
            raise self.err(path + ("matrix", "exclude"), "removes every combination")
        out: list[tuple[dict[str, Any], dict[str, Any]]] = [(c, dict(c)) for c in combos]
        for entry in include:
            matched = False
            for idv, values in out[: len(combos)]:
                if all(idv[k] == v for k, v in entry.items() if k in idv):
                    values.update(entry)
                    matched = True
            if not matched:
                out.append((dict(entry), dict(entry)))
        if len(out) > MAX_FANOUT:
            raise self.err(path + ("matrix",), f"{len(out)} instances exceed the fan-out limit of {MAX_FANOUT}")
        self._combos[s.id] = out
        return out

    def _matrix_value(self, where: tuple, raw: Any, params: dict[str, Any]) -> Any:
        if not isinstance(raw, str):
            return raw
        variables = {"params": params, "run": {"name": self.spec.name, "spec_dir": self.spec._spec_dir}}
        try:
            values = evaluate_expression(raw, variables)
        except _EVAL_OR_LIMIT as exc:
            raise self.err(where, f"cannot evaluate: {getattr(exc, 'message', None) or exc}") from None
        if isinstance(values, str):
            try:
                values = json.loads(values)
            except ValueError:
                pass
        return values

    def _matrix_entries(self, path: tuple, s: StepSpec, what: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        assert s.matrix is not None
        if what not in s.matrix:
            return []
        where = path + ("matrix", what)
        value = self._matrix_value(where, s.matrix[what], params)
        if isinstance(value, str):
            raise self.err(where, f"must give a list of mappings, got str {value[:40]!r}")
        try:
            check_matrix_entries(value, what)
        except ValueError as exc:
            raise self.err(where, str(exc)) from None
        return list(value)

    def inputs_for(self, path: tuple, s: StepSpec, instances: dict[str, list[str]]) -> list[InputDecl]:
        """The input declarations of ``s``. From a fan-out step every instance's file is an input,
        at ``<as>/<instance key>/<artifact>`` (``as`` defaults to the source step's id): one
        declaration per instance of a matrix step; ONE for a foreach step, with ``dest`` the
        directory (its children are known at run time only, the attempt lays them out)."""
        out: list[InputDecl] = []
        files: dict[str, int] = {}  # destination -> index of the input that writes it
        dirs: dict[str, int] = {}  # directories above those files
        patterns: list[tuple[int, list[str | None]]] = []  # foreach inputs: None is any instance key
        ancestors = self.graph.ancestors(s.id) if s.inputs else set()
        for k, inp in enumerate(s.inputs):
            where = path + ("inputs", k)
            src_id = inp.from_
            if src_id not in self.by_id:
                raise self.err(where + ("from",), f"unknown step {src_id!r}{_hint(src_id, self.by_id)}")
            if src_id not in ancestors:
                raise self.err(where + ("from",), f"step {src_id!r} is not upstream of {s.id!r} (add it to needs)")
            if src_id in self.loop_of and self.loop_of.get(s.id) != self.loop_of[src_id]:
                raise self.err(where + ("from",), f"step {src_id!r} is in the body of loop {self.loop_of[src_id]!r}: "
                                                  "inputs from it are available only inside the loop")
            src = self.by_id[src_id][1]
            if not any(fnmatch.fnmatchcase(inp.artifact, g) for g in src.outputs.artifacts):
                declared = ", ".join(src.outputs.artifacts) or "none"
                raise self.err(where + ("artifact",), f"step {src_id!r} declares no artifact matching {inp.artifact!r}; declared: {declared}")
            fanout = src.matrix is not None or src.foreach is not None
            dest = inp.as_ or (src_id if fanout else inp.artifact)
            if src.foreach is not None:
                out.append(InputDecl(step=src_id, artifact=inp.artifact, dest=dest))
                patterns.append((k, [*dest.split("/"), None, *inp.artifact.split("/")]))
                continue
            decls = [InputDecl(step=cid, artifact=inp.artifact, dest=f"{dest}/{instance_key(cid, src_id)}/{inp.artifact}")
                     for cid in instances[src_id]] if src.matrix is not None else [
                InputDecl(step=src_id, artifact=inp.artifact, dest=dest)]
            for d in decls:
                if d.dest in files:
                    raise self.err(where, f"input destination {d.dest!r} is already used by inputs[{files[d.dest]}]")
                parts = d.dest.split("/")
                above = ["/".join(parts[:n]) for n in range(1, len(parts))]
                clash = dirs.get(d.dest)
                if clash is None:
                    clash = next((files[a] for a in above if a in files), None)
                if clash is not None:
                    raise self.err(where, f"input destination {d.dest!r} overlaps a destination of inputs[{clash}] "
                                          "(one would be a file inside the other)")
                files[d.dest] = k
                for a in above:
                    dirs.setdefault(a, k)
                out.append(d)
        for n, (k, pattern) in enumerate(patterns):
            others = [(j, f.split("/")) for f, j in files.items()] + patterns[:n]
            for j, parts in others:
                if j != k and all(a is None or b is None or a == b for a, b in zip(pattern, parts, strict=False)):
                    first, second = sorted((j, k))
                    raise self.err(path + ("inputs", second), f"input destinations of inputs[{first}] and "
                                   f"inputs[{second}] overlap (one fan-out input fills "
                                   f"{'/'.join(p or '<instance key>' for p in pattern)})")
        return out

    def concrete(self, path: tuple, s: StepSpec, fin: bool, cid: str, needs: list[str], values: dict[str, Any],
                 inputs: list[InputDecl]) -> ConcreteStep:
        """The concrete step ``cid`` of template ``s`` (defaults applied)."""
        d = self.spec.defaults
        tid = s.id
        timeout = s.timeout if s.timeout is not None else d.timeout
        if timeout is not None and timeout <= 0:
            raise self.err(path + ("timeout",) if s.timeout is not None else ("defaults", "timeout"), "timeout must be positive")
        r = s.retries or d.retries or _NO_RETRIES
        # constructed, not validated: every value below comes from the validated spec
        # (validating 10,000 steps again, nested models and all, was a second of a submit)
        policy = RetryPolicy.construct_trusted(
            limit=r.limit,
            backoff_s=r.backoff,
            max_backoff_s=max(r.max_backoff, r.backoff),
            retry_on_exit_codes=list(r.retry_on.exit_codes),
            retry_on_patterns=list(r.retry_on.patterns),
        )
        return ConcreteStep.construct_trusted(
            id=cid,
            template_id=tid,
            needs=list(needs),
            run=_copy(s.run),
            agent=s.agent,
            prompt=s.prompt,
            env={**d.env, **s.env},
            workdir=s.workdir if s.workdir is not None else d.workdir,
            timeout_s=timeout,
            retries=policy,
            when=s.when if s.when is not None else ("${{ always() }}" if fin else "${{ success() }}"),
            matrix=dict(values),
            foreach=s.foreach,
            outputs_values=list(s.outputs.values),
            outputs_artifacts=list(s.outputs.artifacts),
            inputs=list(inputs),
            rollback=_copy(s.rollback),
            check=_copy(s.check),
            worktree=s.worktree,
            cache=s.cache,
            tags=list(s.tags),
            is_finally=fin,
            approval=s.approval,
            budget=s.budget,
        )

    def loop_def(self, path: tuple, s: StepSpec, fin: bool) -> LoopDef:
        """The compiled body of loop ``s``: body-local ids and needs, in a topological order."""
        assert s.loop is not None
        body = {b.id: (path + ("loop", "steps", j), b) for j, b in enumerate(s.loop.steps)}
        order = self.graph.topological(list(body).index, body)
        steps = []
        for bid in order:
            bpath, b = body[bid]
            inputs = self.inputs_for(bpath, b, {})
            steps.append(self.concrete(bpath, b, fin, bid, list(dict.fromkeys(b.needs)), {}, inputs))
        return LoopDef(max_iterations=s.loop.max_iterations, until=s.loop.until, on_max=s.loop.on_max, body=steps)

    def compile(self) -> CompiledWorkflow:
        graph = self.check_ids_and_needs()
        self.check_agents()
        params: dict[str, Any] = {}
        with self.collect():
            params = self.resolve_params()
        self.params = params
        self.check_templates()
        raise_all(self.errors)
        order_index = {s.id: n for n, (_, s, _) in enumerate(self.templates)}
        topo = graph.topological(order_index.__getitem__)
        instances: dict[str, list[str]] = {}
        steps: dict[str, ConcreteStep] = {}
        for tid in topo:
            if tid in self.loop_of:
                continue  # built with its loop, run per iteration
            path, s, fin = self.by_id[tid]
            needs: list[str] = []
            for need in list(dict.fromkeys(s.needs)) + sorted(
                (p for p in graph.predecessors(tid) if p not in s.needs and p not in self.loop_of),
                key=lambda t: order_index[t]
            ):
                for cid in instances[need]:
                    if cid not in needs:
                        needs.append(cid)
            ids: list[str] = []
            combos = self.matrix_instances(path, s, params)
            inputs = self.inputs_for(path, s, instances)
            for idv, values in combos:
                cid = concrete_id(tid, idv)
                # refused here, not by a store write at run time (a foreach child adds `[999]`)
                room = MAX_STEP_ID - (len(f"[{MAX_FANOUT - 1}]") if s.foreach is not None else 0)
                if len(cid) > room:
                    where = path + (("matrix",) if values else ("id",))
                    suffix = " with its foreach suffix [999]" if s.foreach is not None else ""
                    raise self.err(where, f"step id {cid[:40]!r}...{suffix} is longer than the limit of "
                                          f"{MAX_STEP_ID} characters")
                if cid in steps:
                    raise self.err(path + ("matrix",), f"two matrix instances get the same id {cid!r}")
                steps[cid] = self.concrete(path, s, fin, cid, needs, values, inputs)
                if s.loop is not None:
                    steps[cid].loop = self.loop_def(path, s, fin)
                ids.append(cid)
            instances[tid] = ids
            if len(steps) > MAX_STEPS:
                raise self.err(path, f"the workflow expands to more than {MAX_STEPS} steps")
        wf = CompiledWorkflow(
            name=self.spec.name,
            description=self.spec.description,
            params=params,
            secret_params=[n for n, p in self.spec.params.items() if p.secret],
            agents=self.spec.agents,
            on_failure=self.spec.on_failure,
            max_parallel=self.spec.max_parallel,
            budget=self.spec.budget,
            steps=steps,
            spec_dir=self.spec._spec_dir,
            source=self.source,
        )
        wf.spec_hash = spec_hash_of(wf)
        return wf


def _copy(command: list[str] | str | None) -> list[str] | str | None:
    """A step's own copy of a command list (validation used to make one; instances share no list)."""
    return list(command) if isinstance(command, list) else command


def reference_errors(spec: Spec) -> list[SpecError]:
    """Every structure and reference error of ``spec`` (ids, needs, cycles, agents, every
    template), checked without param values: what ``validate`` adds to a spec's field errors."""
    c = _Compiler(spec, {}, spec._source)
    c.check_ids_and_needs()
    c.check_agents()
    c.check_templates()
    return c.errors


def compile_workflow(spec: Spec, params: dict[str, Any], *, source: str = "<spec>") -> CompiledWorkflow:
    """Apply ``params`` (``-p`` strings are coerced to the declared types; typed values are
    checked), expand matrices, check every template statically, and build the DAG.
    SpecError (exit 2, one line, ``file:line:col: field: message``) on any problem."""
    with paused_gc():
        return _Compiler(spec, dict(params or {}), source).compile()


def compile_file(path: Path, params: dict[str, Any]) -> CompiledWorkflow:
    """:func:`load_spec` + :func:`compile_workflow`."""
    with paused_gc():
        spec = load_spec(Path(path))
        return compile_workflow(spec, params, source=spec._source)


def executable_warnings(spec: Spec, search_path: str | None = None) -> list[str]:
    """``file:line:col: field: 'x' is not on PATH`` for each agent's ``command[0]`` and each
    ``run``/``rollback`` argv[0] that is a bare name (no ``/``, no template) which
    ``search_path`` (default: this process's PATH) does not find. Only a warning: the worker
    that runs the step may have a different PATH."""
    import shutil

    found: list[str] = []
    candidates: list[tuple[tuple, str]] = [(("agents", name, "command", 0), a.command[0])
                                           for name, a in spec.agents.items()]
    for i, s in enumerate(spec.steps):
        candidates += [(("steps", i, f, 0), c[0]) for f, c in (("run", s.run), ("rollback", s.rollback))
                       if isinstance(c, list)]
    for i, s in enumerate(spec.finally_):
        candidates += [(("finally", i, f, 0), c[0]) for f, c in (("run", s.run), ("rollback", s.rollback))
                       if isinstance(c, list)]
    for path, exe in candidates:
        if "/" in exe or "${{" in exe or not exe.strip():
            continue
        if shutil.which(exe, path=search_path) is None:
            found.append(str(error_at(spec._source, spec._positions, path, f"{exe!r} is not on PATH")))
    return found
