"""The CLI reads like one tool (issue 11, "CLI coherence"): the agent group, one way to address
a run and a step (``@latest`` included), ``--json`` on every command that prints a result,
help on every option, runs filters and empty stores, unwrapped plain output, trace headers
and totals, a shell-safe traces hint, and a missing bucket's fix."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from conftest import new_server_bucket

from dagcraft.cli.main import cli
from dagcraft.orchestrator import run_status
from dagcraft.primitives import open_store
from tests.orchestrator.helpers import drive_inline, write_spec

DAGCRAFT = [sys.executable, "-m", "dagcraft.cli.main"]
AGENT_CMDS = ("memory", "send", "inbox", "artifact", "claim", "renew", "release", "wait-for")

# Commands that print no result of their own, or whose output is already the result in its
# own format: everything else must have --json.
NO_JSON = {
    "worker": "long-running; logs to stderr",
    "ui": "long-running web server",
    "logs": "raw bytes of the step's log",
    "schema": "prints a JSON Schema already",
    "agent release": "prints nothing (the exit code is the result)",
    "trace ingest": "prints nothing (an agent hook)",
    "trace exec": "passes the command's own output through",
}


def invoke(*args: str, env: dict[str, str] | None = None, input: str | None = None):
    res = CliRunner().invoke(cli, list(args), env=env, input=input, catch_exceptions=False)
    return res.exit_code, res.stdout, res.stderr


def walk(group: click.Group, prefix: str = ""):
    for name, cmd in sorted(group.commands.items()):
        path = f"{prefix}{name}"
        yield path, cmd
        if isinstance(cmd, click.Group):
            yield from walk(cmd, path + " ")


SPEC = """
    name: two
    steps:
      - id: a
        run: "echo out-a; echo err-a >&2"
      - id: b
        needs: [a]
        run: "echo out-b"
