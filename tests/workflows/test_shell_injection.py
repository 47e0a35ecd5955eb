"""No template value is ever executed by the shell (issue 9, point 1).

Every context of the corpus is rendered and EXECUTED by real bash with every hostile value:
no ``PWNED`` file may appear and the value must arrive byte for byte. Every refused context
must fail ``validate`` with exit 2 and ``file:line:col: steps[0].run: …`` naming the context.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from dagcraft.errors import SpecError
from dagcraft.workflows import RenderContext, render_command, render_rollback
from tests.orchestrator.helpers import cli
from tests.workflows.helpers import compile_text

HOSTILE = [
    "$(touch PWNED)",
    "`touch PWNED`",
    "'; touch PWNED; '",
    '"; touch PWNED; "',
    "a\ntouch PWNED\nb",
    "EOF\ntouch PWNED\nEOF",
    "* ? [a-z] ~ {a,b} !(x)",
    "$((1)) $[2] ${IFS} $HOME",
    "${IFS}touch${IFS}PWNED",
    '\\"; touch PWNED #',
    "a[$(touch PWNED)]",
    "x) touch PWNED ;; *)",
    "%s %n %d \\n \\t",
    "-n",
    "  leading and trailing  ",
]

V = "${{ params.v }}"

# (name, script with {v} for the template, expected content of ./out given the value)
CORPUS: list[tuple[str, str, Callable[[str], str]]] = [
    ("bare word", "printf '%s' {v} > out", lambda v: v),
    ("double quotes", 'printf \'%s\' "{v}" > out', lambda v: v),
    ("double quotes with text", 'printf \'%s\' "pre {v} post" > out', lambda v: f"pre {v} post"),
    ("single quotes", "printf '%s' 'pre {v} post' > out", lambda v: f"pre {v} post"),
    ("mixed quoting in one word", "printf '%s' a\"b\"'c'{v}d > out", lambda v: f"abc{v}d"),
    ("ANSI-C quotes", "printf '%s' $'<{v}>' > out", lambda v: f"<{v}>"),
    ("heredoc body", "cat > out <<EOF\nline {v} end\nEOF", lambda v: f"line {v} end\n"),
    ("heredoc <<- body", "cat > out <<-EOF\n\t{v}\n\tEOF", lambda v: f"{v}\n"),
    ("here-string", "cat > out <<< {v}", lambda v: f"{v}\n"),
    ("quoted here-string", 'cat > out <<< "{v}"', lambda v: f"{v}\n"),
    ("command substitution", "x=$(printf '%s.' {v}); printf '%s' \"$x\" > out", lambda v: f"{v}."),
    ("$( ) in double quotes", "printf '%s' \"$(printf '%s.' '{v}')\" > out", lambda v: f"{v}."),
    ("process substitution", "cat <(printf '%s' {v}) > out", lambda v: v),
    ("case subject and pattern",
     "case {v} in {v}) printf same > out;; *) printf differ > out;; esac", lambda v: "same"),
    ("case pattern (globs are literal)",
     "case nomatch in {v}) printf yes > out;; *) printf no > out;; esac", lambda v: "no"),
    ("assignment", "X={v}; printf '%s' \"$X\" > out", lambda v: v),
    ("prefix assignment", "X={v} printenv X > out", lambda v: f"{v}\n"),
    ("export", "export X={v}; printenv X > out", lambda v: f"{v}\n"),
    ("local in a function", "f() {{ local y={v}; printf '%s' \"$y\" > out; }}; f", lambda v: v),
    ("string length of the variable", "X={v}; printf '%s' \"${{#X}}\" > out", lambda v: str(len(v))),
    ("[ ] test", "[ {v} = {v} ] && printf same > out", lambda v: "same"),
    ("[[ ]] string test", "[[ {v} == {v} ]] && printf same > out", lambda v: "same"),
    ("pipe", "printf '%s' {v} | cat > out", lambda v: v),
    ("printf arguments", "printf '%s|%s\\n' {v} \"{v}\" > out", lambda v: f"{v}|{v}\n"),
    ("comment", "printf ok > out # {v}", lambda v: "ok"),
    ("for loop list (one word)", "for x in {v}; do printf '%s' \"$x\" >> out; done", lambda v: v),
    ("function argument", "f() {{ printf '%s' \"$1\" > out; }}; f {v}", lambda v: v),
    ("subshell", "( printf '%s' {v} > out )", lambda v: v),
    ("brace group", "{{ printf '%s' {v}; }} > out", lambda v: v),
    ("if/then", "if true; then printf '%s' {v} > out; fi", lambda v: v),
    ("&& and || lists", "false || true && printf '%s' \"{v}\" > out", lambda v: v),
    ("while read from a here-string",
     "while IFS= read -r line; do printf '%s' \"$line\" >> out; done <<< {v}", lambda v: v.replace("\n", "")),
    ("redirect target", "mkdir d && printf '%s' data > d/{v} && ls -A d > out", lambda v: f"{v}\n"),
    ("two values in one word", "printf '%s' {v}:\"{v}\" > out", lambda v: f"{v}:{v}"),
]


def _run_bash(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env={"PATH": os.environ["PATH"], "HOME": str(cwd), **env},
                          capture_output=True, text=True, timeout=20)


def _spec(script: str) -> str:
    return json.dumps({"name": "inj", "params": {"v": {"type": "string"}},
                       "steps": [{"id": "s", "run": script, "rollback": script}]})


def test_corpus_is_big_enough():
    assert len(CORPUS) >= 20 and len(HOSTILE) >= 10


@pytest.mark.parametrize("name,script,expect", CORPUS, ids=[c[0] for c in CORPUS])
def test_every_context_executes_hostile_values_literally(tmp_path: Path, name, script, expect):
    template = script.format(v=V)
    for k, value in enumerate(HOSTILE):
        if name == "redirect target" and value.strip() != value:
            continue  # ls -A would still print it, but an all-space name is a poor file name
        wf = compile_text(_spec(template), {"v": value})
        for cmd in (render_command(wf, wf.steps["s"], RenderContext()),
                    render_rollback(wf, wf.steps["s"], RenderContext())):
            assert cmd is not None and cmd.shell and cmd.argv[:2] == ["bash", "-c"]
            assert value not in cmd.argv[2] or value == "-n"  # the value is never script text
            cwd = tmp_path / f"v{k}"
            cwd.mkdir(exist_ok=True)
            for p in cwd.iterdir():
                subprocess.run(["rm", "-rf", str(p)], check=True)
            out = _run_bash(cmd.argv, cmd.env, cwd)
            assert not (cwd / "PWNED").exists(), f"{name}: {value!r} was executed"
            assert out.returncode == 0, f"{name}: {value!r}: {out.stderr}"
            assert (cwd / "out").read_text() == expect(value), f"{name}: {value!r}"


def test_values_from_upstream_outputs_and_foreach_items(tmp_path: Path):
    wf = compile_text("""
    name: flow
    steps:
      - {id: up, run: [echo], outputs: {values: [v]}}
      - {id: each, needs: [up], foreach: "${{ steps.up.outputs.v }}",
         run: "printf '%s|%s' \\"${{ item }}\\" '${{ steps.up.outputs.v }}' > out"}
    """)
    for k, value in enumerate(HOSTILE):
        ctx = RenderContext(steps={"up": {"outputs": {"v": value}, "status": "succeeded"}}, item=value)
        cmd = render_command(wf, wf.steps["each"], ctx)
        cwd = tmp_path / str(k)
        cwd.mkdir()
        out = _run_bash(cmd.argv, cmd.env, cwd)
        assert out.returncode == 0, out.stderr
        assert not (cwd / "PWNED").exists()
        assert (cwd / "out").read_text() == f"{value}|{value}"


def test_dagcraft_run_with_a_hostile_upstream_output(tmp_path: Path):
    """End to end through ``dagcraft run``: an upstream step writes hostile outputs; the
    downstream shell strings (a plain step and foreach children) receive them as data."""
    value = '"; touch PWNED; "$(touch PWNED)`touch PWNED`\nEOF\ntouch PWNED'
    producer = tmp_path / "produce.py"
    producer.write_text("import json, os\n"
                        f"v = {value!r}\n"
                        "open(os.environ['DAGCRAFT_OUTPUT'], 'w').write(json.dumps({'v': v, 'items': [v, '$(touch PWNED)']}))\n")
    wd = tmp_path / "wd"
    wd.mkdir()
    spec = tmp_path / "pipeline.yaml"
    spec.write_text(f"""
