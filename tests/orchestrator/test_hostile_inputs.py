"""Issue 9, point 7: run ids, NUL in outputs, symlinked artifacts, wait-for on unknown steps,
read-only commands at a mistyped store path."""

from __future__ import annotations

import json

import pytest

from dagcraft.errors import InvalidInput, NotFound
from dagcraft.orchestrator import layout, list_runs
from dagcraft.orchestrator.waiting import wait_for_steps
from dagcraft.primitives.keys import validate_run_id
from tests.orchestrator.helpers import cli, run_spec, steps, submit_spec, write_spec

SPEC = """
    name: p7
    steps:
      - id: a
        run: "echo a"
"""


# -- run ids -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["a~b", " ", "-x", "<script>", "", ".", "..", ".hidden", "a/b", "a b", "é",
                                 "x" * 129, "a\x00b", "a\nb"])
def test_invalid_run_ids_are_refused(bad):
    with pytest.raises(InvalidInput, match="invalid run id"):
        validate_run_id(bad)
    with pytest.raises(InvalidInput):
        layout.run_record(bad)


@pytest.mark.parametrize("good", ["r1", "int-1", "feature-review-20261201-081817-8823", "_x", "v1.2", "A" * 128])
def test_valid_run_ids(good):
    assert validate_run_id(good) == good


@pytest.mark.parametrize("bad", ["a~b", " ", "<script>", "-x"])
def test_run_id_flag_is_exit_2_and_writes_nothing(tmp_path, bad):
    spec = write_spec(tmp_path, SPEC)
    store = tmp_path / "store"
    for cmd in ("run", "submit"):
        proc = cli(cmd, str(spec), "--store", str(store), f"--run-id={bad}")
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "invalid run id" in proc.stderr and "Traceback" not in proc.stderr
    assert not store.exists()


def test_a_run_id_with_tilde_is_never_hidden(local_store, tmp_path):
    # written before the rule existed: the index entry's run id is everything after the first '~'
    assert layout.parse_runs_index_key("runs-index/01M8RACY0M586TCCXW5WVSTN2D~a~b") == "a~b"
    submit_spec(local_store, write_spec(tmp_path, SPEC), run_id="fine-1")
    assert layout.parse_runs_index_key(local_store.list(layout.RUNS_INDEX)[0]) == "fine-1"
    assert [r["run_id"] for r in list_runs(local_store)] == ["fine-1"]


# -- NUL in outputs ----------------------------------------------------------------------------
@pytest.mark.parametrize("content", [b"x=a\x00b\n", b'{"x": ["ok", "a\\u0000b"]}', b'{"x": {"k": "\\u0000"}}'])
def test_nul_in_an_output_fails_the_step_for_good_naming_it(local_store, tmp_path, content):
    src = tmp_path / "outputs.src"
    src.write_bytes(content)
    _, st = run_spec(local_store, tmp_path, f"""
        name: nul
        steps:
          - id: a
            run: "cat {src} > $DAGCRAFT_OUTPUT"
            retries: 2
            outputs:
              values: [x]
    """)
    a = steps(st)["a"]
    assert a["status"] == "failed" and a["attempt"] == 1  # not retried: a rerun writes the same
    assert a["reason"] == "output 'x' contains a NUL byte"


# -- output size (audit) -----------------------------------------------------------------------
def test_outputs_larger_than_the_limit_fail_the_step_and_are_never_stored(local_store, tmp_path):
    """Outputs are hostile data that every status read and scheduler poll loads with the step
    state: more than MAX_OUTPUT bytes fail the step for good instead of a 60 MB state.json."""
    from dagcraft.workflows.template import MAX_OUTPUT

    src = tmp_path / "outputs.src"
    src.write_text("v=" + "a" * MAX_OUTPUT + "\n")
    rid, st = run_spec(local_store, tmp_path, f"""
        name: big
        steps:
          - id: a
            run: "cat {src} > $DAGCRAFT_OUTPUT"
            retries: 2
    """)
    a = steps(st)["a"]
    assert a["status"] == "failed" and a["attempt"] == 1, a
    assert a["reason"] == f"outputs are {MAX_OUTPUT + 3} bytes, more than the limit of {MAX_OUTPUT} " \
                          "(write big data as an artifact)"
    assert a["outputs"] == {}
    got = local_store.get(layout.step_state(rid, "a"))
    assert got is not None and len(got[0]) < 64 << 10


def test_outputs_just_under_the_limit_are_kept(local_store, tmp_path):
    src = tmp_path / "outputs.src"
    src.write_text("v=" + "a" * 1000 + "\n")
    _, st = run_spec(local_store, tmp_path, f"""
        name: ok
        steps:
          - {{id: a, run: "cat {src} > $DAGCRAFT_OUTPUT"}}
    """)
    assert steps(st)["a"]["outputs"] == {"v": "a" * 1000}


