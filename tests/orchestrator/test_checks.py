"""Issue 10, acceptance checks with feedback: a step's ``check:`` runs after its command exits 0;
a failing check fails the attempt (CHECK_FAILED, retryable), and the next attempt renders the
check's output through ``attempt.previous``. End to end through ``dagcraft run`` on the local
store and on the moto server."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from dagcraft.errors import SpecError
from dagcraft.orchestrator import layout, list_runs, run_status
from dagcraft.orchestrator.attempt import check_output
from dagcraft.orchestrator.model import CHECK_OUTPUT_BYTES, AttemptStatus, ReasonKind
from dagcraft.orchestrator.ops import load_states
from dagcraft.primitives import open_store
from dagcraft.workflows import compile_file
from tests.conftest import server_store_url
from tests.orchestrator.helpers import REPO, cli, read_trace_events, run_spec, steps, write_spec

AGENT = REPO / "examples" / "agents" / "fake_agent.py"

#: the fake agent writes impl.md with "status: draft" unless its prompt carries a FAIL line
FEEDBACK_SPEC = f"""
    name: checked
    agents:
      coder:
        command: [{json.dumps(sys.executable)}, {json.dumps(str(AGENT))}, -p, "${{{{ prompt }}}}",
                  --output-format, stream-json]
        adapter: claude
    steps:
      - id: implement
        agent: coder
        retries: {{limit: 2, backoff: 0.05s}}
        prompt: |
          Write the change to impl.md.
          Attempt ${{{{ attempt.number }}}}.
          ${{{{ 'Previous check output: ' ~ attempt.previous.check.output if attempt.previous else '' }}}}
          ${{{{ 'Previous reason: ' ~ attempt.previous.reason if attempt.previous else '' }}}}
        check: |
          echo "running the tests on impl.md"
          grep -q '^status: fixed' impl.md || {{ echo "FAIL: test_impl expected 'status: fixed'" >&2; exit 3; }}
          echo "all tests passed"
        outputs: {{artifacts: [impl.md]}}
