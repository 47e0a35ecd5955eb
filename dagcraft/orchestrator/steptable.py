"""A run's step definitions held compactly: what a worker keeps per step whatever the run's size.

A worker serving a 10,000-step run needs, for every step, only its id, its needs and a few
flags; the full :class:`ConcreteStep` only for the steps it claims, gates or renders. So a
:class:`StepTable` keeps per step its id, its needs (tuples of the same id strings) and the
index of its *shape* — the step's JSON less ``id``, ``template_id`` and ``needs``, stored once
for all the steps that share it (in a generated DAG, nearly all of them) — and builds models
on demand, keeping a bounded number. :func:`read_run_record` fills one from ``run.json``
one step at a time, so loading never holds every step's parsed data at once either.
"""

from __future__ import annotations

import json
import re
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from dagcraft.workflows import ConcreteStep

_OWN = ("id", "template_id", "needs")  # the fields not part of a step's shape


class StepTable(Mapping[str, ConcreteStep]):
    """Step id → :class:`ConcreteStep`, in insertion (submission) order, built on demand.

    Guarantees: ``table[sid]`` equals the model validated from the step's stored JSON; at
    most ``cache_size`` step models and ``cache_size`` shape models are held at once,
    whatever the number of steps; every distinct shape was validated when it was added (a
    table never holds a step that would not validate). Returned models are shared with the
    cache: treat them as read-only (nothing in dagcraft mutates a step definition)."""

    def __init__(self, cache_size: int = 256) -> None:
        self.cache_size = max(1, cache_size)
        self._pos: dict[str, int] = {}
        self._ids: list[str] = []
        self._needs: list[tuple[str, ...]] = []
        self._shape = array("I")
        self._tids: dict[str, str] = {}  # only where template_id differs from id
        self._shapes: list[str] = []
        self._shape_index: dict[str, int] = {}
        self._cache: OrderedDict[str, ConcreteStep] = OrderedDict()
        self._protos: OrderedDict[int, ConcreteStep] = OrderedDict()
        self._derived: dict[tuple[int, Callable[[ConcreteStep], Any]], Any] = {}  # see of_shape
        #: counts of models built (steps, shapes): what tests of the bound count
        self.built = 0
        # attempts read steps from their threads (``WorkItem.wf.steps``): the caches' LRU
        # moves are made under this lock; filling the table is the view's (main) thread's
        self._lock = threading.Lock()

    # -- filling ---------------------------------------------------------------------------
    def add_data(self, data: Mapping[str, Any]) -> str:
        """Add, or replace, a step from its JSON data (``ConcreteStep.model_dump(mode="json")``
        or as stored). Returns its id. ValidationError if it is not a valid step."""
        shape_data = {k: v for k, v in data.items() if k not in _OWN}
        sid, tid, needs = data.get("id"), data.get("template_id"), data.get("needs")
        if not (isinstance(sid, str) and isinstance(tid, str) and isinstance(needs, list)
                and all(isinstance(n, str) for n in needs)):
            ConcreteStep.model_validate(data)  # raises the precise ValidationError
            raise ValueError("step id, template_id and needs must be strings")  # pragma: no cover
        shape = json.dumps(shape_data, sort_keys=True, separators=(",", ":"))
        k = self._shape_index.get(shape)
        if k is None:
            # each distinct shape is validated once, with this step's own fields
            ConcreteStep.model_validate(data)
            k = len(self._shapes)
            self._shapes.append(shape)
            self._shape_index[shape] = k
        # needs refer to the id strings already held, not copies of them
        got = tuple(self._ids[self._pos[n]] if n in self._pos else n for n in needs) if needs else ()
        pos = self._pos.get(sid)
        if pos is None:
            self._pos[sid] = len(self._ids)
            self._ids.append(sid)
            self._needs.append(got)
            self._shape.append(k)
        else:
            self._needs[pos] = got
            self._shape[pos] = k
            with self._lock:
                self._cache.pop(sid, None)
        if tid != sid:
            self._tids[sid] = tid
        else:
            self._tids.pop(sid, None)
        return sid

    def add(self, step: ConcreteStep) -> None:
        """Add, or replace, a step from its model."""
        self.add_data(step.model_dump(mode="json"))
        self._remember(step.id, step)

    def reorder(self, order: Sequence[str]) -> None:
        """Put the steps in ``order`` (which must name each step exactly once)."""
        assert len(order) == len(self._ids) and set(order) == set(self._pos)
        old = [self._pos[sid] for sid in order]
        self._ids = [self._ids[p] for p in old]
        self._needs = [self._needs[p] for p in old]
        self._shape = array("I", (self._shape[p] for p in old))
        self._pos = {sid: i for i, sid in enumerate(self._ids)}
        # needs parsed before the step they name refer to that step's id string now
        self._needs = [tuple(self._ids[self._pos[n]] if n in self._pos else n for n in nd) if nd else ()
                       for nd in self._needs]

    # -- reading ---------------------------------------------------------------------------
    def __getitem__(self, sid: str) -> ConcreteStep:
        with self._lock:
            got = self._cache.get(sid)
            if got is not None:
                self._cache.move_to_end(sid)
                return got
        pos = self._pos[sid]
        data = json.loads(self._shapes[self._shape[pos]])
        data.update(id=sid, template_id=self._tids.get(sid, sid), needs=list(self._needs[pos]))
        step = ConcreteStep.model_validate(data)
        self._remember(sid, step)
        return step

    def _remember(self, sid: str, step: ConcreteStep) -> None:
        with self._lock:
            self.built += 1
            self._cache[sid] = step
            self._cache.move_to_end(sid)
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def __contains__(self, sid: object) -> bool:
        return sid in self._pos

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def canonical(self, sid: str) -> str:
        """The table's own string for id ``sid`` (``sid`` itself if it is not a step): maps keyed
        by it then share one string per step instead of a copy per record read."""
        pos = self._pos.get(sid)
        return sid if pos is None else self._ids[pos]

    def position(self, sid: str) -> int:
        """The step's position in insertion order (0 for an unknown id)."""
        return self._pos.get(sid, 0)

    def needs_of(self, sid: str) -> tuple[str, ...]:
        """The step's needs, without building its model."""
        return self._needs[self._pos[sid]]

    def template_id_of(self, sid: str) -> str:
        return self._tids.get(sid, sid) if sid in self._pos else self[sid].template_id

    def of_shape(self, sid: str, derive: Callable[[ConcreteStep], Any]) -> Any:
        """``derive(step)`` for a function of the step's shape alone (never of its id,
        template id or needs), computed once per shape and ``derive``: per-step checks over a
        generated DAG cost one call per distinct step body."""
        key = (self._shape[self._pos[sid]], derive)
        if key not in self._derived:
            step = self[sid]
            self._derived[key] = derive(step)
        return self._derived[key]

    def attr(self, sid: str, name: str) -> Any:
        """Field ``name`` of the step (any but id, template_id and needs), read from its shape's
        model: scans over every step (finally steps, compensable steps) build one model per
        shape, not one per step."""
        assert name not in _OWN, name
        k = self._shape[self._pos[sid]]
        with self._lock:
            proto = self._protos.get(k)
            if proto is None:
                data = json.loads(self._shapes[k])
                data.update(id=sid, template_id=self._tids.get(sid, sid), needs=[])
                proto = self._protos[k] = ConcreteStep.model_validate(data)
                self.built += 1
                if len(self._protos) > self.cache_size:
                    self._protos.popitem(last=False)
            else:
                self._protos.move_to_end(k)
        return getattr(proto, name)


