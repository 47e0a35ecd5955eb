"""Issue 9.3: secrets come from the environment, a file or stdin as well as ``-p``, and every
command that compiles a spec or drives a run accepts them the same way. Real processes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dagcraft.orchestrator import run_status
from dagcraft.primitives import open_store
from tests.orchestrator.helpers import steps, write_spec
from tests.orchestrator.test_secrets import store_hits

SECRET = "s3cret-" + "Fh27XkPq0wYz"
SHA = hashlib.sha256(SECRET.encode()).hexdigest()
SPEC = f"""
    name: sources
    params:
      token: {{type: string, secret: true}}
      region: {{type: string, default: eu}}
    steps:
      - id: use
        run: "printf %s '${{{{ params.token }}}}' | sha256sum | grep -q {SHA} && echo ok=1 >> $DAGCRAFT_OUTPUT"
        outputs: {{values: [ok]}}
"""


def dagcraft(*args: str, env: dict[str, str] | None = None, stdin: str | None = None,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("DAGCRAFT_PARAM_")}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "dagcraft.cli.main", *args], env=full, cwd=cwd,
                          input=stdin if stdin is not None else "", capture_output=True, text=True,
                          timeout=120)


def assert_ran_with_secret(store_url: str, run_id: str) -> None:
    store = open_store(store_url)
    st = run_status(store, run_id)
    assert st["status"] == "succeeded", st
    assert steps(st)["use"]["outputs"]["ok"] == 1  # the step got the real value
    assert store_hits(store, SECRET) == []


@pytest.mark.parametrize("source", ["env", "file", "stdin", "param"])
def test_run_takes_a_secret_from_each_source(tmp_path, source):
    spec = write_spec(tmp_path, SPEC)
    store = str(tmp_path / "store")
    secret_file = tmp_path / "token.txt"
    secret_file.write_text(SECRET + "\n")  # one trailing newline is not part of the secret
    args, env, stdin = {
        "env": ([], {"DAGCRAFT_PARAM_TOKEN": SECRET}, None),
        "file": (["--secret-file", f"token={secret_file}"], {}, None),
        "stdin": (["--secret-stdin", "token"], {}, SECRET + "\n"),
        "param": (["-p", f"token={SECRET}"], {}, None),
    }[source]
    proc = dagcraft("run", str(spec), "--store", store, "--workers", "1", "--run-id", "r1", "--no-report",
                    *args, env=env, stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    assert_ran_with_secret(store, "r1")


@pytest.mark.parametrize("source", ["env", "file", "stdin"])
def test_validate_takes_a_secret_from_each_source(tmp_path, source):
    spec = write_spec(tmp_path, SPEC)
    (tmp_path / "t").write_text(SECRET)
    args, env, stdin = {
        "env": ([], {"DAGCRAFT_PARAM_TOKEN": SECRET}, None),
        "file": (["--secret-file", f"token={tmp_path / 't'}"], {}, None),
        "stdin": (["--secret-stdin", "token"], {}, SECRET),
    }[source]
    assert dagcraft("validate", str(spec), *args, env=env, stdin=stdin).returncode == 0
    missing = dagcraft("validate", str(spec))  # today's behaviour without any source
    assert missing.returncode == 2 and "'token' is required" in missing.stderr


@pytest.mark.parametrize("args, message", [
    (["--secret-file", "region=FILE"], "not declared 'secret: true'"),
    (["--secret-file", "nope=FILE"], "no such parameter"),
    (["--secret-file", "token"], "expects NAME=PATH"),
    (["--secret-file", "token=/does/not/exist"], "cannot read /does/not/exist"),
    (["--secret-file", "token=EMPTY"], "the secret is empty"),
    (["--secret-file", "token=FILE", "-p", "token=x"], "given twice"),
    (["--secret-file", "token=FILE", "--secret-stdin", "token"], "given twice"),
])
def test_bad_secret_options_are_one_line_exit_2(tmp_path, args, message):
    spec = write_spec(tmp_path, SPEC)
    (tmp_path / "f").write_text(SECRET)
    (tmp_path / "e").write_text("")
    args = [a.replace("FILE", str(tmp_path / "f")).replace("EMPTY", str(tmp_path / "e")) for a in args]
    for cmd in ("validate", "submit", "run"):
        extra = ["--store", str(tmp_path / "store")] if cmd != "validate" else []
        proc = dagcraft(cmd, str(spec), *extra, *args, stdin=SECRET)
        assert proc.returncode == 2, (cmd, proc.stderr)
        assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        assert "Traceback" not in proc.stderr and SECRET not in proc.stderr
    assert not (tmp_path / "store").exists()  # nothing written


def test_submit_then_worker_with_a_secret_file(tmp_path):
    spec = write_spec(tmp_path, SPEC)
    store = str(tmp_path / "store")
    (tmp_path / "t").write_text(SECRET)
    sub = dagcraft("submit", str(spec), "--store", store, "--run-id", "r2", "--secret-stdin", "token", stdin=SECRET)
    assert sub.returncode == 0, sub.stderr
    work = dagcraft("worker", "--store", store, "--run", "r2", "--exit-when-idle", "--quiet", "--poll-max", "0.1",
                    "--secret-file", f"token={tmp_path / 't'}")
    assert work.returncode == 0, work.stderr
    assert_ran_with_secret(store, "r2")


def test_resume_refuses_without_the_secret_and_runs_with_it(tmp_path):
    spec = write_spec(tmp_path, SPEC)
    store = str(tmp_path / "store")
    (tmp_path / "t").write_text(SECRET)
    assert dagcraft("submit", str(spec), "--store", store, "--run-id", "r3",
                    env={"DAGCRAFT_PARAM_TOKEN": SECRET}).returncode == 0
    refused = dagcraft("resume", "r3", "--store", store, "--workers", "1", "--no-report")
    assert refused.returncode == 2 and "needs secret parameter 'token'" in refused.stderr, refused.stderr
    assert refused.stderr.count("\n") == 1
    assert run_status(open_store(store), "r3")["status"] in ("pending", "running")  # untouched
    ok = dagcraft("resume", "r3", "--store", store, "--workers", "1", "--no-report",
                  "--secret-file", f"token={tmp_path / 't'}")
    assert ok.returncode == 0, ok.stderr
    assert_ran_with_secret(store, "r3")


@pytest.mark.parametrize("keep", [True, False])
def test_run_keep_workdirs_flag(tmp_path, keep):
    spec = write_spec(tmp_path, SPEC)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = dagcraft("run", str(spec), "--store", str(tmp_path / "store"), "--workers", "1", "--run-id", "k1",
                    "--no-report", *(["--keep-workdirs"] if keep else []),
                    env={"DAGCRAFT_PARAM_TOKEN": SECRET, "TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stderr
    attempt_dir = tmp / "dagcraft" / "k1" / "use" / "1"
    assert attempt_dir.is_dir() is keep
    if keep:
        assert (attempt_dir / "trace.jsonl").exists() and (attempt_dir.stat().st_mode & 0o777) == 0o700
    assert (tmp / "dagcraft").stat().st_mode & 0o777 == 0o700
