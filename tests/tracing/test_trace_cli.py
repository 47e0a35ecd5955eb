from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from _tracehelp import DATA, make_trace
from click.testing import CliRunner

from dagcraft.cli.main import cli
from dagcraft.tracing import read_trace

DAGCRAFT = [sys.executable, "-m", "dagcraft.cli.main"]


def invoke(*args, input=None, env=None):
    return CliRunner().invoke(cli, ["trace", *args], input=input, env=env, catch_exceptions=False)


def test_summary_inspect_verify(tmp_path):
    p = make_trace(tmp_path / "t.jsonl", n=3)
    r = invoke("summary", str(p), "--json")
    assert r.exit_code == 0 and json.loads(r.output)["events"] == 5
    r = invoke("summary", str(p))
    assert "status       succeeded" in r.output
    r = invoke("inspect", str(p), "--kind", "tool")
    assert r.exit_code == 0 and len(r.output.splitlines()) == 3 and "tool.call" in r.output
    r = invoke("inspect", str(p), "--json", "--kind", "run.finished")
    assert json.loads(r.output)["kind"] == "run.finished"
    r = invoke("verify", str(p))
    assert r.exit_code == 0 and "valid" in r.output
    lines = p.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b'"i":0', b'"i":7')
    p.write_bytes(b"\n".join(lines))
    r = invoke("verify", str(p))
    assert r.exit_code == 1 and "line 3:" in r.output and "tampered" in r.output


def test_user_errors_are_one_line_with_codes(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n{}\n")
    r = invoke("summary", str(bad))
    assert r.exit_code == 2 and "Traceback" not in r.output and "bad.jsonl:1" in r.output
    r = invoke("summary", str(tmp_path / "missing.jsonl"))
    assert r.exit_code == 4
    r = invoke("summary", str(tmp_path))
    assert r.exit_code == 2
    r = invoke("ledger", str(tmp_path), "--since", "yesterday-ish")
    assert r.exit_code == 2


def test_render_and_export(tmp_path):
    p = make_trace(tmp_path / "t.jsonl")
    out = tmp_path / "r.html"
    r = invoke("render", str(p), "--html", str(out))
    assert r.exit_code == 0 and 'data-status="succeeded"' in out.read_text()
    r = invoke("export", str(p), "--otlp-json", str(tmp_path / "o.json"))
    assert r.exit_code == 0 and json.loads((tmp_path / "o.json").read_text())["resourceSpans"]


def test_ledger_and_policy_cli(tmp_path):
    make_trace(tmp_path / "x" / "t.jsonl")
    r = invoke("ledger", str(tmp_path), "--json")
    assert r.exit_code == 0 and len(json.loads(r.output)) == 1
    r = invoke("ledger", str(tmp_path), "--status", "failed")
    assert "no traces match" in r.output
    p = tmp_path / "hooks.jsonl"
    hook = {"hook_event_name": "PreToolUse", "tool_name": "Bash", "tool_input": {"command": "git push -f"},
            "session_id": "sess1", "tool_use_id": "t1"}
    r = invoke("ingest", "--file", str(p), input=json.dumps(hook))
    assert r.exit_code == 0 and r.output == ""
    evs = read_trace(p)
    assert [e.kind for e in evs] == ["run.started", "tool.call"] and evs[0].run_id == "sess1"
    r = invoke("policy-check", str(p), "--json")
    assert r.exit_code == 1 and json.loads(r.output)["violations"][0]["rule"] == "sensitive_without_allow"
    allow = dict(hook, hook_event_name="PermissionRequest", decision="allow")
    r = invoke("ingest", input=json.dumps(allow), env={"DAGCRAFT_TRACE": str(p)})
    assert r.exit_code == 0
    r = invoke("ingest", "--file", str(p), input=json.dumps(hook))
    r = invoke("policy-check", str(p), "--no-defaults", "--sensitive", "git push")
    assert r.exit_code == 1 and "seq 2" in r.output and "seq 4" not in r.output  # the later call was allowed
    r = invoke("policy-check", str(p), "--no-defaults", "--sensitive", "curl")
    assert r.exit_code == 0
    # a bad payload fails with 1, never 2 (2 would block the agent's tool call in Claude Code)
    r = invoke("ingest", "--file", str(p), input="{not json")
    assert r.exit_code == 1
    r = invoke("ingest", input="{}", env={"DAGCRAFT_TRACE": ""})
    assert r.exit_code == 1


def test_exec_passes_exit_code_and_traces(tmp_path):
    f = tmp_path / "e.jsonl"
    r = subprocess.run(DAGCRAFT + ["trace", "exec", "--file", str(f), "--quiet", "--", sys.executable, "-c",
                                   "import sys; print('hi'); sys.exit(5)"], capture_output=True, timeout=60)
    assert r.returncode == 5
    evs = read_trace(f)
    assert [e.kind for e in evs] == ["run.started", "tool.call", "tool.result", "run.finished"]
    assert (tmp_path / "e.stdout.log").read_bytes() == b"hi\n"
    r = subprocess.run(DAGCRAFT + ["trace", "exec", "--file", str(tmp_path / "c.jsonl"), "--adapter", "claude",
                                   "--", "cat", str(DATA / "claude_stream.jsonl")], capture_output=True, timeout=60)
    assert r.returncode == 0 and b"total_cost_usd" in r.stdout  # echoed live
    assert subprocess.run(DAGCRAFT + ["trace", "verify", str(tmp_path / "c.jsonl")]).returncode == 0


def test_exec_forwards_sigterm_to_child_group(tmp_path):
    f = tmp_path / "s.jsonl"
    child = ("import signal, sys, time\n"
             "def h(s, fr):\n    print('child got', s, flush=True); sys.exit(42)\n"
             "signal.signal(signal.SIGTERM, h)\nprint('ready', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen(DAGCRAFT + ["trace", "exec", "--file", str(f), "--", sys.executable, "-c", child],
                            stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"ready\n"  # echoed by traced exec: the child is running
    os.kill(proc.pid, signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait(30) == 42
    assert b"child got 15" in rest
    res = read_trace(f)[-2].payload
    assert res["exit_code"] == 42 and res["forwarded_signal"] == 15


@pytest.mark.parametrize("args", [["--timeout", "0", "--", "true"], ["--", ]])
def test_exec_usage_errors(tmp_path, args):
    r = CliRunner().invoke(cli, ["trace", "exec", "--file", str(tmp_path / "u.jsonl"), *args])
    assert r.exit_code == 2


def test_tracing_imports_point_one_way():
    import ast
    from pathlib import Path

    import dagcraft.tracing as t

    for f in Path(t.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for n in names:
                assert not n.startswith(("dagcraft.orchestrator", "dagcraft.cli", "dagcraft.workflows")), (f, n)
                if n.startswith("dagcraft.primitives"):
                    assert n in ("dagcraft.primitives.keys", "dagcraft.primitives.ulid"), (f, n)  # pure helpers