# -- symlinked artifacts -----------------------------------------------------------------------
def test_artifact_symlinked_outside_the_workdir_fails_and_is_never_uploaded(local_store, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not upload")
    _, st = run_spec(local_store, tmp_path, f"""
        name: link
        steps:
          - id: a
            run: "ln -s {secret} out.txt"
            outputs:
              artifacts: [out.txt]
    """)
    a = steps(st)["a"]
    assert a["status"] == "failed" and a["attempt"] == 1
    assert "'out.txt'" in a["reason"] and "outside the workdir" in a["reason"]
    assert local_store.list("blobs/") == []


def test_artifact_under_a_symlinked_directory_fails(local_store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.txt").write_text("x")
    _, st = run_spec(local_store, tmp_path, f"""
        name: linkdir
        steps:
          - id: a
            run: "ln -s {outside} out"
            outputs:
              artifacts: ["out/*.txt"]
    """)
    a = steps(st)["a"]
    assert a["status"] == "failed" and "'out/x.txt'" in a["reason"]
    assert local_store.list("blobs/") == []


def test_artifact_symlinked_inside_the_workdir_is_collected(local_store, tmp_path):
    _, st = run_spec(local_store, tmp_path, """
        name: linkin
        steps:
          - id: a
            run: "echo data > real.txt && ln -s real.txt out.txt"
            outputs:
              artifacts: [out.txt]
    """)
    a = steps(st)["a"]
    assert a["status"] == "succeeded" and a["artifacts"] == ["out.txt"]


# -- wait-for ----------------------------------------------------------------------------------
def test_wait_for_an_unknown_step_is_not_found_at_once(local_store, tmp_path):
    spec = write_spec(tmp_path, """
        name: wf
        steps:
          - id: a
            run: "true"
          - id: fan
            foreach: "${{ [1, 2] }}"
            run: "true"
    """)
    submit_spec(local_store, spec, run_id="w1")
    with pytest.raises(NotFound, match="step 'nope' not found in run 'w1'"):
        wait_for_steps(local_store, "w1", ["a", "nope"])  # no timeout: it must not wait at all
    with pytest.raises(NotFound, match="run 'w2' not found"):
        wait_for_steps(local_store, "w2", ["a"])
    # a foreach child that does not exist yet may still come: it is waited for
    from dagcraft.errors import TimedOut
    with pytest.raises(TimedOut):
        wait_for_steps(local_store, "w1", ["fan[0]"], timeout=0.1, initial=0.02)
    # once the parent has expanded, a child it does not have never will
    local_store.put(layout.step_state("w1", "fan"),
                    json.dumps({"step_id": "fan", "status": "expanded", "children": ["fan[0]", "fan[1]"]}).encode())
    with pytest.raises(NotFound):
        wait_for_steps(local_store, "w1", ["fan[7]"])


def test_wait_for_cli_unknown_step_exits_4(tmp_path):
    store = tmp_path / "store"
    spec = write_spec(tmp_path, SPEC)
    assert cli("submit", str(spec), "--store", str(store), "--run-id", "w1").returncode == 0
    proc = cli("agent", "wait-for", "nope", "--run", "w1", "--store", str(store), timeout=30)
    assert proc.returncode == 4 and "step 'nope' not found" in proc.stderr and "Traceback" not in proc.stderr


# -- read-only commands at a mistyped path -----------------------------------------------------
@pytest.mark.parametrize("args", [("status", "r1"), ("runs",), ("logs", "r1", "a"), ("trace", "summary", "r1"),
                                  ("trace", "verify", "r1"),
                                  # audit: commands on an existing run, and the agent's readers
                                  ("cancel", "r1"), ("resume", "r1"), ("retry", "r1/a"), ("rollback", "r1"),
                                  ("agent", "memory", "get", "k", "--run", "r1"),
                                  ("agent", "memory", "list", "--run", "r1"),
                                  ("agent", "memory", "history", "k", "--run", "r1"),
                                  ("agent", "artifact", "list", "--run", "r1"),
                                  ("agent", "artifact", "get", "f", "--run", "r1"),
                                  ("agent", "wait-for", "a", "--run", "r1", "--timeout", "1")])
def test_read_only_commands_never_create_a_store(tmp_path, args):
    typo = tmp_path / "stroe"
    proc = cli(*args, "--store", str(typo), cwd=tmp_path)
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.strip() == f"dagcraft: no store at {typo}"
    assert not typo.exists()


# -- terminal escapes (audit) ------------------------------------------------------------------
def test_status_and_run_never_print_a_step_s_terminal_escapes(tmp_path):
    """A step's stderr (its tail is shown by `run` and `status`) is hostile: an OSC sequence can
    retitle the terminal or write the clipboard, CSI can clear the screen. Shown escaped."""
    spec = write_spec(tmp_path, r"""
        name: esc
        steps:
          - id: a
            run: 'printf "\033]52;c;cHduZWQ=\007\033[2Jred\302\233Z\n" >&2; exit 1'
    """)
    store = tmp_path / "store"
    ran = cli("run", str(spec), "--store", str(store), "--workers", "1", "--no-report", "--run-id", "e1")
    shown = cli("status", "e1", "--store", str(store))
    assert ran.returncode == 1 and shown.returncode == 1, (ran.stderr, shown.stderr)
    for out in (ran.stdout + ran.stderr, shown.stdout + shown.stderr):
        assert "red" in out
        assert "\x1b" not in out and "\x07" not in out and "\x9b" not in out, repr(out)
        assert "\\x1b]52;c;cHduZWQ=\\x07" in out, out
