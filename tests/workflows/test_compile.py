from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dagcraft.cli.main import cli
from dagcraft.errors import InvalidInput, SpecError
from dagcraft.workflows import (
    CompiledWorkflow,
    Spec,
    compile_workflow,
    concrete_id,
    matrix_id_value,
    parse_duration,
    parse_params,
)
from tests.workflows.helpers import compile_text

DESIGN = """
name: feature-review
params:
  feature: {type: string, default: "add --json to status"}
  reviewers: {type: list, default: [security, style]}
  token: {type: string, default: s3cr3t-value, secret: true}
agents:
  coder: {command: [claude, -p, "${{ prompt }}", --output-format, stream-json], adapter: claude}
defaults: {retries: {limit: 2, backoff: 2s, max_backoff: 60s}, timeout: 15m, env: {A: "1", B: "2"}}
steps:
  - id: plan
    agent: coder
    prompt: "Write a plan for: ${{ params.feature }}. List subtasks as JSON."
    outputs: {artifacts: [plan.md]}
  - id: implement
    needs: [plan]
    foreach: "${{ steps.plan.outputs.subtasks }}"
    agent: coder
    prompt: "Implement ${{ item }} following ${{ steps.plan.artifacts['plan.md'] }}"
    rollback: [git, checkout, --, .]
    env: {B: step}
  - id: review
    needs: [implement]
    matrix: {reviewer: "${{ params.reviewers }}"}
    run: "review-tool --as ${{ matrix.reviewer }}"
    retries: 5
    timeout: 1h30m
  - id: report
    needs: [review]
    when: "${{ always() }}"
    run: [echo, done]
finally:
  - id: cleanup
    run: [echo, cleanup]
on_failure: rollback
"""


def test_design_example_compiles():
    wf = compile_text(DESIGN)
    assert list(wf.steps) == [
        "plan", "implement", "review[reviewer=security]", "review[reviewer=style]", "report", "cleanup",
    ]
    assert wf.steps["implement"].foreach == "${{ steps.plan.outputs.subtasks }}"
    assert wf.steps["review[reviewer=style]"].needs == ["implement"]
    assert wf.steps["review[reviewer=style]"].matrix == {"reviewer": "style"}
    assert wf.steps["report"].needs == ["review[reviewer=security]", "review[reviewer=style]"]
    assert wf.steps["cleanup"].is_finally and wf.steps["cleanup"].needs == ["report"]
    assert wf.steps["cleanup"].when == "${{ always() }}"
    assert wf.steps["plan"].when == "${{ success() }}"
    assert wf.on_failure == "rollback"
    assert wf.agents["coder"].adapter == "claude"


def test_defaults_merge_step_wins():
    wf = compile_text(DESIGN)
    plan, impl, review = wf.steps["plan"], wf.steps["implement"], wf.steps["review[reviewer=style]"]
    assert plan.env == {"A": "1", "B": "2"} and impl.env == {"A": "1", "B": "step"}
    assert plan.retries.limit == 2 and plan.retries.backoff_s == 2 and plan.retries.max_backoff_s == 60
    assert review.retries.limit == 5 and review.retries.backoff_s == 1.0  # shorthand replaces defaults
    assert plan.timeout_s == 900 and review.timeout_s == 5400


def test_secret_params():
    wf = compile_text(DESIGN)
    assert wf.secret_params == ["token"]
    assert wf.secret_values() == ["s3cr3t-value"]
    assert "s3cr3t-value" not in json.dumps(wf.model_dump(exclude={"params"}))


def test_hash_deterministic_and_param_sensitive():
    a, b = compile_text(DESIGN), compile_text(DESIGN)
    assert a.spec_hash == b.spec_hash and len(a.spec_hash) == 64
    assert a.model_dump_json() == b.model_dump_json()
    c = compile_text(DESIGN, {"feature": "other"})
    assert c.spec_hash != a.spec_hash
    # the hash does not depend on where the spec lives
    d = compile_text(DESIGN, source="elsewhere/p.yaml")
    assert d.spec_hash == a.spec_hash


