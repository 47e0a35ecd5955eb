"""Why a step failed, in words, where a user looks first: the committed AttemptInfo carries the
reason kind, its text and the redacted tail of stderr; the run summary, ``status`` and
``logs`` show them (issue 11, "A failed run does not say why")."""

from __future__ import annotations

import json

from dagcraft.orchestrator import layout
from dagcraft.orchestrator.model import STDERR_TAIL_BYTES, ReasonKind, load_state
from tests.orchestrator.helpers import cli, read_trace_events, run_spec, steps, write_spec

MISSING_AGENT = """
    name: missing-agent
    agents:
      asker: {command: [no-such-agent-cli, -p, "${{ prompt }}"]}
    steps:
      - id: ask
        agent: asker
        prompt: hello
      - id: after
        needs: [ask]
        run: echo after
"""


def _state(store, rid, step):
    return load_state(store.get(layout.step_state(rid, step))[0])


def test_missing_agent_binary_is_command_not_found_with_stderr_tail(local_store, tmp_path):
    rid, st = run_spec(local_store, tmp_path, MISSING_AGENT)
    assert st["status"] == "failed"
    ask = _state(local_store, rid, "ask")
    last = ask.history[-1]
    assert last.reason_kind == ReasonKind.COMMAND_NOT_FOUND and ask.reason_kind == ReasonKind.COMMAND_NOT_FOUND
    assert last.reason == "command not found: 'no-such-agent-cli' (exit code 127)"
    assert last.stderr_tail is not None and "cannot execute 'no-such-agent-cli'" in last.stderr_tail
    # status --json carries it for every viewer, with the command that shows the whole log
    by = steps(st)
    assert by["ask"]["reason_kind"] == "command_not_found"
    assert "cannot execute 'no-such-agent-cli'" in by["ask"]["stderr_tail"]
    assert by["ask"]["more"].startswith(f"dagcraft logs {rid}/ask --attempt 1 --stream stderr")
    assert by["after"]["status"] == "skipped" and "not started" in by["after"]["reason"]
    # the trace's closing event says it too
    fin = [e for e in read_trace_events(local_store, rid, "ask", 1) if e["kind"] == "run.finished"][-1]
    assert fin["payload"]["reason_kind"] == "command_not_found"


def test_shell_reasons_are_classified_and_tail_is_bounded_and_redacted(local_store, tmp_path):
    noisy = "; ".join(f"echo line-{i} >&2" for i in range(40))
    rid, st = run_spec(local_store, tmp_path, f"""
        name: shells
        on_failure: continue
        steps:
          - id: nocmd
            run: no-such-command-xyz
          - id: exits
            run: "{noisy}; echo 'token sk-ant-abcdefghijklmnopqrstuvwx leaked' >&2; exit 3"
          - id: killed
            run: "kill -9 $$"
          - id: slow
            run: "sleep 30"
            timeout: 1s
          - id: noout
            run: "true"
            outputs: {{values: [answer]}}
    """)
    got = {sid: _state(local_store, rid, sid).history[-1] for sid in ("nocmd", "exits", "killed", "slow", "noout")}
    assert got["nocmd"].reason_kind == ReasonKind.COMMAND_NOT_FOUND and "not found" in (got["nocmd"].stderr_tail or "")
    assert got["exits"].reason_kind == ReasonKind.EXIT_CODE and got["exits"].reason == "exit code 3"
    tail = got["exits"].stderr_tail or ""
    assert tail.splitlines()[:-1] == [f"line-{i}" for i in range(31, 40)]  # the last 10 lines only
    assert "sk-ant-" not in tail and "[redacted]" in tail.splitlines()[-1]
    assert len(tail.encode()) <= STDERR_TAIL_BYTES
    assert got["killed"].reason_kind == ReasonKind.KILLED and got["killed"].reason == "killed by signal 9 (SIGKILL)"
    assert got["slow"].reason_kind == ReasonKind.TIMED_OUT and got["slow"].reason == "timed out after 1s"
    assert got["noout"].reason_kind == ReasonKind.MISSING_OUTPUT and got["noout"].stderr_tail is None
    assert st["status"] == "failed"


def test_run_summary_and_status_explain_the_failure(local_store, tmp_path):
    spec = write_spec(tmp_path, MISSING_AGENT)
    store_dir = str(local_store.root)
    r = cli("run", str(spec), "--store", store_dir, "--workers", "1", "--no-report")
    assert r.returncode == 1, r.stderr
    rid = r.stdout.split()[1]
    out = r.stdout
    assert "failed: ask (attempt 1): command not found: 'no-such-agent-cli' (exit code 127)" in out
    assert "cannot execute 'no-such-agent-cli'" in out  # the stderr tail, not only in `logs --stream stderr`
    assert f"more: dagcraft logs {rid}/ask --attempt 1 --stream stderr --store {store_dir}" in out
    s = cli("status", rid, "--store", store_dir)
    assert s.returncode == 1
    assert "command not found" in s.stdout and "cannot execute 'no-such-agent-cli'" in s.stdout
    assert f"dagcraft logs {rid}/ask --attempt 1 --stream stderr" in s.stdout
    j = json.loads(cli("status", rid, "--store", store_dir, "--json").stdout)
    ask = next(x for x in j["steps"] if x["step"] == "ask")
    assert ask["reason_kind"] == "command_not_found" and "cannot execute" in ask["stderr_tail"]


def test_plain_logs_of_a_failed_step_with_empty_stdout_shows_stderr(local_store, tmp_path):
    spec = write_spec(tmp_path, MISSING_AGENT)
    store_dir = str(local_store.root)
    r = cli("run", str(spec), "--store", store_dir, "--workers", "1", "--no-report")
    rid = r.stdout.split()[1]
    lg = cli("logs", rid, "ask", "--store", store_dir)
    assert lg.returncode == 0
    assert "cannot execute 'no-such-agent-cli'" in lg.stdout
    assert "stdout is empty" in lg.stderr and "--stream stderr" in lg.stderr
    # an explicit --stream stdout still prints exactly the (empty) stdout
    only = cli("logs", rid, "ask", "--store", store_dir, "--stream", "stdout")
    assert only.returncode == 0 and only.stdout == ""
