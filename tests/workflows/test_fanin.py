"""Issue 10, fan-in: references to fan-out steps at compile time, inputs from matrix and foreach
steps, and matrix ``include`` / ``exclude`` (GitHub Actions semantics)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from dagcraft.cli.main import cli
from dagcraft.errors import SpecError
from dagcraft.workflows import instance_key
from tests.workflows.helpers import compile_text

GEN_MATRIX = """
name: fan
steps:
  - id: gen
    matrix: {name: [a, b, c]}
    run: "echo ${{ matrix.name }} > f.txt"
    outputs: {values: [x], artifacts: [f.txt]}
  - id: read
    needs: gen
    run: READ
"""

GEN_FOREACH = """
name: fan
steps:
  - id: plan
    run: "echo 'items=[1,2]' >> $DAGCRAFT_OUTPUT"
    outputs: {values: [items]}
  - id: gen
    needs: plan
    foreach: "${{ steps.plan.outputs.items }}"
    run: "echo ${{ item }} > f.txt"
    outputs: {values: [x], artifacts: [f.txt]}
  - id: read
    needs: gen
    run: READ
"""


def _err(text: str) -> str:
    with pytest.raises(SpecError) as e:
        compile_text(text)
    return str(e.value)


def _with(spec: str, read: str) -> str:
    return spec.replace("READ", read)


# -- ambiguous references are compile errors naming file:line and what to write instead ----------

@pytest.mark.parametrize("spec", [GEN_MATRIX, GEN_FOREACH], ids=["matrix", "foreach"])
def test_artifact_of_fanout_step_is_an_error_with_the_fix(spec):
    msg = _err(_with(spec, "\"cat ${{ steps.gen.artifacts['f.txt'] }}\""))
    line = spec.splitlines().index("    run: READ") + 1
    assert msg.startswith(f"t.yaml:{line}:"), msg
    assert "steps.gen.artifacts is a list (one entry per instance of fan-out step 'gen')" in msg
    assert "inputs: [{from: gen, artifact: f.txt}]" in msg and "gen/<instance key>/f.txt" in msg
    key = "name=a" if spec is GEN_MATRIX else "0"
    assert f"steps.gen.by_key['{key}'].artifacts['f.txt']" in msg


@pytest.mark.parametrize("spec", [GEN_MATRIX, GEN_FOREACH], ids=["matrix", "foreach"])
def test_output_of_fanout_step_is_an_error_with_the_fix(spec):
    msg = _err(_with(spec, "\"echo ${{ steps.gen.outputs.x }}\""))
    assert "steps.gen.outputs is a list (one entry per instance of fan-out step 'gen')" in msg
    assert "steps.gen.outputs | map(attribute='x') | join(',')" in msg
    assert "steps.gen.by_key[" in msg


def test_the_old_last_instance_wins_form_is_refused_on_a_file_line(tmp_path):
    spec = tmp_path / "p.yaml"
    spec.write_text(_with(GEN_MATRIX, "\"cat ${{ steps.gen.artifacts['f.txt'] }}\"").lstrip())
    res = CliRunner().invoke(cli, ["validate", str(spec)])
    assert res.exit_code == 2
    assert f"{spec}:9:" in res.output and "ambiguous" in res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("read", [
    "\"cat ${{ steps.gen.by_key['name=b'].artifacts['f.txt'] }}\"",
    "\"cat ${{ steps.gen.instances[0].artifacts['f.txt'] }}\"",
    "\"cat ${{ steps.gen.artifacts[2]['f.txt'] }}\"",
    "\"echo ${{ steps.gen.outputs[1].x }} ${{ steps.gen.by_key['name=c'].outputs.x }}\"",
    "\"echo ${{ steps.gen.instances | map(attribute='key') | join(',') }} ${{ steps.gen.status }}\"",
    "\"echo ${{ steps.gen.outputs | map(attribute='x') | join(',') }}\"",
    "\"echo ${{ steps.gen.by_key['name=a'].matrix.name }} ${{ steps.gen.instances[0].status }}\"",
])
def test_unambiguous_fanout_references_compile(read):
    compile_text(_with(GEN_MATRIX, read))


@pytest.mark.parametrize(("read", "fragment"), [
    ("\"cat ${{ steps.gen.by_key['name=z'].artifacts['f.txt'] }}\"",
     "step 'gen' has no instance 'name=z' (did you mean 'name=c'?); instances: name=a, name=b, name=c"),
    ("\"cat ${{ steps.gen.by_key['name=a'].artifacts['g.txt'] }}\"",
     "step 'gen' declares no artifact matching 'g.txt'"),
    ("\"cat ${{ steps.gen.instances[0].outputs.y }}\"", "step 'gen' declares no output 'y'"),
    ("\"cat ${{ steps.gen.instances[0].colour }}\"", "an instance has id, key, matrix, item, outputs, artifacts, status"),
    ("\"cat ${{ steps.gen.instance }}\"", ".instances or .by_key"),
])
def test_bad_fanout_references_are_errors(read, fragment):
    assert fragment in _err(_with(GEN_MATRIX, read))


def test_instances_of_a_plain_step_is_an_error():
    msg = _err("""
        name: x
        steps:
          - {id: a, run: [echo]}
          - {id: b, needs: a, run: [echo, "${{ steps.a.instances }}"]}
    """)
    assert "steps.a.instances: step 'a' is not a fan-out step" in msg


# -- inputs from fan-out steps ----------------------------------------------------------------------

def test_inputs_from_a_matrix_step_one_file_per_instance_default_dir_is_the_step_id():
    wf = compile_text(_with(GEN_MATRIX, "[cat]").replace("    run: [cat]", "    run: [cat]\n"
                                                           "    inputs: [{from: gen, artifact: f.txt}]"))
    assert [(d.step, d.dest) for d in wf.steps["read"].inputs] == [
        ("gen[name=a]", "gen/name=a/f.txt"), ("gen[name=b]", "gen/name=b/f.txt"), ("gen[name=c]", "gen/name=c/f.txt")]


def test_inputs_from_a_foreach_step_compile_to_one_per_instance_declaration():
    wf = compile_text(_with(GEN_FOREACH, "[cat]").replace("    run: [cat]", "    run: [cat]\n"
                                                            "    inputs: [{from: gen, artifact: f.txt, as: got}]"))
    [decl] = wf.steps["read"].inputs
    assert (decl.step, decl.artifact, decl.dest) == ("gen", "f.txt", "got")


def test_an_input_inside_a_fanout_input_directory_is_an_error():
    msg = _err(GEN_FOREACH.replace("    run: READ", "    run: [cat]\n    inputs:\n"
               "      - {from: gen, artifact: f.txt, as: got}\n"
               "      - {from: gen, artifact: f.txt, as: got/0/f.txt}"))
    assert "steps[2].inputs[1]: input destinations of inputs[0] and inputs[1] overlap" in msg


def test_two_artifacts_of_a_fanout_step_share_its_directory_but_not_a_file():
    two = GEN_MATRIX.replace("[f.txt]", "[f.txt, g.txt]")
    wf = compile_text(two.replace("    run: READ", "    run: [cat]\n    inputs:\n"
                                  "      - {from: gen, artifact: f.txt}\n      - {from: gen, artifact: g.txt}"))
    assert [d.dest for d in wf.steps["read"].inputs][:2] == ["gen/name=a/f.txt", "gen/name=b/f.txt"]
    msg = _err(two.replace("    run: READ", "    run: [cat]\n    inputs:\n"
                           "      - {from: gen, artifact: f.txt, as: d}\n"
                           "      - {from: gen, artifact: g.txt, as: d/name=b/f.txt}"))
    assert ("steps[1].inputs[1]: input destination 'd/name=b/f.txt/name=a/g.txt' overlaps a destination of "
            "inputs[0] (one would be a file inside the other)") in msg


def test_instance_key_is_the_bracketed_part_of_the_id():
    assert instance_key("gen[name=a]", "gen") == "name=a"
    assert instance_key("gen[3]", "gen") == "3"
    assert instance_key("gen", "gen") == "gen"


# -- matrix include / exclude ---------------------------------------------------------------------

def _matrix(matrix: str, params: str = "") -> dict[str, dict]:
    wf = compile_text(f"""
        name: m
        {params}
        steps:
          - id: t
            matrix: {matrix}
            run: [echo]
    """)
    return {sid: s.matrix for sid, s in wf.steps.items()}


def test_include_as_in_the_github_actions_docs():
    got = _matrix("""
              fruit: [apple, pear]
              animal: [cat, dog]
              include:
                - color: green
                - {color: pink, animal: cat}
                - {fruit: apple, shape: circle}
                - {fruit: banana}
                - {fruit: banana, animal: cat}
    """)
    assert got == {
        "t[animal=cat,fruit=apple]": {"fruit": "apple", "animal": "cat", "color": "pink", "shape": "circle"},
        "t[animal=dog,fruit=apple]": {"fruit": "apple", "animal": "dog", "color": "green", "shape": "circle"},
        "t[animal=cat,fruit=pear]": {"fruit": "pear", "animal": "cat", "color": "pink"},
        "t[animal=dog,fruit=pear]": {"fruit": "pear", "animal": "dog", "color": "green"},
        "t[fruit=banana]": {"fruit": "banana"},
        "t[animal=cat,fruit=banana]": {"fruit": "banana", "animal": "cat"},
    }


def test_exclude_removes_combinations_matching_all_given_keys():
    got = _matrix("""
              os: [linux, mac, windows]
              py: ["3.11", "3.12"]
              exclude:
                - {os: mac, py: "3.11"}
                - {os: windows}
    """)
    assert list(got) == ["t[os=linux,py=3.11]", "t[os=linux,py=3.12]", "t[os=mac,py=3.12]"]


def test_exclude_applies_before_include():
    got = _matrix("""
              os: [linux, mac]
              exclude: [{os: mac}]
              include: [{os: mac, arm: true}]
    """)
    assert got == {"t[os=linux]": {"os": "linux"}, "t[arm=true,os=mac]": {"os": "mac", "arm": True}}


def test_include_only_matrix_and_include_from_a_param():
    assert list(_matrix("{include: [{a: 1}, {a: 2, b: x}]}")) == ["t[a=1]", "t[a=2,b=x]"]
    got = _matrix('{os: [linux], include: "${{ params.extra }}"}',
                  params="params: {extra: {type: list, default: [{os: linux, cc: clang}]}}")
    assert got == {"t[os=linux]": {"os": "linux", "cc": "clang"}}


def test_an_included_key_can_be_referenced():
    wf = compile_text("""
        name: m
        steps:
          - id: t
            matrix: {os: [linux], include: [{os: linux, cc: clang}]}
            run: [echo, "${{ matrix.cc }}"]
    """)
    assert wf.steps["t[os=linux]"].matrix == {"os": "linux", "cc": "clang"}


@pytest.mark.parametrize(("matrix", "fragment"), [
    ("{os: [a], exclude: [{arch: x}]}", "t.yaml:5:34: steps[0].matrix.exclude[0].arch: 'arch' is not a matrix axis; axes: os"),
    ("{os: [a], exclude: [{os: a}]}", "steps[0].matrix.exclude: removes every combination"),
    ("{exclude: [{os: a}]}", "matrix needs at least one axis or an 'include' list"),
    ("{os: [a], include: [{}]}", "matrix.include[0] must be a non-empty mapping"),
    ("{os: [a], include: [x]}", "matrix.include[0] must be a non-empty mapping"),
    ("{os: [a], include: {os: b}}", "matrix.include must be a list of mappings"),
    ("{os: [a], include: [{os: b}, {os: b}]}", "two matrix instances get the same id 't[os=b]'"),
])
def test_bad_include_exclude(matrix, fragment):
    msg = _err(f"""
        name: m
        steps:
          - id: t
            matrix: {matrix}
            run: [echo]
    """)
    assert fragment in msg, msg


def test_unknown_matrix_key_reference_lists_included_keys():
    msg = _err("""
        name: m
        steps:
          - id: t
            matrix: {os: [linux], include: [{os: linux, cc: clang}]}
            run: [echo, "${{ matrix.ccc }}"]
    """)
    assert "unknown matrix key 'ccc' (did you mean 'cc'?)" in msg


def test_json_schema_knows_include_and_exclude():
    jsonschema = pytest.importorskip("jsonschema")
    from dagcraft.workflows.spec import spec_json_schema

    schema = spec_json_schema()
    step = {"id": "t", "run": ["echo"], "matrix": {"os": ["linux"], "exclude": [{"os": "mac"}],
                                                   "include": [{"os": "linux", "cc": "clang"}]}}
    jsonschema.validate({"name": "m", "steps": [step]}, schema)
    step["matrix"]["include"] = {"os": "linux"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "m", "steps": [step]}, schema)
