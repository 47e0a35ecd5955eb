"""A large spec is loaded and compiled in work proportional to its size, with no repeated
pass: counts, never timings (issue 12: a 10,000-step submit in under 2 s)."""

from __future__ import annotations

import gc
import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from dagcraft.workflows import CompiledWorkflow, ConcreteStep, RetryPolicy, compile_file, load_spec
from dagcraft.workflows import loader as loader_mod

N = 2_000
LAYER = 50


def _dag_text(n: int = N) -> str:
    """``n`` steps in layers of LAYER; each step after the first layer needs one of the previous."""
    lines = ["name: big", "steps:"]
    for i in range(n):
        lines.append(f"  - id: s{i}")
        lines.append('    run: ["true"]')
        if i >= LAYER:
            lines.append(f"    needs: [s{i - LAYER}]")
    return "\n".join(lines) + "\n"


@pytest.fixture
def big_spec(tmp_path: Path) -> Path:
    p = tmp_path / "big.yaml"
    p.write_text(_dag_text())
    return p


def _count_calls(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[int]:
    calls = [0]
    original = getattr(owner, name)

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return calls


def test_spec_text_is_parsed_once(big_spec: Path, monkeypatch: pytest.MonkeyPatch):
    # the bounds (depth, alias-expanded size) are checked on the composed nodes, not on a
    # second parse of the text
    parsers = _count_calls(monkeypatch, loader_mod._Loader, "__init__")
    spec = load_spec(big_spec)
    assert len(spec.steps) == N
    assert parsers[0] == 1


def test_scalar_tags_are_resolved_once_per_distinct_scalar(big_spec: Path, monkeypatch: pytest.MonkeyPatch):
    resolved = _count_calls(monkeypatch, yaml.resolver.BaseResolver, "resolve")
    load_spec(big_spec)
    # distinct scalars: every id twice at most (its own, and as a need) plus the keys; the
    # document has ~3 scalars per step more than that (keys repeated per step)
    distinct = 2 * N + 10
    assert 0 < resolved[0] <= distinct + N // 10  # + collections (one per mapping/sequence kind)


def test_no_garbage_collection_while_loading_and_compiling(big_spec: Path):
    runs: list[int] = []

    def note(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            runs.append(info["generation"])

    assert gc.isenabled()
    gc.callbacks.append(note)
    try:
        wf = compile_file(big_spec, {})
    finally:
        gc.callbacks.remove(note)
    assert len(wf.steps) == N
    # none: not one per 700 allocations throughout (a thousand or more here), nor the young
    # collection owed on leaving a block (it would walk everything the block built)
    assert runs == []
    assert gc.isenabled()


def test_leaving_paused_gc_owes_no_collection():
    from dagcraft.workflows import paused_gc

    runs: list[int] = []

    def note(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            runs.append(info["generation"])

    gc.callbacks.append(note)
    try:
        with paused_gc():
            kept = [[i] for i in range(50_000)]  # tracked objects, as a load or compile makes
        more = [[i] for i in range(10)]  # the next allocations: no collection over `kept`
    finally:
        gc.callbacks.remove(note)
    assert gc.get_count()[0] < gc.get_threshold()[0]
    assert runs == [] and len(kept) + len(more) == 50_010


def test_concrete_steps_are_built_without_revalidation(big_spec: Path, monkeypatch: pytest.MonkeyPatch):
    spec = load_spec(big_spec)
    built = _count_calls(monkeypatch, ConcreteStep, "__init__")
    policies = _count_calls(monkeypatch, RetryPolicy, "__init__")
    from dagcraft.workflows import compile_workflow

    wf = compile_workflow(spec, {}, source=spec._source)
    assert (built[0], policies[0]) == (0, 0)
    # what was built unvalidated is exactly what validation gives
    assert CompiledWorkflow.model_validate(wf.model_dump()) == wf
    # and no two steps share a mutable command list (validation used to copy each)
    runs = [id(s.run) for s in wf.steps.values()]
    assert len(set(runs)) == len(runs)


def test_paused_gc_restores_the_collector_as_it_was():
    from dagcraft.workflows import paused_gc

    with paused_gc():
        assert not gc.isenabled()
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()  # nested: the outer block still has it off
    assert gc.isenabled()
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()  # off before, off after
    finally:
        gc.enable()


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``code``."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_compiling_a_spec_imports_no_networkx(big_spec: Path):
    loaded = _modules_after(f"from dagcraft.workflows import compile_file\ncompile_file({str(big_spec)!r}, {{}})")
    assert "dagcraft.workflows.compile" in loaded
    assert "networkx" not in loaded


def test_compile_orders_steps_as_networkx_does():
    import random

    import networkx as nx

    from dagcraft.workflows.compile import _Graph

    rng = random.Random(12)
    for _ in range(50):
        n = rng.randint(1, 40)
        nodes = [f"n{i}" for i in rng.sample(range(n), n)]
        ours, theirs = _Graph(nodes), nx.DiGraph()
        theirs.add_nodes_from(nodes)
        for j, v in enumerate(nodes):
            for u in rng.sample(nodes[:j], min(j, rng.randint(0, 3))):
                ours.add_edge(u, v)
                theirs.add_edge(u, v)
        rank = {v: rng.random() for v in nodes}
        assert ours.topological(rank.__getitem__) == list(nx.lexicographical_topological_sort(theirs, key=rank.__getitem__))
        assert all(ours.ancestors(v) == nx.ancestors(theirs, v) for v in nodes)
        assert ours.find_cycle() == []
        ours.add_edge(nodes[-1], nodes[0])
        theirs.add_edge(nodes[-1], nodes[0])
        expected = [] if nx.is_directed_acyclic_graph(theirs) else [(u, v) for u, v, *_ in nx.find_cycle(theirs)]
        assert ours.find_cycle() == expected


def test_step_fields_have_no_default_that_validation_deep_copies():
    from dagcraft.workflows.spec import InputSpec, OutputsSpec, StepSpec

    # pydantic deep-copies an unhashable default each time it applies one: per step of a spec
    copied = [f"{m.__name__}.{name}" for m in (StepSpec, OutputsSpec, InputSpec)
              for name, field in m.model_fields.items() if isinstance(field.default, (list, dict, set))]
    assert copied == []
    step = StepSpec.model_validate({"id": "a", "run": ["true"]})
    assert (step.needs, step.env, step.inputs, step.tags, step.outputs.values) == ([], {}, [], [], [])
    assert step.model_fields_set == {"id", "run"}


def test_construct_trusted_is_model_construct():
    from dagcraft.workflows.spec import InputDecl

    values = {"id": "a[x=1]", "template_id": "a", "needs": ["b"], "run": ["true"], "matrix": {"x": 1},
              "inputs": [InputDecl(step="b", artifact="o", dest="o")]}
    ours, theirs = ConcreteStep.construct_trusted(**values), ConcreteStep.model_construct(**values)
    assert ours == theirs and list(vars(ours)) == list(vars(theirs))
    assert ours.model_fields_set == theirs.model_fields_set == set(values)
    assert ours.env == {} and ours.env is not ConcreteStep.construct_trusted(**values).env  # defaults not shared
    assert ours.model_dump() == ConcreteStep.model_validate(ours.model_dump()).model_dump()
    assert RetryPolicy.construct_trusted(limit=2) == RetryPolicy.model_construct(limit=2)


def test_the_package_names_resolve_lazily_to_their_modules():
    import dagcraft.workflows as wf_pkg

    assert set(wf_pkg.__all__) == set(wf_pkg._HOME) and set(wf_pkg.__all__) <= set(dir(wf_pkg))
    for name in wf_pkg.__all__:
        value = getattr(wf_pkg, name)
        assert getattr(importlib.import_module(f"dagcraft.workflows.{wf_pkg._HOME[name]}"), name) is value
    with pytest.raises(AttributeError):
        wf_pkg.no_such_name  # noqa: B018
    from dagcraft.workflows import compile as compile_mod

    assert compile_mod.instance_key("review[a=1]", "review") == "a=1"  # still importable from compile


def test_a_valid_spec_is_built_without_positions_and_an_error_still_names_its_line(
        big_spec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from dagcraft.errors import SpecError
    from dagcraft.workflows import compile_workflow

    marks = _count_calls(monkeypatch, loader_mod, "_mark")
    parsers = _count_calls(monkeypatch, loader_mod._Loader, "__init__")
    spec = load_spec(big_spec)
    compile_workflow(spec, {}, source=spec._source)
    assert (marks[0], parsers[0]) == (0, 1)  # no position noted, the text parsed once
    # an error found after loading (here by the compiler) asks for positions: the text is
    # parsed again, with them, and the message names the line
    bad = tmp_path / "bad.yaml"
    bad.write_text(_dag_text(200).replace("needs: [s100]", "needs: [nope]"))
    spec = load_spec(bad)
    with pytest.raises(SpecError) as err:
        compile_workflow(spec, {}, source=spec._source)
    line = next(i for i, t in enumerate(bad.read_text().splitlines(), 1) if "nope" in t)
    assert f"bad.yaml:{line}:" in str(err.value) and "unknown step 'nope'" in str(err.value)
    assert parsers[0] == 3 and marks[0] > 0


@pytest.mark.parametrize("text", [
    "name: a\nname: b\nsteps: []\n",  # a duplicate key
    "name: a\nsteps:\n  - id: x\n    run: ['true']\n    timeout: 99999999999999999999999\n",  # a huge integer
    "name: a\nsteps:\n  - id: x\n    run: !!binary aGk=\n",  # binary
    "name: a\n" + "x: " + "[" * 70 + "]" * 70 + "\nsteps: []\n",  # too deep (no anchors: checked while built)
    "name: a\n" + "x: " + "[" * 64 + "]" * 64 + "\nsteps: []\n",  # one level too deep for the bounds
    "name: a\nx: [" + ",".join(["1"] * 100_001) + "]\nsteps: []\n",  # too many values (no anchors)
    "name: a\n1: x\nyes: y\nsteps: []\n",  # keys that are not strings (converted, positioned)
    "d: &d {a: 1}\ne:\n  <<: *d\n  a: 2\nname: a\nsteps: []\n",  # a merge key
])
def test_built_without_positions_or_with_them_the_outcome_is_the_same(text: str):
    from dagcraft.errors import SpecError

    def outcome(noted: bool) -> Any:
        try:
            return loader_mod._load(text, "s.yaml", noted=noted)[0]
        except (SpecError, loader_mod._Unplaced) as exc:
            return type(exc), str(exc)

    def public() -> Any:
        try:
            return loader_mod.load_yaml(text, "s.yaml")[0]
        except SpecError as exc:
            return SpecError, str(exc)

    assert public() == outcome(True)


def test_the_memoised_resolver_gives_safeloaders_tags():
    plain = yaml.SafeLoader("")
    assert not yaml.SafeLoader.yaml_path_resolvers  # what makes a tag a function of kind, text, implicit
    for value in ["1", "yes", "On", "a", "", "~", "null", "1.5", ".inf", "2020-01-01", "0x1f", "<<", "=", "1_000"]:
        for implicit in [(True, False), (False, True), (True, True), (False, False)]:
            mine = loader_mod._Loader("")
            assert mine.resolve(yaml.ScalarNode, value, implicit) == plain.resolve(yaml.ScalarNode, value, implicit)
            assert mine.resolve(yaml.ScalarNode, value, implicit) == plain.resolve(yaml.ScalarNode, value, implicit)
    for kind in (yaml.SequenceNode, yaml.MappingNode):
        for implicit in (True, False):
            assert loader_mod._Loader("").resolve(kind, None, implicit) == plain.resolve(kind, None, implicit)
