"""CLI (validate/graph/schema), golden graph output of every example, and the examples really run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dagcraft.cli.main import cli
from dagcraft.workflows import compile_file
from tests.workflows.minirun import run_workflow

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p.parent.name for p in (ROOT / "examples").glob("*/pipeline.yaml"))
GOLDEN = Path(__file__).parent / "golden"
FAKE = ROOT / "examples" / "agents" / "fake_agent.py"


def test_four_examples_with_readme():
    assert {"feature-review", "research-fanout", "rollback", "shell-pipeline"} <= set(EXAMPLES)
    for ex in EXAMPLES:
        readme = (ROOT / "examples" / ex / "README.md").read_text().strip()
        assert readme and "\n" not in readme


@pytest.mark.parametrize("example", EXAMPLES)
def test_validate_examples(example):
    r = CliRunner().invoke(cli, ["validate", str(ROOT / "examples" / example / "pipeline.yaml")])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("ok: ")


@pytest.mark.parametrize("fmt", ["text", "mermaid", "dot"])
@pytest.mark.parametrize("example", EXAMPLES)
def test_graph_golden(example, fmt):
    r = CliRunner().invoke(cli, ["graph", str(ROOT / "examples" / example / "pipeline.yaml"), "--format", fmt])
    assert r.exit_code == 0, r.output
    golden = GOLDEN / f"{example}.{fmt}"
    if os.environ.get("DAGCRAFT_UPDATE_GOLDEN"):
        golden.write_text(r.output)
    assert r.output == golden.read_text()


def test_graph_text_shape():
    r = CliRunner().invoke(cli, ["graph", str(ROOT / "examples/feature-review/pipeline.yaml"), "-p", "reviewers=[a, b, c]"])
    assert r.exit_code == 0
    lines = r.output.splitlines()
    assert lines[1] == "layer 0:" and lines[2].startswith("  plan ")
    assert "implement" in lines[4] and "foreach" in lines[4] and lines[4].endswith("<- plan")
    assert sum(1 for ln in lines if ln.startswith("  review[reviewer=")) == 3


def test_graph_dot_and_mermaid_are_parseable_shapes():
    r = CliRunner().invoke(cli, ["graph", str(ROOT / "examples/research-fanout/pipeline.yaml"), "--format", "dot"])
    assert r.output.startswith('digraph "research-fanout" {') and r.output.rstrip().endswith("}")
    assert r.output.count("->") == 4
    r = CliRunner().invoke(cli, ["graph", str(ROOT / "examples/research-fanout/pipeline.yaml"), "--format", "mermaid"])
    assert r.output.startswith("flowchart TD\n") and r.output.count("-->") == 4


def test_validate_bad_param_exit_2_and_one_line():
    r = CliRunner().invoke(cli, ["validate", str(ROOT / "examples/shell-pipeline/pipeline.yaml"), "-p", "count=ten"])
    assert r.exit_code == 2
    assert "params.count: parameter 'count': 'ten' is not an int" in r.output
    r = CliRunner().invoke(cli, ["validate", str(ROOT / "examples/shell-pipeline/pipeline.yaml"), "-p", "nope"])
    assert r.exit_code == 2 and "KEY=VALUE" in r.output
    r = CliRunner().invoke(cli, ["validate", "/nonexistent/p.yaml"])
    assert r.exit_code == 2 and "no such file" in r.output


def test_schema_is_json_schema():
    r = CliRunner().invoke(cli, ["schema"])
    assert r.exit_code == 0
    schema = json.loads(r.output)
    assert schema["type"] == "object" and "steps" in schema["properties"] and "finally" in schema["properties"]
    assert "StepSpec" in schema["$defs"] and schema["$defs"]["StepSpec"]["additionalProperties"] is False


def test_cli_binary_exit_code(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("name: x\nsteps:\n  - {id: a, needs: [b], run: [echo]}\n")
    r = subprocess.run([sys.executable, "-m", "dagcraft.cli.main", "validate", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == f"dagcraft: {bad}:3:21: steps[0].needs[0]: unknown step 'b'"
    assert os.listdir(tmp_path) == ["p.yaml"]


# ----------------------------------------------------------------------------- examples run


def _run(example, params=None, tmp_path=None):
    wf = compile_file(ROOT / "examples" / example / "pipeline.yaml", params or {})
    return wf, run_workflow(wf, tmp_path)


def test_feature_review_runs(tmp_path):
    wf, r = _run("feature-review", {}, tmp_path)
    assert set(r["status"].values()) == {"succeeded"}
    subtasks = r["results"]["plan"]["outputs"]["subtasks"]
    assert len(subtasks) == 3
    assert [k for k in r["status"] if k.startswith("implement[")] == ["implement[0]", "implement[1]", "implement[2]"]
    assert "merging 3 subtasks; verdicts: approve,approve" in r["stdout"]["merge"]
    assert r["results"]["merge"]["outputs"] == {"merged_subtasks": "3"}


def test_research_fanout_runs(tmp_path):
    _, r = _run("research-fanout", {"topics": "[a, b]"}, tmp_path)
    assert set(r["status"].values()) == {"succeeded"}
    summary = Path(r["results"]["summarize"]["artifacts"]["summary.md"]).read_text()
    assert "## topic=a" in summary and "## topic=b" in summary
    assert r["results"]["summarize"]["outputs"] == {"topics": "2"}


def test_shell_pipeline_runs(tmp_path):
    _, r = _run("shell-pipeline", {"count": "4", "scale": "2"}, tmp_path)
    assert r["results"]["aggregate"]["outputs"] == {"total": "20.00", "mean": "5.00"}
    assert "sum of 4 scaled numbers = 20.00 (mean 5.00)" in r["stdout"]["report"]


def test_rollback_example(tmp_path):
    state = tmp_path / "state"
    _, ok = _run("rollback", {"state_dir": str(state)}, tmp_path / "ok")
    assert set(ok["status"].values()) == {"succeeded"} and ok["rollbacks"] == []
    assert (state / "testrun" / "schema.txt").exists()
    _, bad = _run("rollback", {"fail_at": "deploy", "state_dir": str(state)}, tmp_path / "bad")
    assert bad["status"]["deploy"] == "failed" and bad["status"]["verify"] == "cancelled"
    assert bad["status"]["notify"] == "succeeded"  # finally runs regardless
    assert [x.split(":")[0] for x in bad["rollbacks"]] == ["migrate", "provision"]
    assert not (state / "testrun").exists()  # compensations really undid provision


# ----------------------------------------------------------------------------- fake agent


def _agent(tmp_path, mode, attempt="1", prompt="Write a plan for: a; b. Save it to plan.md and list subtasks."):
    env = {**os.environ, "FAKE_AGENT_MODE": mode, "DAGCRAFT_ATTEMPT": attempt, "DAGCRAFT_OUTPUT": str(tmp_path / "out.json")}
    return subprocess.run([sys.executable, str(FAKE), "-p", prompt, "--output-format", "stream-json"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=10)


def test_fake_agent_ok_stream_json(tmp_path):
    r = _agent(tmp_path, "ok")
    assert r.returncode == 0
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert events[0]["type"] == "system" and events[0]["subtype"] == "init" and events[0]["session_id"]
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "result" and "assistant" in kinds and "user" in kinds
    tool_use = [c for e in events if e["type"] == "assistant" for c in e["message"]["content"] if c["type"] == "tool_use"]
    assert tool_use and tool_use[0]["name"] == "Write"
    assert events[-1]["usage"]["output_tokens"] > 0 and events[-1]["total_cost_usd"] > 0
    assert (tmp_path / "plan.md").exists()
    assert json.loads((tmp_path / "out.json").read_text())["subtasks"] == ["a", "b"]


def test_fake_agent_modes(tmp_path):
    r = _agent(tmp_path, "fail")
    assert r.returncode == 1 and json.loads(r.stdout.splitlines()[-1])["is_error"] is True
    r = _agent(tmp_path, "flaky", attempt="1")
    assert r.returncode == 75 and "rate limit" in r.stderr
    r = _agent(tmp_path, "flaky", attempt="2")
    assert r.returncode == 0
    r = _agent(tmp_path, "ratelimit", attempt="3")
    assert r.returncode == 75
    with pytest.raises(subprocess.TimeoutExpired):
        env = {**os.environ, "FAKE_AGENT_MODE": "hang"}
        subprocess.run([sys.executable, str(FAKE), "-p", "x"], env=env, capture_output=True, timeout=0.5)


@pytest.mark.parametrize("example", EXAMPLES)
def test_examples_match_json_schema(example):
    jsonschema = pytest.importorskip("jsonschema")
    import yaml

    from dagcraft.workflows.spec import spec_json_schema

    schema = spec_json_schema()
    data = yaml.safe_load((ROOT / "examples" / example / "pipeline.yaml").read_text())
    jsonschema.validate(data, schema)
    data["steps"][0]["retries"] = 3
    data["steps"][0]["timeout"] = "1h30m"
    jsonschema.validate(data, schema)
    data["steps"][0]["nedds"] = []
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, schema)