def test_graph_and_roundtrip():
    wf = compile_text(DESIGN)
    g = wf.graph()
    assert set(g.nodes) == set(wf.steps)
    assert ("implement", "review[reviewer=security]") in g.edges
    again = CompiledWorkflow.model_validate_json(wf.model_dump_json())
    assert again == wf and again.spec_hash == wf.spec_hash


def test_params_coercion():
    spec = """
    name: p
    params:
      n: {type: int, default: 1}
      f: {type: float, default: 0.5}
      b: {type: bool, default: false}
      l: {type: list, default: []}
      o: {type: object, default: {}}
      s: {type: string, required: false}
    steps: [{id: a, run: [echo]}]
    """
    wf = compile_text(spec, {"n": "42", "f": "2", "b": "yes", "l": "[a, 1]", "o": '{"k": [1]}'})
    assert wf.params == {"n": 42, "f": 2.0, "b": True, "l": ["a", 1], "o": {"k": [1]}, "s": None}
    wf = compile_text(spec, {"n": 7, "l": ["x"]})  # already-typed values are accepted
    assert wf.params["n"] == 7 and wf.params["l"] == ["x"]
    for bad in ({"n": "4.5"}, {"b": "maybe"}, {"l": "{a: 1}"}, {"o": "[1]"}, {"n": True}, {"f": "nan"}):
        with pytest.raises(SpecError):
            compile_text(spec, bad)


def test_parse_params():
    assert parse_params(["a=1", "b=x=y", "a=2"]) == {"a": "2", "b": "x=y"}
    assert parse_params(["k="]) == {"k": ""}
    for bad in (["noequals"], ["=v"], ["a b=c"], ["$(x)=1"]):
        with pytest.raises(InvalidInput):
            parse_params(bad)


