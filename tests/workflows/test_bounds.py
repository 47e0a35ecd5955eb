"""Bounded evaluation (issue 9, point 2): every bound is a one-line error with exit 2 at
``validate`` and a clean step failure at run time; a step's timeout and cancel reach rendering."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from dagcraft.errors import SpecError
from dagcraft.orchestrator import cancel, run_status
from dagcraft.workflows import RenderContext, render_command, template
from dagcraft.workflows.loader import MAX_DEPTH, MAX_NODES, MAX_SPEC_BYTES
from dagcraft.workflows.template import EvaluationLimit, RenderCancelled, RenderTimedOut, evaluate_expression
from tests.orchestrator.helpers import cli, drive_inline, run_spec, steps, submit_spec, wait_for, write_spec
from tests.workflows.helpers import compile_text

HEAD = "name: x\nsteps:\n  - {id: a, run: \"echo\"}\n"


def _validate(tmp_path: Path, text: str | bytes, *params: str, timeout: float = 60) -> tuple[int, str]:
    spec = tmp_path / "p.yaml"
    if isinstance(text, bytes):
        spec.write_bytes(text)
    else:
        spec.write_text(text)
    args = ["validate", str(spec)]
    for p in params:
        args += ["-p", p]
    r = cli(*args, timeout=timeout)
    assert "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) <= 1, r.stderr
    return r.returncode, r.stderr.strip()


def _bomb() -> str:
    lines = ['  a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        lines.append(f"  a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    return "name: x\nsteps: [{id: a, run: echo}]\nx-bomb:\n" + "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- loading
def test_spec_larger_than_the_limit(tmp_path: Path):
    code, err = _validate(tmp_path, HEAD + "#" * (MAX_SPEC_BYTES + 10) + "\n")
    assert code == 2 and "larger than 1048576 bytes" in err


def test_alias_bomb_is_refused_without_expanding(tmp_path: Path):
    t0 = time.monotonic()
    code, err = _validate(tmp_path, _bomb(), timeout=30)
    assert code == 2 and f"more than {MAX_NODES} values once aliases are expanded" in err
    assert err.startswith(f"dagcraft: {tmp_path / 'p.yaml'}:")
    assert time.monotonic() - t0 < 30


def test_deep_nesting_is_refused(tmp_path: Path):
    code, err = _validate(tmp_path, HEAD + "extra: " + "[" * 10_000 + "]" * 10_000 + "\n")
    assert code == 2 and f"nesting deeper than {MAX_DEPTH} levels" in err and ":4:" in err


def test_deep_block_nesting_is_refused(tmp_path: Path):
    body = "".join("  " * i + f"k{i}:\n" for i in range(200)) + "  " * 200 + "v: 1\n"
    code, err = _validate(tmp_path, HEAD + "extra:\n" + "".join("  " + ln + "\n" for ln in body.splitlines()))
    assert code == 2 and "nesting deeper" in err


def test_nul_byte_is_refused_with_its_position(tmp_path: Path):
    code, err = _validate(tmp_path, b'name: x\nsteps:\n  - {id: a, run: "echo \x00hi"}\n')
    assert code == 2 and err == f"dagcraft: {tmp_path / 'p.yaml'}:3:24: NUL byte in the spec"


def test_other_control_characters_are_invalid_yaml(tmp_path: Path):
    code, err = _validate(tmp_path, b'name: x\nsteps:\n  - {id: a, run: "echo \x01hi"}\n')
    assert code == 2 and "invalid YAML" in err


def test_huge_integer_in_the_spec(tmp_path: Path):
    code, err = _validate(tmp_path, "name: x\nsteps: [{id: a, run: echo, timeout: " + "9" * 5000 + "}]\n")
    assert code == 2 and "steps[0].timeout: integer out of range" in err


def test_huge_integer_param(tmp_path: Path):
    spec = "name: x\nparams: {n: {type: int}}\nsteps: [{id: a, run: echo}]\n"
    code, err = _validate(tmp_path, spec, "n=" + "9" * 5000)
    assert code == 2 and "out of range" in err
    code, err = _validate(tmp_path, spec, f"n={2**63}")
    assert code == 2 and "out of range" in err


def test_deeply_nested_list_param(tmp_path: Path):
    spec = "name: x\nparams: {l: {type: list}}\nsteps: [{id: a, run: echo}]\n"
    code, err = _validate(tmp_path, spec, "l=" + "[" * 50_000 + "]" * 50_000)
    assert code == 2 and "parameter 'l'" in err


# ----------------------------------------------------------------------------- evaluation at validate
BOMBS = [
    "${{ 9**999999999 > 1 }}",
    "${{ lipsum(n=10**6) }}",
    "${{ lipsum(n=1000) }}",
    "${{ range(10**9) | list }}",
    "${{ 'x' * 10**9 }}",
    "${{ ['x'] * 10**9 }}",
    "${{ 10**3000 * 10**3000 }}",
    "${{ '%999999999d' % 1 }}",
    "${{ '%*d' % (999999999, 1) }}",
    "${{ '{:999999999}'.format(1) }}",
    "${{ 'x' | center(10**9) }}",
    "${{ 'x' | center(999999999) }}",
    "${{ ('a' * 100000) | replace('a', 'b' * 1000) }}",
    "${{ ('a' * 100000).replace('a', 'b' * 1000) }}",
    "${{ ('\\n' * 100000) | indent(1000) }}",
    "${{ ('x' * 100000).join(range(1000) | list) }}",
    "${{ range(100000) | join('x' * 1000) }}",
    "${{ (range(100000) | map('string') | join) * 100 }}",
    "${{ range(100000) | map('center', 1000) | join | length }}",
    "${{ ('y' * 400000) ~ ('y' * 400000) ~ ('y' * 400000) }}",
    "${{ (['y' * 400000] * 100) | join }}",
    "${{ '{0}{0}{0}{0}'.format('y' * 400000) }}",
    "${{ ('%s' * 100) | format(*(['y' * 400000] * 100)) }}",
    "${{ ('a' * 1000).translate({97: 'y' * 400000}) }}",
    "${{ ('a ' * 1000) | wordwrap(1, wrapstring='y' * 400000) }}",
    "${{ ('http://a ' * 100) | urlize(target='y' * 400000) }}",
]


@pytest.mark.parametrize("expr", BOMBS)
def test_expression_bombs_are_refused_by_validate(tmp_path: Path, expr: str):
    t0 = time.monotonic()
    code, err = _validate(tmp_path, f"name: x\nsteps:\n  - id: a\n    run: {json.dumps('echo ' + expr)}\n",
                          timeout=60)
    assert code == 2, err
    assert err.startswith(f"dagcraft: {tmp_path / 'p.yaml'}:4:10: steps[0].run: "), err
    assert time.monotonic() - t0 < 30


def test_exponent_from_a_param_is_refused_by_validate(tmp_path: Path):
    spec = "name: x\nparams: {n: {type: int}}\nsteps:\n  - {id: a, run: 'echo ${{ 9 ** params.n > 1 }}'}\n"
    code, err = _validate(tmp_path, spec, "n=999999999")
    assert code == 2 and "too large" in err
    assert _validate(tmp_path, spec, "n=3")[0] == 0


def test_templates_cannot_modify_what_they_see():
    wf = compile_text("""
    name: x
    steps:
      - {id: a, run: [echo]}
      - {id: b, needs: [a], run: [echo, "${{ steps.a.outputs.update({'o': 'forged'}) }}"]}
    """)
    outputs = {"o": "real"}
    with pytest.raises(SpecError, match="unsafe"):
        render_command(wf, wf.steps["b"], RenderContext(steps={"a": {"outputs": outputs, "status": "succeeded"}}))
    assert outputs == {"o": "real"}
    with pytest.raises(Exception, match="unsafe"):
        evaluate_expression("${{ [1].append(2) }}", {})


def test_ordinary_expressions_still_work():
    assert evaluate_expression("${{ 2 ** 10 }}", {}) == 1024
    assert evaluate_expression("${{ 'ab' * 3 }}", {}) == "ababab"
    assert evaluate_expression("${{ range(5) | map('string') | join(',') }}", {}) == "0,1,2,3,4"
    assert evaluate_expression("${{ '%05d' % 42 }}", {}) == "00042"
    assert evaluate_expression("${{ '{:>6}'.format('x') }}", {}) == "     x"
    assert evaluate_expression("${{ 'x' | center(9) }}", {}) == "    x    "
    assert len(evaluate_expression("${{ lipsum(2, html=false) }}", {})) > 10


def test_evaluation_time_is_bounded():
    expr = "${{ range(100000)" + "|map('abs')" * 50 + "|sum }}"
    t0 = time.monotonic()
    with pytest.raises(EvaluationLimit, match="longer than"):
        evaluate_expression(expr, {})
    assert time.monotonic() - t0 < template.MAX_EVAL_S + 5


# ----------------------------------------------------------------------------- run time
SLOW = "${{ range(steps.up.outputs.n | int)" + "|map('abs')" * 40 + "|sum }}"


def test_bomb_from_an_upstream_output_fails_the_step_cleanly(local_store, tmp_path: Path):
    _, st = run_spec(local_store, tmp_path, """
        name: x
        steps:
          - {id: up, run: "echo n=999999999 >> $DAGCRAFT_OUTPUT", outputs: {values: [n]}}
          - {id: down, needs: [up], run: "echo ${{ 9 ** steps.up.outputs.n > 1 }}"}
    """)
    by = steps(st)
    assert st["status"] == "failed"
    assert by["down"]["status"] == "failed"
    assert "too large" in by["down"]["reason"] and "internal error" not in by["down"]["reason"]


def test_step_timeout_reaches_rendering(local_store, tmp_path: Path):
    t0 = time.monotonic()
    _, st = run_spec(local_store, tmp_path, f"""
        name: x
        steps:
          - {{id: up, run: "echo n=100000 >> $DAGCRAFT_OUTPUT", outputs: {{values: [n]}}}}
          - {{id: down, needs: [up], timeout: 200ms, run: "echo {SLOW}"}}
    """)
    by = steps(st)
    assert by["down"]["status"] == "failed"
    assert "timed out after 0.2s" in by["down"]["reason"] and "rendering" in by["down"]["reason"]
    assert time.monotonic() - t0 < 30


def test_render_stops_when_cancel_is_set_or_the_deadline_passes():
    wf = compile_text(f"""
    name: x
    steps:
      - {{id: up, run: [echo], outputs: {{values: [n]}}}}
      - {{id: down, needs: [up], run: "echo {SLOW}"}}
    """)
    ctx = RenderContext(steps={"up": {"outputs": {"n": "100000"}, "status": "succeeded"}})
    ev = threading.Event()
    ev.set()
    with pytest.raises(RenderCancelled):
        render_command(wf, wf.steps["down"], ctx, cancel=ev)
    t0 = time.monotonic()
    with pytest.raises(RenderTimedOut):
        render_command(wf, wf.steps["down"], ctx, timeout_s=0.1)
    assert time.monotonic() - t0 < template.MAX_EVAL_S
    with pytest.raises(SpecError, match="exceeds the limit"):  # a bound, not a step timeout
        render_command(wf, wf.steps["down"], ctx.model_copy(
            update={"steps": {"up": {"outputs": {"n": str(10**6)}, "status": "succeeded"}}}), timeout_s=60)


def test_cancel_stops_a_run_stuck_in_rendering(local_store, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(template, "MAX_EVAL_S", 600.0)  # only cancel can stop this render
    forever = "${{ range(steps.up.outputs.n | int)" + "|map('abs')" * 100 + "|sum }}"
    spec = write_spec(tmp_path, f"""
        name: x
        steps:
          - {{id: up, run: "echo n=100000 >> $DAGCRAFT_OUTPUT", outputs: {{values: [n]}}}}
          - {{id: down, needs: [up], run: "echo {forever}"}}
    """)
    rid = submit_spec(local_store, spec)
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(drive_inline(local_store, rid, tmp_path)))
    t.start()
    wait_for(lambda: steps(run_status(local_store, rid))["down"]["status"] == "running", what="down to start")
    assert cancel(local_store, rid) == "cancelling"
    t.join(timeout=60)
    assert not t.is_alive()
    assert result["status"] == "cancelled"
    assert steps(result)["down"]["status"] == "cancelled"


def test_deeply_nested_expression_is_refused(tmp_path: Path):
    expr = "${{ range(3)" + "|map('abs')" * 3000 + "|sum }}"
    code, err = _validate(tmp_path, f"name: x\nsteps:\n  - id: a\n    run: {json.dumps('echo ' + expr)}\n")
    assert code == 2 and "nested too deeply" in err


def test_template_value_too_large_for_an_env_var():
    wf = compile_text("""
    name: x
    params: {v: {type: string}}
    steps:
      - {id: s, run: 'echo "${{ params.v }}"'}
    """, {"v": "x" * 200_000})
    with pytest.raises(SpecError, match="longer than 100000 bytes"):
        render_command(wf, wf.steps["s"], RenderContext())


# ----------------------------------------------------------------------------- ids (audit)
@pytest.mark.parametrize("spec", [
    "name: x\nsteps:\n  - id: " + "s" * 151 + "\n    run: echo\n",
    "name: x\nsteps:\n  - id: s\n    matrix: {" + "k" * 70 + ": [" + "v" * 40 + "], " + "j" * 70 + ": [x]}\n    run: echo\n",
    # a foreach child is `id[999]`: the id itself must leave room for that suffix
    "name: x\nsteps:\n  - id: " + "f" * 146 + "\n    foreach: '${{ [1, 2] }}'\n    run: echo\n",
], ids=["plain", "matrix", "foreach"])
def test_step_ids_too_long_for_the_store_are_refused_by_validate(tmp_path: Path, spec: str):
    """A step id is one store key segment, also inside a journal entry: `validate` must refuse
    what the store would refuse at run time (where the step was retried forever, and a foreach
    child that could never be created left its run `running`)."""
    code, err = _validate(tmp_path, spec)
    assert code == 2, err
    assert "longer than the limit of 150 characters" in err, err
    assert err.startswith(f"dagcraft: {tmp_path / 'p.yaml'}:") and "steps[0]." in err, err


def test_step_ids_of_the_longest_allowed_length_run(local_store, tmp_path: Path):
    plain, fe = "s" * 150, "f" * 145
    _, result = run_spec(local_store, tmp_path, f"""
    name: x
    steps:
      - {{id: {plain}, run: "echo hi"}}
      - {{id: {fe}, needs: [{plain}], foreach: "${{{{ range(3) | list }}}}", run: "echo ${{{{ item }}}}"}}
    """)
    assert result["status"] == "succeeded", result
    assert steps(result)[f"{fe}[2]"]["status"] == "succeeded"


@pytest.mark.parametrize("field", [
    "outputs: {artifacts: [%s]}",
    "inputs: [{from: up, artifact: %s}]",
    "inputs: [{from: up, artifact: out.txt, as: %s}]",
])
@pytest.mark.parametrize("bad", ['"."', '"./out.txt"', '"x\\ny"', '"d/"', '"' + "a" * 201 + '"'])
def test_artifact_paths_the_store_refuses_are_refused_by_validate(tmp_path: Path, field: str, bad: str):
    """An artifact glob/name/destination is a store key below its step: `validate` refuses
    what the store refuses at run time ('.' segments, control characters, empty or over-long
    segments), instead of a step that can only fail."""
    spec = ("name: x\nsteps:\n  - {id: up, run: 'echo > out.txt', outputs: {artifacts: ['out.txt']}}\n"
            "  - id: s\n    needs: [up]\n    run: echo\n    " + field % bad + "\n")
    code, err = _validate(tmp_path, spec)
    assert code == 2, err
    assert "steps[1]." in err and ("artifact" in err or "destination" in err), err