"""


@pytest.fixture(params=["local", "s3server"])
def store_url(request: Any, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return server_store_url(request.getfixturevalue("moto_server"))


def _run(tmp_path: Path, store_url: str, text: str, code: int) -> tuple[Any, dict[str, Any], Any]:
    spec = write_spec(tmp_path, text)
    proc = cli("run", str(spec), "--store", store_url, "--no-report", cwd=tmp_path, timeout=240)
    assert proc.returncode == code, proc.stdout + proc.stderr
    st = open_store(store_url)
    runs = list_runs(st)
    assert runs, proc.stdout + proc.stderr
    return proc, run_status(st, runs[0]["run_id"]), st


def _artifact(store: Any, run_id: str, step: str, name: str) -> str:
    ptr = json.loads(store.get(f"{layout.step_scope(run_id, step)}/artifacts/{name}")[0])
    got = store.get(f"blobs/sha256/{ptr['digest'].split(':', 1)[1]}")
    assert got is not None
    return bytes(got[0]).decode()


def _prompt(events: list[dict[str, Any]]) -> str:
    """The agent's prompt, from the attempt's traced exec (its argv after ``-p``)."""
    argv = next(e["payload"]["argv"] for e in events if e["kind"] == "tool.call" and "-p" in e["payload"].get("argv", []))
    return str(argv[argv.index("-p") + 1])


def test_check_fails_once_then_passes_with_feedback(tmp_path, store_url):
    proc, status, store = _run(tmp_path, store_url, FEEDBACK_SPEC, 0)
    rid = status["run_id"]
    assert steps(status)["implement"]["status"] == "succeeded"
    hist = load_states(store, rid)["implement"].history
    assert [h.status for h in hist] == [AttemptStatus.FAILED, AttemptStatus.SUCCEEDED]
    first, second = hist
    assert first.reason_kind is ReasonKind.CHECK_FAILED and first.reason == "check failed: exit code 3"
    assert first.check_exit_code == 3 and second.check_exit_code == 0
    assert "FAIL: test_impl expected 'status: fixed'" in (first.check_output or "")
    assert "running the tests" in (first.check_output or "")  # stdout and stderr both
    assert "FAIL: test_impl" in (first.stderr_tail or "")  # the check's stderr, not the agent's
    # attempt 2's prompt carried attempt 1's check output and reason; attempt 1's had none
    p1 = _prompt(read_trace_events(store, rid, "implement", 1))
    p2 = _prompt(read_trace_events(store, rid, "implement", 2))
    assert "Attempt 1." in p1 and "Previous" not in p1
    assert "Attempt 2." in p2
    assert f"Previous check output: {first.check_output}" in p2
    assert "Previous reason: check failed: exit code 3" in p2
    assert "status: fixed" in _artifact(store, rid, "implement", "impl.md")
    # the check is part of each attempt's trace, its logs uploaded beside the command's
    for n, passed in ((1, False), (2, True)):
        kinds = [e["kind"] for e in read_trace_events(store, rid, "implement", n)]
        assert kinds.index("x.dagcraft.check.started") < kinds.index("x.dagcraft.check.finished")
        assert kinds.count("tool.call") >= 2  # the agent's exec and the check's
        fin = next(e for e in read_trace_events(store, rid, "implement", n) if e["kind"] == "x.dagcraft.check.finished")
        assert fin["payload"]["passed"] is passed
        log = store.get(f"{layout.attempt_prefix(rid, 'implement', n)}/check.stdout.log")
        assert log is not None and b"running the tests" in log[0]
    verify = cli("trace", "verify", rid, "--store", store_url)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_check_that_always_fails_ends_the_step_failed(tmp_path, store_url):
    proc, status, store = _run(tmp_path, store_url, """
        name: never-green
        steps:
          - id: build
            retries: {limit: 1, backoff: 0.05s}
            run: ["sh", "-c", "echo built > out.txt"]
            check: ["sh", "-c", "cat out.txt; echo 'tests: 1 failed' >&2; exit 1"]
    """, 1)
    rid = status["run_id"]
    by = steps(status)["build"]
    assert by["status"] == "failed"
    assert "check failed: exit code 1" in (by.get("reason") or ""), by
    hist = load_states(store, rid)["build"].history
    assert len(hist) == 2
    assert all(h.reason_kind is ReasonKind.CHECK_FAILED for h in hist)
    assert all("built" in (h.check_output or "") and "tests: 1 failed" in (h.check_output or "") for h in hist)
    assert "check failed: exit code 1" in proc.stdout + proc.stderr
    verify = cli("trace", "verify", rid, "--store", store_url)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_check_not_run_when_command_fails_and_previous_check_is_empty(local_store, tmp_path):
    marker = tmp_path / "checked"
    rid, st = run_spec(local_store, tmp_path, f"""
        name: cmd-fails
        on_failure: continue
        steps:
          - id: s
            retries: {{limit: 1, backoff: 0.05s}}
            run: "echo prev=${{{{ 'none' if not attempt.previous else 'nocheck' if attempt.previous.check.exit_code is none else 'ran' }}}} >> $DAGCRAFT_OUTPUT; test ${{{{ attempt.number }}}} -ge 2"
            check: "touch {marker}"
            outputs: {{values: [prev]}}
    """)
    by = steps(st)["s"]
    assert by["status"] == "succeeded"
    assert by["outputs"] == {"prev": "nocheck"}  # attempt 1 failed before its check: no exit code
    hist = load_states(local_store, rid)["s"].history
    assert hist[0].reason_kind is ReasonKind.EXIT_CODE and hist[0].check_exit_code is None
    assert hist[1].check_exit_code == 0 and marker.exists()


def test_check_output_is_redacted_and_bounded(local_store, tmp_path):
    rid, st = run_spec(local_store, tmp_path, """
        name: secret-check
        params:
          token: {default: "s3cr3t-value-xyz", secret: true}
        steps:
          - id: s
            run: ["true"]
            check: "python3 -c 'print(\\"x\\" * 20000)'; echo \\"token=${{ params.token }}\\"; exit 2"
    """)
    hist = load_states(local_store, rid)["s"].history
    out = hist[0].check_output or ""
    assert len(out.encode()) <= CHECK_OUTPUT_BYTES
    assert "s3cr3t-value-xyz" not in out and "token=[redacted]" in out
    assert out.startswith("x")  # the end is kept, the start of 20000 x's cut


def test_check_output_redacts_before_cutting(tmp_path):
    secret = "abcdefghijklmnop"
    log = tmp_path / "out.log"
    log.write_text("y" * 100 + secret + "z" * 10)
    out = check_output((log,), lambda t: t.replace(secret, "[redacted]"), limit=20)
    assert out.endswith("z" * 10 + "\n") and "abcdef"[-3:] not in out.replace("[redacted]", "")


@pytest.mark.parametrize("field,text", [
    ("when", "${{ attempt.number > 1 }}"),
    ("workdir", "w${{ attempt.number }}"),
])
def test_attempt_is_refused_where_no_attempt_renders(tmp_path, field, text):
    spec = write_spec(tmp_path, f"""
        name: bad
        steps:
          - id: s
            run: ["true"]
            {field}: {json.dumps(text)}
    """)
    with pytest.raises(SpecError, match=r"'attempt' is not available here \(only in a step's run"):
        compile_file(spec, {})


def test_check_shell_string_refuses_unsafe_template_with_line(tmp_path):
    spec = write_spec(tmp_path, """
        name: bad
        steps:
          - id: s
            run: ["true"]
            check: "eval ${{ attempt.previous.check.output }}"
    """)
    proc = cli("validate", str(spec), cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "pipeline.yaml:6" in proc.stderr + proc.stdout and "check" in proc.stderr + proc.stdout


def test_schema_has_check(tmp_path):
    proc = cli("schema", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert '"check"' in proc.stdout


def test_check_killed_by_the_timeout_fails_as_timed_out(local_store, tmp_path):
    rid, st = run_spec(local_store, tmp_path, """
        name: slow-check
        steps:
          - id: s
            timeout: 1s
            run: ["true"]
            check: ["sleep", "30"]
    """)
    assert steps(st)["s"]["status"] == "failed"
    (h,) = load_states(local_store, rid)["s"].history
    assert h.reason_kind is ReasonKind.TIMED_OUT and (h.reason or "").startswith("check: timed out")