def test_durations():
    assert parse_duration("2s") == 2 and parse_duration("15m") == 900 and parse_duration("1h") == 3600
    assert parse_duration("1h30m") == 5400 and parse_duration(12) == 12 and parse_duration("500ms") == 0.5
    assert parse_duration("1.5") == 1.5
    for bad in ("", "5 minutes", "-1", "1d", True, "m5"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_matrix_ids_multi_key_and_unsafe_values():
    wf = compile_text("""
    name: m
    steps:
      - id: t
        matrix: {b: [x, "a b/../c"], a: [1]}
        run: [echo, "${{ matrix.a }}", "${{ matrix.b }}"]
    """)
    ids = list(wf.steps)
    assert ids[0] == "t[a=1,b=x]"
    weird = ids[1]
    assert weird.startswith("t[a=1,b=a_b_c-") and "/" not in weird and ".." not in weird
    assert weird == concrete_id("t", {"a": 1, "b": "a b/../c"})  # stable
    assert matrix_id_value("..") != ".." and matrix_id_value("") != ""
    assert matrix_id_value("security") == "security" and matrix_id_value(True) == "true"
    assert matrix_id_value({"k": 1}) == matrix_id_value({"k": 1}) != matrix_id_value({"k": 2})


def test_matrix_instance_ids_pass_segment_rules():
    # docs/spec.md "Fan-out": a concrete id is always one valid store path segment.
    values = ["a/b", "..", ".", "\x00", "x" * 300, "ok", " ", "\n", "é"]
    for v in values:
        cid = concrete_id("step", {"k": v})
        seg_ok = cid not in (".", "..") and not any(c in cid for c in "/\\\x00") and len(cid) <= 200
        assert seg_ok and all(c.isprintable() for c in cid), repr(cid)


def test_programmatic_spec_without_positions():
    spec = Spec.model_validate({"name": "x", "steps": [{"id": "a", "needs": ["zz"], "run": ["echo"]}]})
    with pytest.raises(SpecError, match=r"^<spec>: steps\[0\]\.needs\[0\]: unknown step 'zz'"):
        compile_workflow(spec, {})


def test_foreach_is_one_node_and_needs_fanout_expand():
    wf = compile_text("""
    name: f
    steps:
      - {id: a, run: [echo], outputs: {values: [items]}}
      - {id: b, needs: [a], foreach: "${{ steps.a.outputs.items }}", run: [echo, "${{ item }}"]}
      - {id: c, needs: [b], run: [echo]}
    """)
    assert list(wf.steps) == ["a", "b", "c"] and wf.steps["c"].needs == ["b"]


def test_transitive_reference_allowed_and_needs_order():
    wf = compile_text("""
    name: t
    steps:
      - {id: c, needs: [b], run: [echo, "${{ steps.a.outputs.v }}"]}
      - {id: b, needs: [a], run: [echo]}
      - {id: a, run: [echo], outputs: {values: [v]}}
    """)
    assert list(wf.steps) == ["a", "b", "c"]


def test_inputs_from_matrix_expand_per_instance():
    wf = compile_text("""
    name: i
    steps:
      - {id: r, matrix: {t: [x, y]}, run: [echo], outputs: {artifacts: ["*.md"]}}
      - {id: s, needs: [r], inputs: [{from: r, artifact: notes.md, as: notes}], run: [ls]}
    """)
    assert [(i.step, i.dest) for i in wf.steps["s"].inputs] == [
        ("r[t=x]", "notes/t=x/notes.md"), ("r[t=y]", "notes/t=y/notes.md")]


def test_fanout_limit_configurable(monkeypatch):
    import dagcraft.workflows.compile as comp

    monkeypatch.setattr(comp, "MAX_FANOUT", 3)
    with pytest.raises(SpecError, match="4 instances exceed the fan-out limit of 3"):
        compile_text("""
        name: big
        steps: [{id: a, matrix: {i: [1, 2, 3, 4]}, run: [echo]}]
        """)


# ----------------------------------------------------------------------------- issue 9, point 7
@pytest.mark.parametrize("workdir", ["../..", "..", "a/../../b", "sub/..//x"])
def test_static_workdir_escaping_the_spec_dir_is_refused(workdir):
    with pytest.raises(SpecError, match=r"^t.yaml:3:\d+: steps\[0\].workdir: invalid workdir"):
        compile_text(f"name: w\nsteps:\n  - {{id: a, run: [echo], workdir: '{workdir}'}}\n")
    with pytest.raises(SpecError, match=r"^t.yaml:2:\d+: defaults.workdir: invalid workdir"):
        compile_text(f"name: w\ndefaults: {{workdir: '{workdir}'}}\nsteps:\n  - {{id: a, run: [echo]}}\n")


def test_workdirs_inside_the_spec_dir_or_absolute_or_templated_are_accepted():
    for workdir in ("sub", "./sub", "sub/dir/", "/tmp", "${{ run.name }}"):
        compile_text(f"name: w\nsteps:\n  - {{id: a, run: [echo], workdir: '{workdir}'}}\n")


@pytest.mark.parametrize("key", ["A=B", "1X", "A B", "", "A-B", "DAGCRAFT_STEP", "é"])
def test_env_keys_that_are_not_env_var_names_are_refused(key, tmp_path):
    for where, text in [
        ("steps[0].env", f"name: e\nsteps:\n  - id: a\n    run: [echo]\n    env: {{{json.dumps(key)}: x}}\n"),
        ("defaults.env", f"name: e\ndefaults:\n  env: {{{json.dumps(key)}: x}}\nsteps:\n  - {{id: a, run: [echo]}}\n"),
        ("agents.g.env", f"name: e\nagents:\n  g: {{command: [echo], env: {{{json.dumps(key)}: x}}}}\n"
                         "steps:\n  - {id: a, agent: g, prompt: p}\n"),
    ]:
        spec = tmp_path / "p.yaml"
        spec.write_text(text)
        r = CliRunner().invoke(cli, ["validate", str(spec)])
        assert r.exit_code == 2, r.output
        assert r.output.startswith(f"dagcraft: {spec}:") and f": {where}: " in r.output, r.output
        assert r.output.count("\n") == 1
