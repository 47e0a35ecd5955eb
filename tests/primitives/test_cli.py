"""The agent-facing CLI: context resolution, JSON output, exit codes, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from dagcraft.cli.main import cli

DAGCRAFT = [sys.executable, "-m", "dagcraft.cli.main"]


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def invoke(*args, env=None):
        res = runner.invoke(cli, list(args), env=env, catch_exceptions=False)
        return res.exit_code, res.stdout, res.stderr

    return invoke


def test_memory_commands(run):
    code, out, _ = run("agent", "memory", "set", "plan", '{"steps": 2}')
    assert code == 0
    version = out.strip()
    assert run("agent", "memory", "get", "plan") == (0, '{"steps": 2}\n', "")
    code, out, _ = run("agent", "memory", "get", "plan", "--json")
    assert json.loads(out) == {"key": "plan", "value": {"steps": 2}, "version": version, "scope": "shared"}
    code, _, err = run("agent", "memory", "set", "plan", "x", "--if-version", "stale")
    assert code == 3 and err.startswith("dagcraft: ") and err.count("\n") == 1
    assert run("agent", "memory", "set", "plan", "later", "--if-version", version)[0] == 0
    assert run("agent", "memory", "get", "plan")[1] == "later\n"
    assert run("agent", "memory", "get", "nope")[0] == 4
    assert json.loads(run("agent", "memory", "list", "--json")[1]) == ["plan"]
    hist = json.loads(run("agent", "memory", "history", "plan", "--json")[1])
    assert [h["value"] for h in hist] == [{"steps": 2}, "later"]
    # scoped by run: invisible from shared and vice versa
    assert run("agent", "memory", "set", "k", "1", "--run", "r1")[0] == 0
    assert run("agent", "memory", "get", "k")[0] == 4
    assert run("agent", "memory", "get", "k", env={"DAGCRAFT_RUN_ID": "r1"})[1] == "1\n"


def test_mail_and_identity(run):
    code, out, _ = run("agent", "send", "bob", "hello", "--as", "alice")
    mid = out.strip()
    msgs = json.loads(run("agent", "inbox", "--json", env={"DAGCRAFT_AGENT": "bob"})[1])
    assert [(m["id"], m["sender"], m["body"]) for m in msgs] == [(mid, "alice", "hello")]
    assert json.loads(run("agent", "inbox", "--json", env={"DAGCRAFT_STEP": "bob"})[1])[0]["id"] == mid  # step identity
    assert run("agent", "inbox", "--ack", "--as", "bob")[1] == f"{mid}\talice\thello\n"
    assert json.loads(run("agent", "inbox", "--json", "--as", "bob")[1]) == []


def test_claims(run):
    code, out, _ = run("agent", "claim", "task-1", "--as", "a", "--json")
    assert code == 0 and json.loads(out)["token"] == 1
    assert run("agent", "claim", "task-1", "--as", "b")[0] == 3
    assert run("agent", "renew", "task-1", "--as", "b")[0] == 3
    assert run("agent", "renew", "task-1", "--as", "a")[0] == 0
    assert run("agent", "release", "task-1", "--as", "a")[0] == 0
    assert run("agent", "release", "task-1", "--as", "a")[0] == 3
    code, out, _ = run("agent", "claim", "task-1", "--as", "b", "--json")
    assert json.loads(out)["token"] == 2
    assert run("agent", "renew", "never", "--as", "b")[0] == 4


def test_artifacts(run, tmp_path):
    (tmp_path / "r.txt").write_text("report")
    env = {"DAGCRAFT_RUN_ID": "r1", "DAGCRAFT_STEP": "plan"}
    code, out, _ = run("agent", "artifact", "put", "r.txt", "--json", env=env)
    ptr = json.loads(out)
    assert ptr["scope"] == "runs/r1/steps/plan" and ptr["uploader"] == "plan"
    assert json.loads(run("agent", "artifact", "list", "--json", env=env)[1])[0]["digest"] == ptr["digest"]
    assert run("agent", "artifact", "get", "r.txt", "dl/", env=env) == (0, "dl/r.txt\n", "")
    assert (tmp_path / "dl" / "r.txt").read_text() == "report"
    assert run("agent", "artifact", "get", "r.txt", "x")[0] == 4  # not in shared scope
    assert run("agent", "artifact", "put", "missing.txt")[0] == 4


def test_wait_for_exit_codes(run, tmp_path):
    from dagcraft.orchestrator import layout
    from dagcraft.primitives import LocalStore

    s = LocalStore(tmp_path / ".dagcraft")
    for step, st in [("a", "succeeded"), ("b", "skipped"), ("c", "failed"), ("d", "running")]:
        s.put(layout.step_state("r1", step), json.dumps({"status": st}).encode())
    assert run("agent", "wait-for", "a", "b", "--run", "r1")[0] == 0
    code, out, _ = run("agent", "wait-for", "a", "b", "--run", "r1", "--json")
    assert json.loads(out) == {"satisfied": True, "steps": {"a": "succeeded", "b": "skipped"}}
    assert run("agent", "wait-for", "a", "c", "--run", "r1")[0] == 1
    code, out, _ = run("agent", "wait-for", "a", "c", "--run", "r1", "--json")
    assert code == 1 and json.loads(out) == {"satisfied": False, "error": "upstream step 'c' is failed"}
    assert run("agent", "wait-for", "a", "../x", "--run", "r1")[0] == 2
    assert run("agent", "wait-for", "d", "--run", "r1", "--timeout", "0.2")[0] == 124
    assert run("agent", "wait-for", "a")[0] == 2  # no run id


def test_store_check(run, moto_server):
    from conftest import server_store_url

    assert run("store", "check")[0] == 0
    code, out, _ = run("store", "check", server_store_url(moto_server), "--json")
    assert code == 0 and json.loads(out)["ok"] is True


@pytest.mark.realserver
def test_store_check_real_server(run, real_s3_url):
    code, out, err = run("store", "check", real_s3_url, "--json")
    assert code == 0 and json.loads(out)["ok"] is True, (code, out, err)


@pytest.mark.parametrize("args", [
    ["agent", "memory", "set", "../etc", "1"], ["agent", "memory", "get", "/abs"], ["agent", "memory", "get", "a\x01b"],
    ["agent", "send", "a/b", "x"], ["agent", "claim", "../x"], ["agent", "artifact", "get", "../../x"], ["agent", "inbox", "--as", "a/b"],
    ["agent", "memory", "get", "k", "--run", ".."], ["agent", "wait-for", "a/b", "--run", "r"],
])
def test_bad_input_exit_2_one_line(run, args):
    code, out, err = run(*args)
    assert code == 2, (code, out, err)
    assert err.startswith("dagcraft: invalid") and err.count("\n") == 1


def test_subprocess_exit_codes_no_traceback(tmp_path, moto_server):
    from conftest import server_store_url

    env = {**os.environ, "DAGCRAFT_STORE": str(tmp_path / "st")}
    p = subprocess.run(DAGCRAFT + ["agent", "memory", "get", "../x"], env=env, capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    # unreachable endpoint: exit 5, names the endpoint, never prints the secret
    env2 = {**env, "AWS_SECRET_ACCESS_KEY": "s3cr3t-value", "DAGCRAFT_STORE": "s3://b/p?endpoint=http://127.0.0.1:9"}
    p = subprocess.run(DAGCRAFT + ["agent", "memory", "get", "k"], env=env2, capture_output=True, text=True)
    assert p.returncode == 5 and "127.0.0.1:9" in p.stderr and "s3cr3t" not in p.stderr + p.stdout
    assert p.stderr.count("\n") == 1
    # missing bucket: exit 5
    p = subprocess.run(DAGCRAFT + ["agent", "memory", "get", "k", "--store", f"s3://no-such-bucket/p?endpoint={moto_server}"],
                       env=env, capture_output=True, text=True)
    assert p.returncode == 5 and "does not exist" in p.stderr
    # missing credentials: exit 5
    env3 = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    env3.update(AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_EC2_METADATA_DISABLED="true")
    p = subprocess.run(DAGCRAFT + ["agent", "memory", "get", "k", "--store", f"s3://b/p?endpoint={moto_server}"],
                       env=env3, capture_output=True, text=True)
    assert p.returncode == 5 and "credentials" in p.stderr
    # and a working server store through --store
    url = server_store_url(moto_server)
    assert subprocess.run(DAGCRAFT + ["agent", "memory", "set", "k", "v", "--store", url], env=env).returncode == 0
    p = subprocess.run(DAGCRAFT + ["agent", "memory", "get", "k", "--store", url], env=env, capture_output=True, text=True)
    assert p.stdout == "v\n"


def test_cold_start_does_not_import_boto3(tmp_path):
    env = {**os.environ, "DAGCRAFT_STORE": str(tmp_path / "st")}
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "dagcraft.cli.main", "memory", "get", "k"],
                       env=env, capture_output=True, text=True)
    assert p.returncode == 4
    imported = {line.split("|")[-1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")}
    assert "dagcraft.primitives.local" in imported
    assert not {m for m in imported if m.startswith(("boto3", "botocore"))}