class Dependents:
    """The reverse of a step table's needs: for each step, the steps that name it.

    The steps the table holds when this is built are indexed as two int arrays (positions,
    grouped by the step they need: 4 bytes a step and 4 a need, where a dict of lists of ids
    took ~110 bytes a step); steps added after (foreach children, loop body steps) are added
    one by one with :meth:`add`. Guarantee: ``of(sid)`` names every step, indexed or added,
    whose needs name ``sid``, each once per need, indexed steps first in table order. Built
    after the table's last :meth:`StepTable.reorder` (positions are the table's)."""

    def __init__(self, steps: StepTable) -> None:
        self._steps = steps
        n = self._n = len(steps)
        pos = steps._pos
        starts = array("I", bytes(4 * (n + 1)))
        for nd in steps._needs[:n]:
            for need in nd:
                p = pos.get(need)
                if p is not None:
                    starts[p + 1] += 1
        for i in range(n):
            starts[i + 1] += starts[i]
        fill = array("I", starts)
        targets = array("I", bytes(4 * starts[n]))
        #: needs naming no step of the table at build time (a step added later), by name
        self._extra: dict[str, list[str]] = {}
        for i, nd in enumerate(steps._needs[:n]):
            for need in nd:
                p = pos.get(need)
                if p is None:
                    self._extra.setdefault(need, []).append(steps._ids[i])
                else:
                    targets[fill[p]] = i
                    fill[p] += 1
        self._starts, self._targets = starts, targets

    def add(self, sid: str, needs: Sequence[str]) -> None:
        """Index a step added to the table after this was built."""
        for need in needs:
            self._extra.setdefault(need, []).append(sid)

    def of(self, sid: str) -> list[str]:
        p = self._steps._pos.get(sid)
        ids = self._steps._ids
        out = [ids[t] for t in self._targets[self._starts[p]:self._starts[p + 1]]] if p is not None and p < self._n else []
        more = self._extra.get(sid)
        return out + more if more else out