name: hostile
steps:
  - {{id: up, run: ["{sys.executable}", "{producer}"], outputs: {{values: [v, items]}}}}
  - id: down
    needs: [up]
    workdir: wd
    run: |
      echo "got: ${{{{ steps.up.outputs.v }}}}" > got.txt
      cat > heredoc.txt <<EOF
      ${{{{ steps.up.outputs.v }}}}
      EOF
  - id: each
    needs: [up]
    workdir: wd
    foreach: "${{{{ steps.up.outputs.items }}}}"
    run: printf '%s\\n' '${{{{ item }}}}' >> items.txt
""")
    r = cli("run", str(spec), "--store", str(tmp_path / "store"), "--no-report", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert not (wd / "PWNED").exists() and not (tmp_path / "PWNED").exists()
    assert (wd / "got.txt").read_text() == f"got: {value}\n"
    assert (wd / "heredoc.txt").read_text() == f"{value}\n"
    assert sorted((wd / "items.txt").read_text().split("\n")[:-1]) == sorted([*value.split("\n"), "$(touch PWNED)"])


def test_the_issue_reproduction_creates_no_file(tmp_path: Path):
    wf = compile_text("""
    name: inj
    params: {x: {type: string}}
    steps:
      - {id: s, run: 'echo "${{ params.x }}"'}
    """, {"x": "$(touch PWNED)"})
    cmd = render_command(wf, wf.steps["s"], RenderContext())
    out = _run_bash(cmd.argv, cmd.env, tmp_path)
    assert out.stdout == "$(touch PWNED)\n"
    assert not (tmp_path / "PWNED").exists()


def test_nul_in_a_value_fails_the_render_cleanly():
    wf = compile_text("""
    name: inj
    params: {x: {type: string}}
    steps:
      - {id: s, run: 'echo "${{ params.x }}"'}
    """, {"x": "a\x00b"})
    with pytest.raises(SpecError, match="NUL"):
        render_command(wf, wf.steps["s"], RenderContext())


@pytest.mark.parametrize("key", ["BASH_ENV", "PS4", "PATH", "LD_PRELOAD"])
def test_env_vars_that_run_code_cannot_take_template_values(key):
    with pytest.raises(SpecError, match=rf"^t.yaml:\d+:\d+: steps\[0\].env.{key}: {key} is used by bash"):
        compile_text(f"""
        name: inj
        params: {{v: {{type: string, default: x}}}}
        steps:
          - {{id: s, run: "set -x; echo", env: {{{key}: "${{{{ params.v }}}}"}}}}
        """)
    compile_text(f"""
    name: ok
    steps:
      - {{id: s, run: "echo", env: {{{key}: "${{{{ env.HOME }}}}/x"}}}}
    """)


def test_step_env_cannot_shadow_a_template_value():
    with pytest.raises(SpecError, match="reserved"):
        compile_text("""
        name: inj
        steps:
          - {id: s, run: 'echo "${{ run.name }}"', env: {DAGCRAFT_V_1: x}}
        """)


# ----------------------------------------------------------------------------- refused
REFUSED = [
    ("eval", "eval {v}", "'eval'"),
    ("eval in quotes", 'eval "echo {v}"', "'eval'"),
    ("sh -c", "sh -c \"echo {v}\"", "shell"),
    ("bash -c", "bash -c 'echo {v}'", "shell"),
    ("sudo sh -c", "sudo -u nobody sh -c 'echo {v}'", "shell"),
    ("source", "source {v}", "'source'"),
    ("dot", ". {v}", "'.'"),
    ("trap", "trap 'echo {v}' EXIT", "'trap'"),
    ("let", "let x={v}", "'let'"),
    ("alias", "alias x='echo {v}'", "'alias'"),
    ("backticks", "echo `echo {v}`", "backticks"),
    ("backticks in double quotes", 'echo "`echo {v}`"', "backticks"),
    ("arithmetic expansion", "echo $(( {v} + 1 ))", "arithmetic"),
    ("arithmetic command", "(( x = {v} ))", "arithmetic"),
    ("old arithmetic", "echo $[ {v} ]", "arithmetic"),
    ("[[ -eq ]]", "[[ {v} -eq 1 ]]", "[[ ]]"),
    ("[[ -v ]]", "[[ -v {v} ]]", "[[ ]]"),
    ("parameter default", "echo ${{x:-{v}}}", "parameter expansion"),
    ("parameter default in quotes", 'echo "${{x:-{v}}}"', "parameter expansion"),
    ("quoted heredoc", "cat <<'EOF'\n{v}\nEOF", "quoted-delimiter heredoc"),
    ("double-quoted heredoc", 'cat <<"EOF"\n{v}\nEOF', "quoted-delimiter heredoc"),
    ("heredoc delimiter", "cat <<{v}\nx\n", "heredoc delimiter"),
    ("command name", "{v} --version", "command name"),
    ("command name after a keyword", "if {v}; then :; fi", "command name"),
    ("array subscript", "a[{v}]=1", "subscript"),
    ("compound array assignment", "a=(x {v})", "compound"),
    ("after a backslash", "echo \\{v}", "backslash"),
    ("after $", "echo ${v}", "'$'"),
    ("exec", "exec {v}", "'exec'"),
    ("env wrapper", "env X={v} sh -c 'echo $X'", "shell"),
    ("xargs", "echo hi | xargs {v}", "'xargs'"),
    ("find -exec", "find . -exec echo {v} ';'", "find -exec"),
    ("ssh", "ssh host echo {v}", "'ssh'"),
    ("read", "read {v}", "'read'"),
    ("unset", "unset {v}", "'unset'"),
    ("printf -v", "printf -v {v} x", "printf -v"),
    ("test -v", "test -v {v}", "-v"),
    ("declare -i", "declare -i n={v}", "declare"),
    ("declare -n", "declare -n r={v}", "declare"),
    ("export name", "export {v}=1", "variable name"),
    ("assigned then arithmetic", "n={v}\necho $((n + 1))", "arithmetic"),
    ("assigned then [[ -gt ]]", "n={v}; [[ $n -gt 1 ]] && echo big", "arithmetic"),
    ("flows through a second variable", "a={v}; b=$a; (( b > 1 ))", "arithmetic"),
    ("declared integer earlier", "declare -i n\nn={v}", "arithmetic"),
    ("loop variable then arithmetic", "for i in {v}; do echo $((i + 1)); done", "arithmetic"),
    ("read from a here-string then arithmetic", "read -r n <<< {v}; (( n > 1 ))", "arithmetic"),
    ("assigned then array subscript", "n={v}; echo ${{a[$n]}}", "arithmetic"),
    ("assigned then array literal key", "n={v}; a=([$n]=1)", "arithmetic"),
    ("bash -c with $( )", 'bash -c "$(printf %s {v})"', "shell"),
    ("piped into sh", "printf '%s' {v} | sh", "piped into"),
    ("piped into bash through cat", "echo {v} | cat | bash -s", "piped into"),
    ("piped into python", "echo {v} | python3", "piped into"),
    ("here-string into bash", "bash <<< {v}", "shell"),
    ("heredoc into sh", "sh <<EOF\necho {v}\nEOF", "heredoc fed"),
    ("heredoc into a pipeline into sh", "cat <<EOF | sh\necho {v}\nEOF", "heredoc fed"),
    ("process substitution into source", "source <(echo {v})", "'source'"),
    ("process substitution into bash", "bash <(echo {v})", "shell"),
    ("assigned then eval", 'X={v}; eval "echo $X"', "run as code"),
    ("assigned then bash -c", "X={v}\nbash -c \"$X\"", "run as code"),
    ("assigned then piped into sh", "X={v}; echo \"$X\" | sh", "run as code"),
    ("assigned then heredoc into sh", "X={v}\nsh <<EOF\n$X\nEOF", "run as code"),
    ("assigned then trap", "X={v}; trap 'echo $X' EXIT", "run as code"),
    ("function that evals its argument", 'f() {{ eval "$1"; }}; f {v}', "positional"),
    ("computed command name", "c=eval; $c {v}", "computed"),
    ("indirect expansion", "X={v}; echo ${{!X}}", "arithmetic"),
    ("assigned to PS4", "x={v}; PS4=$x; set -x; echo", "PS4"),
    ("prefix BASH_ENV", "BASH_ENV={v} bash -c :", "BASH_ENV"),
    ("exported PATH", "export PATH={v}", "PATH"),
    ("git ssh command", "GIT_SSH_COMMAND={v} git fetch", "GIT_SSH_COMMAND"),
    ("bash command hash table", "BASH_CMDS[ls]={v}; ls", "BASH_CMDS"),
    ("hash -p", "hash -p {v} ls", "'hash'"),
    ("prompt expansion of a variable", "x={v}; echo ${{x@P}}", "arithmetic"),
    ("a file written then run", "cat <<EOF > x.sh\necho {v}\nEOF\nbash x.sh", "writes a file"),
    ("a file written then sourced", "printf %s {v} > f; . ./f", "writes a file"),
    ("a file teed then run", "x={v}; tee f <<< \"$x\"; bash f", "writes a file"),
    ("piped into a read loop that evals", "echo {v} | while read l; do eval \"$l\"; done", "run as code"),
    ("value used as a name by printf -v", "x={v}; printf -v \"$x\" 1", "variable name"),
    ("value used as a name by read", "x={v}; read \"$x\" <<< 1", "variable name"),
    ("value used as a name by test -v", "x={v}; test -v \"$x\"", "variable name"),
    ("value used as a name by unset", "x={v}; unset \"$x\"", "variable name"),
    ("translated string", 'echo $"{v}"', '$"'),
    ("reserved variable", 'echo "$DAGCRAFT_V_1 {v}"', "reserved"),
    ("unterminated quote", "echo '{v}", "unterminated"),
    ("extended glob", "echo @(a|{v})", "glob"),
]


@pytest.mark.parametrize("name,script,why", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_contexts_at_compile_time(name, script, why):
    text = "name: inj\nparams: {v: {type: string, default: x}}\nsteps:\n  - id: s\n    run: " \
        + json.dumps(script.format(v=V)) + "\n"
    with pytest.raises(SpecError) as exc:
        compile_text(text, source="p.yaml")
    msg = str(exc.value)
    assert msg.startswith("p.yaml:5:10: steps[0].run: "), msg
    assert why in msg, msg
    assert "\n" not in msg


def test_refused_in_rollback_too():
    with pytest.raises(SpecError, match=r"^t.yaml:\d+:\d+: steps\[0\].rollback: .*'eval'"):
        compile_text("""
        name: inj
        steps:
          - {id: s, run: [echo], rollback: "eval ${{ run.name }}"}
        """)


def test_validate_refuses_with_exit_2_and_file_line(tmp_path: Path):
    spec = tmp_path / "p.yaml"
    spec.write_text("name: inj\nparams: {x: {type: string}}\nsteps:\n"
                    "  - id: s\n    run: |\n      echo ok\n      eval \"${{ params.x }}\"\n")
    r = cli("validate", str(spec), "-p", "x=1")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"dagcraft: {spec}:5:10: steps[0].run: ${{{{ }}}} in the arguments of 'eval'"), r.stderr
    assert "script line 2" in r.stderr and "Traceback" not in r.stderr


def test_scripts_without_templates_are_not_analysed():
    # syntax the lexer refuses is fine when no template value is in it
    wf = compile_text("""
    name: plain
    steps:
      - {id: s, run: "eval 'echo hi'; echo `date`; echo $(( 1 + 2 ))"}
    """)
    cmd = render_command(wf, wf.steps["s"], RenderContext())
    assert cmd.argv == ["bash", "-c", "eval 'echo hi'; echo `date`; echo $(( 1 + 2 ))"] and cmd.env == {}
