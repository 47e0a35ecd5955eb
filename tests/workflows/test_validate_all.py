"""Issue 11 leftovers for specs: every error of a spec at once, PATH warnings, misplaced
fields, plain words for undefined template values, and ``graph --format svg``."""

from __future__ import annotations

import json
import textwrap
import xml.dom.minidom
from pathlib import Path

import pytest
from click.testing import CliRunner

from dagcraft.cli.main import cli
from dagcraft.errors import SpecError
from dagcraft.workflows import RenderContext, render_command
from dagcraft.workflows.loader import MAX_REPORTED
from tests.workflows.helpers import compile_text


def _write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def _validate(path: Path, *extra: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli, ["validate", str(path), *extra], env=env)


# ---------------------------------------------------------------- 1. all errors at once

FIELD_ERRORS = """
name: many
steps:
  - id: a
    retries: many
    run: [echo]
  - id: b
    timeout: forever
    run: [echo]
  - id: "bad id"
    run: [echo]
"""


def test_every_field_error_is_reported_in_file_order(tmp_path):
    path = _write(tmp_path, FIELD_ERRORS)
    r = _validate(path)
    assert r.exit_code == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 3, r.stderr
    assert f"{path}:4:14: steps[0].retries:" in lines[0]
    assert f"{path}:7:14: steps[1].timeout: invalid duration 'forever'" in lines[1]
    assert f"{path}:9:9: steps[2].id: invalid step id 'bad id'" in lines[2]
    assert "Traceback" not in r.output and "more error" not in r.stderr


REFERENCE_ERRORS = """
name: refs
agents:
  bot: {command: [bot, "${{ prompt }}"]}
steps:
  - id: a
    needs: [nope]
    run: [echo]
  - id: b
    agent: robot
    prompt: hi
  - id: c
    run: [echo, "${{ params.missing }}"]
  - id: e
    outputs: {values: [y]}
    run: [echo]
  - id: f
    needs: [e]
    run: [echo, "${{ steps.e.outputs.z }}"]
  - id: g
    run: "eval ${{ run.name }}"
"""


def test_every_reference_error_is_reported_in_file_order(tmp_path):
    path = _write(tmp_path, REFERENCE_ERRORS)
    r = _validate(path)
    assert r.exit_code == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    want = [
        ":6:13: steps[0].needs[0]: unknown step 'nope'",
        ":9:12: steps[1].agent: unknown agent 'robot'",
        ":12:17: steps[2].run[1]: unknown param 'missing'",
        ":18:17: steps[4].run[1]: step 'e' declares no output 'z'",
        ":20:10: steps[5].run: ${{ }} in the arguments of 'eval'",
    ]
    assert len(lines) == len(want), r.stderr
    for line, frag in zip(lines, want, strict=True):
        assert line.startswith(f"dagcraft: {path}{frag}"), f"{frag}\n{r.stderr}"


def test_json_lists_every_error(tmp_path):
    path = _write(tmp_path, FIELD_ERRORS)
    r = _validate(path, "--json")
    assert r.exit_code == 2
    doc = json.loads(r.stdout)
    assert doc["ok"] is False
    assert [(e["line"], e["col"], e["field"]) for e in doc["errors"]] == [
        (4, 14, "steps[0].retries"), (7, 14, "steps[1].timeout"), (9, 9, "steps[2].id")]
    assert all(e["file"] == str(path) and e["message"] for e in doc["errors"])


def test_error_list_is_capped(tmp_path):
    n = MAX_REPORTED + 7
    steps = "".join(f"  - id: s{i}\n    needs: [nope{i}]\n    run: [echo]\n" for i in range(n))
    path = _write(tmp_path, "name: big\nsteps:\n" + steps)
    r = _validate(path)
    assert r.exit_code == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == MAX_REPORTED + 1
    assert lines[-1] == "dagcraft: … and 7 more errors"
    doc = json.loads(_validate(path, "--json").stdout)
    assert len(doc["errors"]) == n  # --json gives them all


def test_the_library_raises_one_spec_error_holding_every_error():
    with pytest.raises(SpecError) as info:
        compile_text(REFERENCE_ERRORS)
    assert len(info.value.errors) == 5
    assert str(info.value).count("\n") == 4


# ---------------------------------------------------------------- 2. PATH warnings

def test_validate_warns_about_executables_not_on_path(tmp_path):
    path = _write(tmp_path, """
        name: w
        agents:
          bot: {command: [no-such-agent-cli-xyz, "${{ prompt }}"]}
          ok: {command: [sh, -c, "${{ prompt }}"]}
          templ: {command: ["${{ env.BOT }}", "${{ prompt }}"]}
        steps:
          - id: a
            agent: bot
            prompt: hi
          - id: b
            run: [no-such-tool-xyz, x]
          - id: c
            run: [./local-script.sh]
          - id: d
            run: [echo, hi]
    """)
    r = _validate(path)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("ok: w: 4 steps")
    warn = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert warn == [
        f"dagcraft: warning: {path}:3:19: agents.bot.command[0]: 'no-such-agent-cli-xyz' is not on PATH",
        f"dagcraft: warning: {path}:11:11: steps[1].run[0]: 'no-such-tool-xyz' is not on PATH",
    ], r.stderr
    doc = json.loads(_validate(path, "--json").stdout)
    assert doc["ok"] is True and len(doc["warnings"]) == 2


# ---------------------------------------------------------------- 3. undefined values in words

def _render(text: str, ctx: RenderContext):
    wf = compile_text(text)
    return render_command(wf, wf.steps["a"], ctx)