# -- reading run.json one step at a time ----------------------------------------------------------
_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def _skip_ws(text: str, pos: int) -> int:
    m = _WS.match(text, pos)
    return m.end() if m else pos


def _members(text: str, pos: int, visit: Callable[[str, int], int]) -> int:
    """Walk the JSON object at ``text[pos]``: ``visit(key, value_pos)`` consumes each value
    and returns where it ends. Returns where the object ends. ValueError if malformed."""
    pos = _skip_ws(text, pos)
    if text[pos:pos + 1] != "{":
        raise ValueError(f"expected an object at {pos}")
    pos = _skip_ws(text, pos + 1)
    if text[pos:pos + 1] == "}":
        return pos + 1
    while True:
        key, pos = _DECODER.raw_decode(text, pos)
        if not isinstance(key, str):
            raise ValueError(f"expected a key at {pos}")
        pos = _skip_ws(text, pos)
        if text[pos:pos + 1] != ":":
            raise ValueError(f"expected ':' at {pos}")
        pos = _skip_ws(text, visit(key, _skip_ws(text, pos + 1)))
        c = text[pos:pos + 1]
        if c == "}":
            return pos + 1
        if c != ",":
            raise ValueError(f"expected ',' or '}}' at {pos}")
        pos = _skip_ws(text, pos + 1)


def read_run_record(text: str, table: StepTable | None = None) -> tuple[dict[str, Any], dict[str, Any], StepTable]:
    """``run.json``'s text as (its fields but ``workflow``, the workflow's fields but
    ``steps``, its steps as a :class:`StepTable`), parsed one step at a time: the parsed data
    of one step is alive at once, never of all. ValueError (ValidationError) if malformed."""
    table = table if table is not None else StepTable()
    record: dict[str, Any] = {}
    workflow: dict[str, Any] = {}

    def value(into: dict[str, Any]) -> Callable[[str, int], int]:
        def visit(key: str, pos: int) -> int:
            into[key], end = _DECODER.raw_decode(text, pos)
            return int(end)
        return visit

    def step(key: str, pos: int) -> int:
        data, end = _DECODER.raw_decode(text, pos)
        if not isinstance(data, dict):
            raise ValueError(f"step {key!r} is not an object")
        if table.add_data(data) != key:
            raise ValueError(f"step {key!r} has another id")
        return int(end)

    def in_workflow(key: str, pos: int) -> int:
        if key == "steps":
            return _members(text, pos, step)
        return value(workflow)(key, pos)

    def top(key: str, pos: int) -> int:
        if key == "workflow":
            return _members(text, pos, in_workflow)
        return value(record)(key, pos)

    end = _members(text, 0, top)
    if _skip_ws(text, end) != len(text):
        raise ValueError("extra data after the record")
    return record, workflow, table
