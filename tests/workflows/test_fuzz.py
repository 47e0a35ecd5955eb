"""Property-based fuzzing of loader, compiler and renderer (issue 9, point 2).

Through the CLI's ``validate``: never a traceback, always exit 0 or 2. And for every shell
script the compiler accepts, bash executing it with hostile values never runs them.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dagcraft.cli.main import cli
from dagcraft.errors import DagcraftError
from dagcraft.workflows import (
    RenderContext,
    compile_workflow,
    evaluate_when,
    parse_spec,
    render_command,
    render_rollback,
)

YAML_BITS = ["name: x\n", "steps:\n", "  - id: a\n", "    run: ", "echo hi\n", "[", "]", "{", "}", ": ", "- ",
             "&a ", "*a ", "<<: *a\n", "!!binary ", "!!python/object ", "'", '"', "\n", "  ", "#", "99999999999999999999",
             "${{ ", " }}", "params.v", "9**9**9", "'x'*9", "\x00", "\x01", "\t", "---\n", "...\n", "? ", "|\n", ">\n",
             "needs: [a]\n", "foreach: ", "matrix: ", "when: ", "timeout: ", "1e999", "-1", "~", "null", "é", "\ufeff"]

SHELL_BITS = ["echo", " ", "printf '%s'", "x", "'", '"', "$(", ")", "`", "$((", "))", "${", "}", "$x", "$", "\\", ";",
              "|", "&&", "\n", "<<EOF\n", "<<'EOF'\n", "EOF\n", "<<<", ">", "out", "#", "case", "in", "esac", ";;",
              "[[", "]]", "-eq", "=", "X=", "(", "{", "eval", "export", "for", "do", "done", "$'", "*", "~", "=~",
              "${{ params.v }}", "${{ params.v }}", "${{ params.v }}", "${{ 'a' ~ params.v }}", "${{ 9 ** 99 }}"]

HOSTILE = "$(touch PWNED)`touch PWNED`'\"; touch PWNED; \"'\nEOF\ntouch PWNED\n$((1))*"


def _validate_cli(text: str) -> tuple[int, BaseException | None, str]:
    with tempfile.TemporaryDirectory() as d:
        spec = Path(d) / "p.yaml"
        spec.write_text(text, encoding="utf-8", errors="surrogatepass")
        r = CliRunner().invoke(cli, ["validate", str(spec), "-p", "v=1"])
    exc = r.exception if not isinstance(r.exception, SystemExit) else None
    return r.exit_code, exc, r.output


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(YAML_BITS), max_size=40))
def test_validate_never_tracebacks_on_yaml_noise(bits):
    code, exc, out = _validate_cli("".join(bits))
    assert exc is None, f"{type(exc).__name__}: {exc}"
    assert code in (0, 2), out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_validate_never_tracebacks_on_arbitrary_text(text):
    code, exc, out = _validate_cli(text)
    assert exc is None, f"{type(exc).__name__}: {exc}"
    assert code in (0, 2), out


def _script_spec(script: str, expr_field: str) -> str:
    step = {"id": "s", "run": script, "rollback": script, "env": {"E": expr_field}, "when": expr_field}
    return json.dumps({"name": "fz", "params": {"v": {"type": "string", "default": "x"}},
                       "steps": [{"id": "up", "run": ["true"], "outputs": {"values": ["o"]}}, {**step, "needs": ["up"]}]})


EXPR_BITS = ["params.v", "1", "9", "**", "*", "+", "~", "'x'", "(", ")", "[", "]", "|", "length", "join", "center",
             "range", "lipsum", "format", "%", "'%9d'", "steps.up.outputs.o", "99999", ",", ".", "upper", "replace",
             "map", "'abs'", "list", "sum", "int", "999999999"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(SHELL_BITS), max_size=25), st.lists(st.sampled_from(EXPR_BITS), max_size=12))
def test_compile_and_render_never_traceback_and_accepted_scripts_never_run_values(shell_bits, expr_bits):
    script = "".join(shell_bits) or "true"
    expr = "${{ " + " ".join(expr_bits) + " }}"
    text = _script_spec(script, expr)
    code, exc, out = _validate_cli(text)
    assert exc is None, f"{type(exc).__name__}: {exc}"
    assert code in (0, 2), out
    try:
        wf = compile_workflow(parse_spec(text, "p.yaml"), {"v": HOSTILE})
    except DagcraftError as e:
        assert e.exit_code == 2
        return
    step = wf.steps["s"]
    ctx = RenderContext(steps={"up": {"outputs": {"o": HOSTILE}, "status": "succeeded"}})
    try:
        evaluate_when(step, ctx, {"up": "succeeded"})
    except DagcraftError as e:
        assert e.exit_code == 2
    try:
        cmds = [render_command(wf, step, ctx), render_rollback(wf, step, ctx)]
    except DagcraftError as e:
        assert e.exit_code == 2
        return
    with tempfile.TemporaryDirectory() as d:
        for cmd in cmds:
            assert cmd is not None
            if not cmd.shell:
                continue
            try:
                subprocess.run(cmd.argv, cwd=d, env={"PATH": os.environ["PATH"], **cmd.env}, stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=10)
            except subprocess.TimeoutExpired:
                pass
            assert not (Path(d) / "PWNED").exists(), f"{script!r} ran a template value"


# ----------------------------------------------------------------------------- grammar-built scripts
SLOT = "${{ params.v }}"


@st.composite
def _word(draw, depth: int = 0):
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["bare", "slot", "squote", "dquote", "ansi", "cmdsub"] if depth < 2
                                    else ["bare", "slot", "squote", "dquote"]))
        inner = draw(st.sampled_from(["", SLOT, f"a {SLOT} b", "x", f"{SLOT}{SLOT}"]))
        if kind == "bare":
            parts.append(draw(st.sampled_from(["a", "b*", "~", "x?", "-n", "%s"])))
        elif kind == "slot":
            parts.append(SLOT)
        elif kind == "squote":
            parts.append(f"'{inner}'")
        elif kind == "dquote":
            extra = draw(st.sampled_from(["", " $HOME", " $(printf '%s' q)", f" $(printf '%s' {SLOT})"]))
            parts.append(f'"{inner}{extra}"')
        elif kind == "ansi":
            parts.append(f"$'{inner}\\t'")
        else:
            parts.append("$(printf '%s' " + draw(_word(depth + 1)) + ")")
    return "".join(parts)


@st.composite
def _command(draw, depth: int = 0):
    w = draw(_word())
    kinds = ["printf", "assign", "herestring", "case", "for", "cond", "test", "heredoc", "group", "pipe"]
    kind = draw(st.sampled_from(kinds if depth == 0 else kinds[:7]))  # a heredoc ends its line: top level only
    if kind == "printf":
        return f"printf '%s\\n' {w} {draw(_word())}"
    if kind == "assign":
        return f"X={w}; printf '%s\\n' \"$X\" \"${{#X}}\""
    if kind == "heredoc":
        return f"cat <<EOF\n{draw(st.sampled_from(['', 'line ']))}{SLOT} $HOME\nEOF"
    if kind == "herestring":
        return f"cat <<< {w}"
    if kind == "case":
        return f"case {w} in {draw(_word())}) echo m;; *) echo n;; esac"
    if kind == "for":
        return f"for i in {w} {draw(_word())}; do printf '%s\\n' \"$i\"; done"
    if kind == "cond":
        return f"[[ {w} == {draw(_word())} ]] && echo same"
    if kind == "test":
        return f"[ {w} = {draw(_word())} ] || echo differ"
    if kind == "group":
        return "{ " + draw(_command(depth + 1)) + "; } > out"
    return draw(_command(depth + 1)) + " | cat"


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_command(), min_size=1, max_size=4), st.sampled_from(["; ", "\n", " && ", " || "]))
def test_grammar_scripts_are_accepted_and_never_run_values(commands, sep):
    if any("\nEOF" in c for c in commands):
        sep = "\n"  # a heredoc's delimiter must be alone on its line
    script = sep.join(commands)
    text = json.dumps({"name": "fz", "params": {"v": {"type": "string"}}, "steps": [{"id": "s", "run": script}]})
    wf = compile_workflow(parse_spec(text, "p.yaml"), {"v": HOSTILE})  # every construct here is safe: accepted
    cmd = render_command(wf, wf.steps["s"], RenderContext())
    assert HOSTILE not in cmd.argv[2]
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run(cmd.argv, cwd=d, env={"PATH": os.environ["PATH"], "HOME": d, **cmd.env},
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20)
        assert not (Path(d) / "PWNED").exists(), script
    # the script as rendered is still valid bash: the references did not break its syntax
    assert not any(e in r.stderr for e in ("syntax error near", "unexpected EOF", "bad substitution")), \
        (script, r.stderr)