def test_unset_env_var_is_said_in_words():
    with pytest.raises(SpecError) as info:
        _render("""
            name: e
            steps:
              - id: a
                run: "echo ${{ env.NOPE_NOT_SET }}"
        """, RenderContext(env={"HOME": "/x"}))
    msg = str(info.value)
    assert "env.NOPE_NOT_SET is not set in the worker's environment" in msg
    assert "dict object" not in msg


def test_missing_output_and_item_key_are_said_in_words():
    wf = compile_text("""
        name: o
        steps:
          - id: p
            outputs: {values: [x]}
            run: [echo]
          - id: a
            needs: [p]
            run: [echo, "${{ steps.p.outputs.x }}"]
    """)
    with pytest.raises(SpecError) as info:
        render_command(wf, wf.steps["a"], RenderContext(steps={"p": {"outputs": {}, "status": "succeeded"}}))
    assert "steps.p.outputs.x: step 'p' did not write output 'x'" in str(info.value)
    assert "dict object" not in str(info.value)
    wf2 = compile_text("""
        name: i
        steps:
          - id: a
            foreach: "${{ [1] }}"
            run: [echo, "${{ item.name }}"]
    """)
    step = wf2.steps["a"].model_copy(update={"foreach": None, "item": {"other": 1}})
    with pytest.raises(SpecError) as info2:
        render_command(wf2, step, RenderContext())
    assert "item.name: item has no key 'name'" in str(info2.value)


def test_default_filter_still_covers_an_unset_env_var():
    cmd = _render("""
        name: d
        steps:
          - id: a
            run: [echo, "${{ env.NOPE | default('x') }}", "${{ env.HOME }}"]
    """, RenderContext(env={"HOME": "/h"}))
    assert cmd.argv == ["echo", "x", "/h"]


# ---------------------------------------------------------------- 4. misplaced fields

@pytest.mark.parametrize("key,where", [("on_failure", "workflow-level"), ("finally", "workflow-level"),
                                       ("max_parallel", "workflow-level")])
def test_a_workflow_field_on_a_step_says_where_it_belongs(tmp_path, key, where):
    path = _write(tmp_path, f"""
        name: m
        steps:
          - id: a
            run: [echo]
            {key}: stop
    """)
    r = _validate(path)
    assert r.exit_code == 2
    assert f"{path}:5:5: steps[0].{key}: {key!r} is a {where} field, not a step field" in r.stderr
    assert "did you mean" not in r.stderr


def test_a_step_field_at_the_top_says_where_it_belongs(tmp_path):
    path = _write(tmp_path, """
        name: m
        timeout: 5s
        steps:
          - id: a
            run: [echo]
    """)
    r = _validate(path)
    assert "'timeout' is a step, defaults or approval field, not a workflow-level field" in r.stderr


def test_a_misspelt_step_field_suggests_a_step_field(tmp_path):
    path = _write(tmp_path, """
        name: m
        steps:
          - id: a
            run: [echo]
            neds: [x]
    """)
    r = _validate(path)
    assert "unknown field 'neds' (did you mean 'needs'?)" in r.stderr


# ---------------------------------------------------------------- 5. graph --format svg

def test_graph_svg(tmp_path):
    path = _write(tmp_path, """
        name: g
        steps:
          - id: a
            run: [echo]
          - id: b
            needs: [a]
            run: "echo '<&>'"
    """)
    r = CliRunner().invoke(cli, ["graph", str(path), "--format", "svg"])
    assert r.exit_code == 0, r.output
    doc = xml.dom.minidom.parseString(r.stdout)  # well-formed XML
    assert doc.documentElement.tagName == "svg"
    assert {g.getAttribute("data-step") for g in doc.getElementsByTagName("g")} == {"a", "b"}
    assert len(doc.getElementsByTagName("path")) >= 2  # the arrow head and the a -> b edge


def test_field_and_reference_errors_are_reported_together(tmp_path):
    path = _write(tmp_path, """
        name: both
        steps:
          - id: a
            timeout: forever
            outputs: {values: [x]}
            run: [echo]
          - id: b
            needs: [a, nope]
            run: [echo, "${{ steps.a.outputs.y }}"]
          - id: "bad id"
            run: [echo, "${{ params.nope }}"]
          - id: c
            needs: ["bad id"]
            run: [echo]
    """)
    r = _validate(path)
    assert r.exit_code == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert [ln.split(": ")[1:3] for ln in lines] == [
        [f"{path}:4:14", "steps[0].timeout"],
        [f"{path}:8:16", "steps[1].needs[1]"],
        [f"{path}:9:17", "steps[1].run[1]"],
        [f"{path}:10:9", "steps[2].id"],
        [f"{path}:11:17", "steps[2].run[1]"],  # a faulty step's templates are checked too
        [f"{path}:13:13", "steps[3].needs[0]"],
    ], r.stderr
    assert "declares no output 'y'" in lines[2] and "unknown step 'nope'" in lines[1]
    assert "unknown param 'nope'" in lines[4] and "unknown step 'bad id'" in lines[5]


def test_a_run_says_the_unset_env_var_in_words(local_store, tmp_path):
    from tests.orchestrator.helpers import drive_inline, submit_spec, write_spec

    spec = write_spec(tmp_path, """
        name: envx
        steps:
          - id: a
            run: "echo ${{ env.NOPE_NOT_SET_11 }}"
    """)
    st = drive_inline(local_store, submit_spec(local_store, spec), tmp_path)
    step = next(s for s in st["steps"] if s["step"] == "a")
    assert step["status"] == "failed"
    assert "env.NOPE_NOT_SET_11 is not set in the worker's environment" in step["reason"]
    assert "dict object" not in step["reason"]