"""


@pytest.fixture
def done_run(tmp_path, monkeypatch):
    """A finished run ``r1`` (and an older ``r0``) on a local store; returns the store URL."""
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path, SPEC)
    url = str(tmp_path / "store")
    for rid in ("r0", "r1"):
        assert invoke("submit", str(spec), "--store", url, "--run-id", rid)[0] == 0
    store = open_store(url)
    drive_inline(store, "r0", tmp_path)
    drive_inline(store, "r1", tmp_path)
    return url


# -- the agent group ---------------------------------------------------------------------------

def test_help_lists_user_commands_and_one_agent_group():
    code, out, _ = invoke("--help")
    assert code == 0
    listed = {line.split()[0] for line in out.split("Commands:")[1].splitlines() if line.strip()}
    assert "agent" in listed
    assert not listed & set(AGENT_CMDS), listed & set(AGENT_CMDS)
    code, out, _ = invoke("agent", "--help")
    assert code == 0
    assert {line.split()[0] for line in out.split("Commands:")[1].splitlines() if line.strip()} == set(AGENT_CMDS)


def test_old_agent_names_are_hidden_aliases(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert invoke("memory", "set", "k", "old")[0] == 0  # the old spelling still works
    assert invoke("agent", "memory", "get", "k") == (0, "old\n", "")
    code, out, _ = invoke("agent", "send", "bob", "hi", "--as", "al")
    assert code == 0
    assert json.loads(invoke("inbox", "--json", "--as", "bob")[1])[0]["id"] == out.strip()
    assert invoke("agent", "claim", "x", "--as", "a")[0] == 0
    assert invoke("claim", "x", "--as", "b")[0] == 3


# -- help and --json everywhere ----------------------------------------------------------------

def test_every_option_and_argument_has_help():
    missing = []
    for path, cmd in walk(cli):
        if not (cmd.help or "").strip():
            missing.append(f"{path}: no help text")
        text = cmd.help or ""
        for p in cmd.params:
            if isinstance(p, click.Option) and not (p.help or "").strip():
                missing.append(f"{path} {p.opts[-1]}")
            if isinstance(p, click.Argument) and p.human_readable_name.upper() not in text:
                missing.append(f"{path}: argument {p.human_readable_name} not described")
    assert not missing, missing


def test_every_command_that_prints_a_result_has_json():
    missing = [path for path, cmd in walk(cli) if not isinstance(cmd, click.Group) and not cmd.hidden
               and path not in NO_JSON and not any(p.name == "as_json" for p in cmd.params)]
    assert not missing, missing


# -- runs --------------------------------------------------------------------------------------

def test_runs_status_is_a_choice(done_run):
    code, _, err = invoke("runs", "--store", done_run, "--status", "bogus")
    assert code == 2 and "bogus" in err and "succeeded" in err
    code, out, _ = invoke("runs", "--store", done_run, "--status", "succeeded", "--json")
    assert code == 0 and [r["run_id"] for r in json.loads(out)] == ["r1", "r0"]


def test_runs_on_an_empty_store_says_so(tmp_path):
    url = str(tmp_path / "empty")
    assert invoke("agent", "memory", "set", "k", "v", "--store", url)[0] == 0  # the store exists
    code, out, _ = invoke("runs", "--store", url)
    assert (code, out) == (0, f"no runs in {url}\n")
    assert invoke("runs", "--store", url, "--json")[:2] == (0, "[]\n")
    code, _, err = invoke("status", "@latest", "--store", url)
    assert code == 4 and err.count("\n") == 1 and "no runs" in err


# -- one way to address runs and steps -----------------------------------------------------------

def test_latest_names_the_newest_run_everywhere(done_run):
    s = ("--store", done_run)
    code, out, _ = invoke("status", "@latest", "--json", *s)
    assert code == 0 and json.loads(out)["run_id"] == "r1"
    assert invoke("logs", "@latest/a", *s)[:2] == (0, "out-a\n")
    code, out, _ = invoke("trace", "summary", "@latest", "--json", *s)
    assert code == 0 and json.loads(out)["total"]["run_id"] == "r1"
    assert invoke("trace", "verify", "@latest/b", *s)[0] == 0
    assert invoke("agent", "wait-for", "a", "b", "--run", "@latest", *s)[0] == 0
    assert invoke("worker", "--run", "@latest", "--exit-when-idle", "--quiet", *s)[0] == 0  # r1 succeeded
    code, out, _ = invoke("cancel", "@latest", "--json", *s)
    assert code == 0 and json.loads(out) == {"run_id": "r1", "status": "succeeded"}  # finished: unchanged


def test_steps_are_addressed_one_way_in_two_spellings(done_run):
    s = ("--store", done_run)
    want = (0, "out-a\n")
    assert invoke("logs", "r1", "a", *s)[:2] == want
    assert invoke("logs", "r1/a", *s)[:2] == want
    assert invoke("logs", "r1/a/1", *s)[:2] == want
    assert invoke("logs", "r1", "a", "1", "--stream", "stderr", *s)[:2] == (0, "err-a\n")
    one = json.loads(invoke("trace", "summary", "r1/a", "--json", *s)[1])
    two = json.loads(invoke("trace", "summary", "r1", "a", "--json", *s)[1])
    assert one == two and one["path"] == "r1/a/1"
    code, _, err = invoke("logs", "r1", *s)
    assert code == 2 and "RUN/STEP" in err and err.count("\n") == 1
    code, _, err = invoke("status", "r1/a", *s)
    assert code == 2 and err.count("\n") == 1
    code, _, err = invoke("logs", "r1/a/x", *s)
    assert code == 2 and "attempt" in err
    code, _, err = invoke("logs", "r1/a/1", "--attempt", "2", *s)
    assert code == 2 and "attempt" in err


# -- --json on the run lifecycle -----------------------------------------------------------------

def test_json_on_validate_graph_submit_cancel(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path, SPEC)
    code, out, _ = invoke("validate", str(spec), "--json")
    got = json.loads(out)
    assert code == 0 and got["ok"] is True and got["name"] == "two" and got["steps"] == 2
    code, out, _ = invoke("graph", str(spec), "--json")
    got = json.loads(out)
    assert code == 0 and [n["id"] for n in got["nodes"]] == ["a", "b"] and got["edges"] == [["a", "b"]]
    bad = write_spec(tmp_path, "name: x\nsteps:\n  - id: a\n    needs: [zz]\n    run: 'true'\n", "bad.yaml")
    code, out, err = invoke("validate", str(bad), "--json")
    assert code == 2 and json.loads(out)["ok"] is False and "bad.yaml:" in json.loads(out)["error"]
    assert err.count("\n") == 1
    url = str(tmp_path / "store")
    code, out, _ = invoke("submit", str(spec), "--store", url, "--json")
    got = json.loads(out)
    assert code == 0 and got["steps"] == 2 and got["store"] == url
    code, out, _ = invoke("cancel", got["run_id"], "--store", url, "--json")
    # no live worker serves the run, so cancel finishes the cancellation itself
    assert code == 0 and json.loads(out) == {"run_id": got["run_id"], "status": "cancelled"}


def test_json_on_run_resume_retry(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path, SPEC)
    s = ("--store", str(tmp_path / "store"), "--workers", "1", "--no-report")
    code, out, err = invoke("run", str(spec), "--run-id", "j1", "--json", *s)
    got = json.loads(out)  # one JSON document: progress went to stderr
    assert code == 0 and got["run_id"] == "j1" and got["status"] == "succeeded"
    assert got["counts"] == {"succeeded": 2} and "submitted" in err
    code, out, _ = invoke("resume", "j1", "--json", *s)
    assert code == 0 and json.loads(out)["status"] == "succeeded"
    code, out, err = invoke("retry", "j1/b", "--json", *s)
    got = json.loads(out)
    assert code == 0 and got["reset"] == ["b"] and got["status"] == "succeeded"
    st = run_status(open_store(str(tmp_path / "store")), "j1")
    assert {x["step"]: x["attempt"] for x in st["steps"]} == {"a": 1, "b": 2}
    code, out, _ = invoke("retry", "j1", "--from", "b", "--detach", "--json", *s[:2])
    assert code == 0 and json.loads(out) == {"run_id": "j1", "reset": ["b"]}


# -- plain output, trace headers and totals, hints ---------------------------------------------------

def test_plain_output_does_not_wrap_through_a_pipe(tmp_path):
    long_id = "step_" + "x" * 140  # step ids are at most 150 characters
    spec = write_spec(tmp_path, f"""
        name: wide
        steps:
          - id: {long_id}
            run: "echo to-the-log"
          - id: bad
            needs: [{long_id}]
            run: "exit 3"
    """)
    p = subprocess.run(DAGCRAFT + ["run", str(spec), "--store", str(tmp_path / "s"), "--workers", "1",
                                   "--no-report", "--json"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "COLUMNS": "80"})
    assert p.returncode == 1, p.stderr  # a failed run: exit 1, and still its JSON
    got = json.loads(p.stdout)  # real worker processes wrote nothing else to stdout
    assert got["status"] == "failed" and got["counts"] == {"failed": 1, "succeeded": 1}
    assert any(line.endswith(f"{long_id}: succeeded attempt 1") for line in p.stderr.splitlines()), p.stderr


def test_trace_headers_name_run_step_attempt_and_summary_has_a_total(done_run, tmp_path):
    s = ("--store", done_run)
    code, out, _ = invoke("trace", "summary", "r1", *s)
    assert code == 0
    heads = [line for line in out.splitlines() if line.startswith("== ")]
    assert heads == ["== r1/a/1", "== r1/b/1", "== total"]
    assert str(tmp_path) not in out and "dagcraft-traces-" not in out
    total = out.split("== total")[1]
    assert "traces       2" in total and "events       10" in total
    got = json.loads(invoke("trace", "summary", "r1", "--json", *s)[1])
    assert [t["path"] for t in got["traces"]] == ["r1/a/1", "r1/b/1"]
    assert got["total"]["events"] == sum(t["events"] for t in got["traces"]) and got["total"]["traces"] == 2
    code, out, _ = invoke("trace", "inspect", "r1", *s)
    assert [line for line in out.splitlines() if line.startswith("== ")] == ["== r1/a/1", "== r1/b/1"]
    code, out, _ = invoke("trace", "verify", "r1", *s)
    assert out.splitlines()[0].startswith("r1/a/1: ") and "dagcraft-traces-" not in out


def test_traces_hint_is_quoted_for_the_shell(tmp_path, moto_server):
    from dagcraft.primitives.url import s3_url

    url = s3_url(new_server_bucket(moto_server), "p", endpoint=moto_server, region="us-east-1")
    spec = write_spec(tmp_path, "name: q\nsteps:\n  - id: a\n    run: 'true'\n")
    p = subprocess.run(DAGCRAFT + ["run", str(spec), "--store", url, "--workers", "1", "--no-report",
                                   "--run-id", "q1"], capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    [hint] = [line for line in p.stdout.splitlines() if line.startswith("traces: ")]
    # `?` globs and `&` backgrounds in a shell: the URL must be one quoted word
    assert hint == "traces: " + shlex.join(["dagcraft", "trace", "summary", "q1", "--store", url])


def test_store_check_says_how_to_create_a_missing_bucket(moto_server):
    url = f"s3://no-such-bucket-g/p?endpoint={moto_server}"
    p = subprocess.run(DAGCRAFT + ["store", "check", url], capture_output=True, text=True, timeout=60)
    assert p.returncode == 5 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert f"aws s3 mb s3://no-such-bucket-g --endpoint-url {moto_server}" in p.stderr


def test_docs_use_the_agent_group():
    root = Path(__file__).resolve().parents[2]
    texts = [p.read_text() for p in [root / "README.md", *sorted((root / "docs").glob("*.md")),
                                     *sorted((root / "examples").rglob("*.yaml")),
                                     *sorted((root / "examples").rglob("*.py"))]]
    for text in texts:
        for c in AGENT_CMDS:
            assert f"dagcraft {c} " not in text and f"`dagcraft {c}`" not in text, c


def test_json_on_rollback_and_trace_outputs(done_run, tmp_path):
    s = ("--store", done_run)
    code, out, _ = invoke("rollback", "r0", "--detach", "--json", *s)
    assert code == 0 and json.loads(out) == {"run_id": "r0", "status": "rolling_back"}
    code, out, _ = invoke("trace", "render", "@latest", "--html", str(tmp_path / "r.html"), "--json", *s)
    assert code == 0 and json.loads(out) == {"path": str(tmp_path / "r.html")} and (tmp_path / "r.html").exists()
    code, out, _ = invoke("trace", "export", "r1", "b", "--otlp-json", str(tmp_path / "o.json"), "--json", *s)
    assert code == 0 and json.loads(out) == {"path": str(tmp_path / "o.json")}
    code, out, _ = invoke("trace", "keygen", "--out", str(tmp_path / "k"), "--json")
    got = json.loads(out)
    assert code == 0 and got["public"] == str(tmp_path / "k.pub") and got["key_id"]
    code, out, _ = invoke("trace", "ledger", "@latest", "--json", *s)
    assert code == 0 and sorted(e["step"] for e in json.loads(out)) == ["a", "b"]


def test_latest_is_the_newest_submission_and_survives_a_reopen(store, tmp_path):
    from dagcraft.errors import NotFound
    from dagcraft.orchestrator import retry_from
    from dagcraft.orchestrator.ops import latest_run_id
    from tests.orchestrator.helpers import submit_spec

    with pytest.raises(NotFound):
        latest_run_id(store)
    spec = write_spec(tmp_path, "name: l\nsteps:\n  - id: a\n    run: 'true'\n")
    submit_spec(store, spec, run_id="old")
    assert latest_run_id(store) == "old"
    submit_spec(store, spec, run_id="new")
    assert latest_run_id(store) == "new"
    drive_inline(store, "old", tmp_path)
    retry_from(store, "old", "a")  # reopened: a fresh index entry, but not a newer submission
    assert latest_run_id(store) == "new"
