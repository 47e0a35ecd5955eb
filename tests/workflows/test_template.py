from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dagcraft.errors import SpecError
from dagcraft.workflows import (
    MAX_FANOUT,
    RenderContext,
    evaluate_foreach,
    evaluate_when,
    expand_foreach,
    render_command,
    render_rollback,
)
from tests.workflows.helpers import compile_text

EVIL = "$(touch {marker}); rm -rf ~ `touch {marker}2` && echo 'q\"uote' ; | > {marker}3"

PRINT_ARGS = [sys.executable, "-c", "import json,sys; print(json.dumps(sys.argv[1:]))"]


def _run(argv, cwd, env=None):
    out = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=10,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(cwd), **(env or {})})
    return out


@pytest.mark.parametrize("style", ["shell", "argv", "agent"])
def test_param_injection_arrives_as_one_literal_argument(tmp_path: Path, style: str):
    import json
    import shlex

    marker = tmp_path / "pwned"
    evil = EVIL.format(marker=marker)
    printer = " ".join(shlex.quote(a) for a in PRINT_ARGS)
    step: dict = {"id": "s"}
    if style == "shell":
        step["run"] = printer + " ${{ params.v }}"
    elif style == "argv":
        step["run"] = PRINT_ARGS + ["${{ params.v }}"]
    else:
        step.update(agent="a", prompt="${{ params.v }}")
    spec = json.dumps({  # JSON is YAML
        "name": "inj",
        "params": {"v": {"type": "string"}},
        "agents": {"a": {"command": PRINT_ARGS + ["${{ prompt }}"]}},
        "steps": [step],
    })
    wf = compile_text(spec, {"v": evil})
    cmd = render_command(wf, wf.steps["s"], RenderContext())
    assert cmd.shell == (style == "shell")
    if style == "shell":
        assert cmd.argv[:2] == ["bash", "-c"]
        assert evil not in cmd.argv[2]  # the value is never script text
    (tmp_path / "home").mkdir()
    out = _run(cmd.argv, tmp_path / "home", cmd.env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [evil]  # exactly one argument, byte for byte
    assert not marker.exists() and not Path(f"{marker}2").exists() and not Path(f"{marker}3").exists()
    assert (tmp_path / "home").exists()


def test_spec_injection_example_value(tmp_path: Path):
    # The exact value from the issue, rendered into a run string and executed.
    wf = compile_text("""
    name: inj
    params: {v: {type: string}}
    steps:
      - {id: s, run: "printf '%s\\n' ${{ params.v }} > out.txt"}
    """, {"v": "$(touch /tmp/pwned); rm -rf ~"})
    cmd = render_command(wf, wf.steps["s"], RenderContext())
    out = _run(cmd.argv, tmp_path, cmd.env)
    assert out.returncode == 0
    assert (tmp_path / "out.txt").read_text() == "$(touch /tmp/pwned); rm -rf ~\n"
    assert not Path("/tmp/pwned").exists()


def test_argv_items_never_split():
    wf = compile_text("""
    name: a
    params: {v: {default: "a b  c"}, l: {type: list, default: [1, "x y"]}}
    steps: [{id: s, run: [echo, "${{ params.v }}", "pre-${{ params.l }}", "${{ params.l | join(' ') }}"]}]
    """)
    cmd = render_command(wf, wf.steps["s"], RenderContext())
    assert cmd.argv == ["echo", "a b  c", 'pre-[1, "x y"]', "1 x y"] and not cmd.shell


def test_agent_command_gets_rendered_prompt_and_env():
    wf = compile_text("""
    name: a
    params: {who: {default: "O'Brien"}, mode: {default: ok}}
    agents:
      coder:
        command: [claude, -p, "${{ prompt }}", --model, "m-${{ params.mode }}"]
        adapter: claude
        env: {MODE: "${{ params.mode }}", X: agent}
    steps:
      - {id: s, agent: coder, prompt: "Hi ${{ params.who }}; ${{ run.name }}", env: {X: step}}
    """)
    cmd = render_command(wf, wf.steps["s"], RenderContext(run={"id": "r1"}))
    assert cmd.argv == ["claude", "-p", "Hi O'Brien; a", "--model", "m-ok"]
    assert cmd.env == {"MODE": "ok", "X": "step"} and cmd.adapter == "claude" and not cmd.shell


def test_run_context_and_spec_dir(tmp_path: Path):
    from dagcraft.workflows import compile_file

    p = tmp_path / "p.yaml"
    p.write_text("name: r\nsteps: [{id: s, run: [echo, '${{ run.spec_dir }}', '${{ run.id }}']}]\n")
    wf = compile_file(p, {})
    cmd = render_command(wf, wf.steps["s"], RenderContext(run={"id": "R"}))
    assert cmd.argv == ["echo", str(tmp_path.resolve()), "R"]


def test_undefined_at_runtime_is_spec_error():
    wf = compile_text("""
    name: u
    steps:
      - {id: a, run: [echo]}
      - {id: b, needs: [a], run: [echo, "${{ steps.a.outputs.missing }}"]}
    """)
    with pytest.raises(SpecError, match=r"step 'b': run: .*missing"):
        render_command(wf, wf.steps["b"], RenderContext(steps={"a": {"outputs": {}}}))


def test_sandbox_blocks_python_internals():
    wf = compile_text("""
    name: s
    params: {v: {default: x}}
    steps: [{id: a, run: [echo, "${{ params.v.__class__.__mro__[1].__subclasses__() }}"]}]
    """)
    with pytest.raises(SpecError):
        render_command(wf, wf.steps["a"], RenderContext())


def test_shell_text_passes_through():
    wf = compile_text("""
    name: s
    steps: [{id: a, run: 'a=(1 2); echo ${#a[@]} {% raw %} {# x #} $HOME ${HOME}'}]
    """)
    cmd = render_command(wf, wf.steps["a"], RenderContext())
    assert cmd.argv[2] == "a=(1 2); echo ${#a[@]} {% raw %} {# x #} $HOME ${HOME}"


def test_rollback_rendering():
    wf = compile_text("""
    name: r
    params: {v: {default: "a b"}}
    steps:
      - {id: a, run: [echo], rollback: "undo ${{ params.v }}"}
      - {id: b, run: [echo]}
    """)
    rb = render_rollback(wf, wf.steps["a"], RenderContext())
    assert rb.argv == ["bash", "-c", 'undo "${DAGCRAFT_V_1}"'] and rb.shell
    assert rb.env["DAGCRAFT_V_1"] == "a b"
    assert render_rollback(wf, wf.steps["b"], RenderContext()) is None


WHEN_SPEC = """
name: w
params: {flag: {type: bool, default: false}}
steps:
  - {id: a, run: [echo]}
  - {id: d, needs: [a], run: [echo]}
  - {id: b, needs: [a], run: [echo], when: "%s"}
"""


@pytest.mark.parametrize(
    "when,statuses,expected",
    [
        ("${{ success() }}", {"a": "succeeded"}, True),
        ("${{ success() }}", {"a": "failed"}, False),
        ("${{ success() }}", {"a": "skipped"}, False),
        ("${{ failure() }}", {"a": "failed"}, True),
        ("${{ failure() }}", {"a": "succeeded"}, False),
        ("${{ always() }}", {"a": "cancelled"}, True),
        ("${{ cancelled() }}", {"a": "cancelled"}, True),
        ("${{ cancelled() }}", {"a": "failed"}, False),
        ("${{ params.flag }}", {"a": "succeeded"}, False),  # implicit success() and (...)
        ("${{ not params.flag }}", {"a": "succeeded"}, True),
        ("${{ not params.flag }}", {"a": "failed"}, False),
        ("always() and not params.flag", {"a": "failed"}, True),  # bare expression form
        ("${{ failure() or params.flag }}", {"a": "succeeded"}, False),
        ("${{ steps.a.status == 'succeeded' }}", {"a": "succeeded"}, True),
    ],
)
def test_evaluate_when(when, statuses, expected):
    wf = compile_text(WHEN_SPEC % when)
    ctx = RenderContext(params=wf.params, steps={"a": {"status": statuses["a"], "outputs": {}}})
    assert evaluate_when(wf.steps["b"], ctx, statuses) is expected


@pytest.mark.parametrize("when", ["${{ success() }}", "${{success()}}", "${{  success( ) }}"])
@pytest.mark.parametrize("status,expected", [("succeeded", True), ("failed", False), ("skipped", False)])
def test_the_default_when_is_decided_without_evaluating_an_expression(monkeypatch, when, status, expected):
    """``success()`` alone (nearly every step's condition) is decided from the statuses: every
    worker evaluated it through the sandboxed template engine for every step it saw become ready."""
    import dagcraft.workflows.template as template

    wf = compile_text(WHEN_SPEC % when)

    def refuse(*a, **kw):
        raise AssertionError("evaluated an expression")

    monkeypatch.setattr(template, "evaluate_expression", refuse)
    ctx = RenderContext(params=wf.params, steps={})
    assert evaluate_when(wf.steps["b"], ctx, {"a": status}) is expected
    assert evaluate_when(wf.steps["b"], ctx.model_copy(update={"run": {"status": "cancelled"}}), {"a": status}) is False


def test_evaluate_when_no_needs():
    wf = compile_text(WHEN_SPEC % "${{ success() }}")
    assert evaluate_when(wf.steps["a"], RenderContext(), {}) is True


def test_foreach_evaluate_and_expand():
    wf = compile_text("""
    name: f
    steps:
      - {id: a, run: [echo], outputs: {values: [items]}}
      - {id: b, needs: [a], foreach: "${{ steps.a.outputs.items }}", run: [echo, "${{ item.name }}"]}
    """)
    step = wf.steps["b"]
    items = evaluate_foreach(step, RenderContext(steps={"a": {"outputs": {"items": [{"name": "x"}, {"name": "y z"}]}}}))
    kids = expand_foreach(step, items)
    assert [k.id for k in kids] == ["b[0]", "b[1]"] and all(k.foreach is None and k.needs == ["a"] for k in kids)
    assert render_command(wf, kids[1], RenderContext()).argv == ["echo", "y z"]
    # outputs that arrived as a `key=value` string holding JSON are parsed
    assert evaluate_foreach(step, RenderContext(steps={"a": {"outputs": {"items": '["p", "q"]'}}})) == ["p", "q"]
    with pytest.raises(SpecError, match="expected a list"):
        evaluate_foreach(step, RenderContext(steps={"a": {"outputs": {"items": "not a list"}}}))
    with pytest.raises(SpecError, match="fan-out limit"):
        evaluate_foreach(step, RenderContext(steps={"a": {"outputs": {"items": list(range(MAX_FANOUT + 1))}}}))
