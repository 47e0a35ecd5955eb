"""Run-engine behaviour on the local store, driven by an in-process worker."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from dagcraft.orchestrator import cancel, layout, retry_from, run_status
from tests.orchestrator.helpers import (
    drive_inline,
    read_trace_events,
    run_spec,
    steps,
    submit_spec,
    wait_for,
    write_spec,
)


def test_outputs_artifacts_foreach_and_matrix(local_store, tmp_path):
    rid, st = run_spec(local_store, tmp_path, """
        name: flow
        steps:
          - id: plan
            run: "echo 'subtasks=[\\"parse\\", \\"render\\"]' >> $DAGCRAFT_OUTPUT; echo the-plan > plan.md"
            outputs: {values: [subtasks], artifacts: [plan.md]}
          - id: implement
            needs: [plan]
            foreach: "${{ steps.plan.outputs.subtasks }}"
            run: ["sh", "-c", "echo \\"done=$1\\" >> $DAGCRAFT_OUTPUT", "x", "${{ item }}"]
          - id: review
            needs: [implement]
            matrix: {who: [alice, bob]}
            run: ["sh", "-c", "echo \\"by=$1\\" >> $DAGCRAFT_OUTPUT", "x", "${{ matrix.who }}"]
          - id: merge
            needs: [review]
            inputs: [{from: plan, artifact: plan.md, as: in/plan.md}]
            run: "cat in/plan.md > merged.txt; echo n=${{ steps.implement.outputs | length }} >> $DAGCRAFT_OUTPUT"
            outputs: {values: [n], artifacts: [merged.txt]}
    """)
    assert st["status"] == "succeeded", st
    by = steps(st)
    assert by["plan"]["outputs"] == {"subtasks": ["parse", "render"]}
    assert by["implement"]["children"] == ["implement[0]", "implement[1]"]
    assert by["implement[0]"]["outputs"] == {"done": "parse"}
    assert by["implement[1]"]["outputs"] == {"done": "render"}
    assert by["review[who=alice]"]["outputs"] == {"by": "alice"}
    assert by["merge"]["outputs"] == {"n": 2}
    ptr = json.loads(local_store.get(f"{layout.step_scope(rid, 'merge')}/artifacts/merged.txt")[0])
    blob = local_store.get(f"blobs/sha256/{ptr['digest'].split(':', 1)[1]}")
    assert blob[0] == b"the-plan\n"


def test_retries_with_backoff_then_success(local_store, tmp_path):
    counter = tmp_path / "count"
    rid, st = run_spec(local_store, tmp_path, f"""
        name: flaky
        steps:
          - id: flaky
            retries: {{limit: 3, backoff: 0.1s, max_backoff: 0.2s}}
            run: "echo x >> {counter}; test $(wc -l < {counter}) -ge 3"
    """)
    assert st["status"] == "succeeded"
    assert counter.read_text().count("x") == 3
    assert steps(st)["flaky"]["attempt"] == 3
    kinds = [e["kind"] for e in read_trace_events(local_store, rid, "flaky", 1)]
    assert "step.retry" in kinds and kinds[0] == "run.started" and kinds[-1] == "run.finished"


def test_retry_on_exit_code_only(local_store, tmp_path):
    rid, st = run_spec(local_store, tmp_path, """
        name: retry-on
        on_failure: continue
        steps:
          - id: ratelimited
            retries: {limit: 2, backoff: 0.05s, retry_on: {exit_codes: [75]}}
            run: "test $DAGCRAFT_ATTEMPT -ge 2 || exit 75"
          - id: broken
            retries: {limit: 2, backoff: 0.05s, retry_on: {exit_codes: [75], patterns: ["rate limit"]}}
            run: "echo real failure; exit 1"
          - id: pattern
            retries: {limit: 2, backoff: 0.05s, retry_on: {patterns: ["rate limit"]}}
            run: "if [ $DAGCRAFT_ATTEMPT = 1 ]; then echo 'Error: rate limit exceeded' >&2; exit 1; fi"
    """)
    by = steps(st)
    assert by["ratelimited"]["status"] == "succeeded" and by["ratelimited"]["attempt"] == 2
    assert by["broken"]["status"] == "failed" and by["broken"]["attempt"] == 1
    assert by["pattern"]["status"] == "succeeded" and by["pattern"]["attempt"] == 2
    assert st["status"] == "failed"


def test_timeout_kills_hanging_agent(local_store, tmp_path):
    agent = Path(__file__).resolve().parents[2] / "examples" / "agents" / "fake_agent.py"
    rid, st = run_spec(local_store, tmp_path, f"""
        name: hang
        agents:
          fake: {{command: [python3, "{agent}", -p, "${{{{ prompt }}}}", --output-format, stream-json], adapter: claude,
                  env: {{FAKE_AGENT_MODE: hang}}}}
        steps:
          - id: stuck
            agent: fake
            prompt: never finishes
            timeout: 1s
    """)
    by = steps(st)
    assert by["stuck"]["status"] == "failed"
    assert "timed out" in by["stuck"]["reason"]
    kinds = [e["kind"] for e in read_trace_events(local_store, rid, "stuck", 1)]
    assert "step.timeout" in kinds


def test_on_failure_rollback_runs_compensations_in_reverse_once(local_store, tmp_path):
    log = tmp_path / "log"
    rid, st = run_spec(local_store, tmp_path, f"""
        name: rb
        on_failure: rollback
        steps:
          - id: a
            run: "echo do-a >> {log}"
            rollback: "echo undo-a >> {log}"
          - id: b
            needs: [a]
            run: "echo do-b >> {log}"
            rollback: "echo undo-b >> {log}"
          - id: c
            needs: [b]
            run: "echo do-c >> {log}"
            rollback: "echo undo-c >> {log}"
          - id: d
            needs: [c]
            run: "exit 3"
    """)
    assert st["status"] == "rolled_back", st
    assert log.read_text().split() == ["do-a", "do-b", "do-c", "undo-c", "undo-b", "undo-a"]
    by = steps(st)
    assert by["a"]["status"] == "rolled_back" and by["d"]["status"] == "failed"
    kinds = [e["kind"] for e in read_trace_events(local_store, rid, "b", "rollback-1")]
    assert "rollback.started" in kinds and "rollback.finished" in kinds


def test_when_failure_handler_and_skip_propagation(local_store, tmp_path):
    rid, st = run_spec(local_store, tmp_path, """
        name: handlers
        on_failure: continue
        steps:
          - id: bad
            run: "exit 1"
          - id: after
            needs: [bad]
            run: "true"
          - id: alert
            needs: [bad]
            when: "${{ failure() }}"
            run: "true"
          - id: independent
            run: "true"
    """)
    by = steps(st)
    assert by["after"]["status"] == "skipped"
    assert by["alert"]["status"] == "succeeded"
    assert by["independent"]["status"] == "succeeded"
    assert st["status"] == "failed"


def test_cancel_stops_running_pipeline(local_store, tmp_path):
    pidfile = tmp_path / "pid"
    spec = write_spec(tmp_path, f"""
        name: long
        steps:
          - id: sleeper
            run: "echo $$ > {pidfile}; exec sleep 60"
          - id: never
            needs: [sleeper]
            run: "true"
    """)
    rid = submit_spec(local_store, spec)
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(drive_inline(local_store, rid, tmp_path)))
    t.start()
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="sleeper to start")
    assert cancel(local_store, rid) == "cancelling"
    t.join(timeout=30)
    assert not t.is_alive()
    assert result["status"] == "cancelled"
    by = steps(result)
    assert by["sleeper"]["status"] == "cancelled" and by["never"]["status"] == "cancelled"
    pid = int(pidfile.read_text())
    import os

    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_retry_from_reruns_only_the_subtree(local_store, tmp_path):
    log = tmp_path / "log"
    text = f"""
        name: subtree
        steps:
          - id: a
            run: "echo a >> {log}"
          - id: b
            needs: [a]
            run: "echo b >> {log}"
          - id: c
            needs: [b]
            run: "echo c >> {log}"
          - id: side
            needs: [a]
            run: "echo side >> {log}"
    """
    rid, st = run_spec(local_store, tmp_path, text)
    assert st["status"] == "succeeded"
    reset = retry_from(local_store, rid, "b")
    assert reset == ["b", "c"]
    st = drive_inline(local_store, rid, tmp_path)
    assert st["status"] == "succeeded"
    lines = log.read_text().split()
    assert lines.count("a") == 1 and lines.count("side") == 1
    assert lines.count("b") == 2 and lines.count("c") == 2
    assert steps(st)["b"]["attempt"] == 2
    read_trace_events(local_store, rid, "b", 1)  # the first attempt's trace is kept


def test_cache_skips_identical_step(local_store, tmp_path):
    counter = tmp_path / "calls"
    text = f"""
        name: cached
        steps:
          - id: expensive
            cache: true
            run: "echo call >> {counter}; echo answer=42 >> $DAGCRAFT_OUTPUT"
            outputs: {{values: [answer]}}
          - id: use
            needs: [expensive]
            run: "test ${{{{ steps.expensive.outputs.answer }}}} = 42"
    """
    _, st1 = run_spec(local_store, tmp_path, text)
    rid2, st2 = run_spec(local_store, tmp_path, text)
    assert st1["status"] == st2["status"] == "succeeded"
    assert counter.read_text().split() == ["call"]
    assert steps(st2)["expensive"]["cached_from"]
    kinds = [e["kind"] for e in read_trace_events(local_store, rid2, "expensive", 1)]
    assert "x.dagcraft.cache_hit" in kinds


def test_secret_params_never_reach_the_store(local_store, tmp_path, monkeypatch):
    monkeypatch.setenv("DAGCRAFT_PARAM_TOKEN", "s3cr3t-value-123")
    rid, st = run_spec(local_store, tmp_path, """
        name: secrets
        params:
          token: {type: string, secret: true}
        steps:
          - id: use
            run: "echo using ${{ params.token }}"
    """, params={"token": "s3cr3t-value-123"})
    assert st["status"] == "succeeded"
    for key in local_store.list(layout.run_prefix(rid)):
        got = local_store.get(key)
        assert got is not None and b"s3cr3t-value-123" not in got[0], key
    stdout = local_store.get(f"{layout.attempt_prefix(rid, 'use', 1)}/stdout.log")[0]
    assert b"[redacted]" in stdout


def test_status_of_unknown_run_is_not_found(local_store):
    from dagcraft.errors import NotFound

    with pytest.raises(NotFound):
        run_status(local_store, "nope")


def test_retry_from_reexpands_foreach_with_new_items(local_store, tmp_path):
    items = tmp_path / "items.json"
    items.write_text('["a", "b"]')
    log = tmp_path / "log"
    rid, st = run_spec(local_store, tmp_path, f"""
        name: reexpand
        steps:
          - id: plan
            run: "echo list=$(cat {items}) >> $DAGCRAFT_OUTPUT"
            outputs: {{values: [list]}}
          - id: each
            needs: [plan]
            foreach: "${{{{ steps.plan.outputs.list }}}}"
            run: ["sh", "-c", "echo $1 >> {log}", "x", "${{{{ item }}}}"]
    """)
    assert st["status"] == "succeeded"
    items.write_text('["c", "d", "e"]')
    retry_from(local_store, rid, "plan")
    st = drive_inline(local_store, rid, tmp_path)
    assert st["status"] == "succeeded"
    assert steps(st)["each"]["children"] == ["each[0]", "each[1]", "each[2]"]
    lines = log.read_text().split()
    assert sorted(lines[:2]) == ["a", "b"] and sorted(lines[2:]) == ["c", "d", "e"]
    items.write_text('["f"]')  # fewer items: the extra children are retired, not left pending
    retry_from(local_store, rid, "plan")
    st = drive_inline(local_store, rid, tmp_path)
    assert st["status"] == "succeeded"
    by = steps(st)
    assert by["each"]["children"] == ["each[0]"]
    assert by["each[1]"]["status"] == by["each[2]"]["status"] == "skipped"
    assert log.read_text().split()[-1] == "f"


def test_steps_coordinate_through_the_agent_cli(local_store, tmp_path):
    """Inside a step, DAGCRAFT_* scope `dagcraft agent memory|send|inbox|artifact` to the run."""
    rid, st = run_spec(local_store, tmp_path, """
        name: talk
        steps:
          - id: writer
            run: "dagcraft agent memory set plan '\\"ship it\\"' && dagcraft agent send reader hello && echo note > n.txt && dagcraft agent artifact put n.txt"
          - id: reader
            needs: [writer]
            run: "test \\"$(dagcraft agent memory get plan)\\" = 'ship it' && dagcraft agent inbox --json | grep -q hello && dagcraft agent artifact get n.txt got.txt --step writer && grep -q note got.txt"
    """)
    by = steps(st)
    assert by["writer"]["status"] == "succeeded", by["writer"]
    assert by["reader"]["status"] == "succeeded", by["reader"]
    assert any(k.startswith(f"runs/{rid}/memory/") for k in local_store.list(f"runs/{rid}/"))


def test_cancel_during_foreach_leaves_no_step_open(local_store, tmp_path):
    started = tmp_path / "started"
    spec = write_spec(tmp_path, f"""
        name: cancel-fanout
        steps:
          - id: plan
            run: "echo 'xs=[1, 2, 3, 4, 5, 6]' >> $DAGCRAFT_OUTPUT"
            outputs: {{values: [xs]}}
          - id: each
            needs: [plan]
            foreach: "${{{{ steps.plan.outputs.xs }}}}"
            run: "touch {started}; exec sleep 60"
    """)
    rid = submit_spec(local_store, spec)
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(drive_inline(local_store, rid, tmp_path, concurrency=2)))
    t.start()
    wait_for(lambda: started.exists(), what="a child to start")
    cancel(local_store, rid)
    t.join(timeout=60)
    assert result["status"] == "cancelled"
    by = steps(result)
    assert by["each"]["status"] == "cancelled"
    assert {by[f"each[{i}]"]["status"] for i in range(6)} == {"cancelled"}


def test_second_worker_renders_outputs_it_only_saw_in_the_journal(local_store, tmp_path):
    """A fresh worker learns that `a` succeeded from journal keys alone (no GET); before
    rendering `b` it must read `a`'s outputs."""
    rid, st = run_spec(local_store, tmp_path, """
        name: handoff
        steps:
          - id: a
            run: "echo answer=42 >> $DAGCRAFT_OUTPUT"
            outputs: {values: [answer]}
          - id: b
            needs: [a]
            run: "test ${{ steps.a.outputs.answer }} = 42 && echo ok=$DAGCRAFT_ATTEMPT >> $DAGCRAFT_OUTPUT"
    """)
    assert st["status"] == "succeeded"
    retry_from(local_store, rid, "b")
    st = drive_inline(local_store, rid, tmp_path)  # a new worker, a new view
    by = steps(st)
    assert by["b"]["status"] == "succeeded" and by["b"]["outputs"] == {"ok": 2}
    assert by["a"]["attempt"] == 1


def test_the_template_env_follows_the_environment_and_never_holds_secrets(local_store, tmp_path, monkeypatch):
    """``env`` of a template context is decoded once and reused (every claim and condition
    built it), yet follows any change to the worker's environment; secrets never appear."""
    from dagcraft.orchestrator.view import LocalView

    rid = submit_spec(local_store, write_spec(tmp_path, "name: e\nsteps:\n  - {id: a, run: [\"true\"]}\n"))
    view = LocalView(local_store, rid)
    monkeypatch.setenv("DC_TEST_VAR", "one")
    monkeypatch.setenv("DAGCRAFT_PARAM_TOKEN", "s3cr3t")
    first = view.template_env()
    assert first["DC_TEST_VAR"] == "one" and "DAGCRAFT_PARAM_TOKEN" not in first
    first["DC_TEST_VAR"] = "changed by a caller"
    assert view.template_env()["DC_TEST_VAR"] == "one"  # each caller gets its own copy
    monkeypatch.setenv("DC_TEST_VAR", "two")
    monkeypatch.delenv("HOME", raising=False)
    again = view.template_env()
    assert again["DC_TEST_VAR"] == "two" and "HOME" not in again and "DAGCRAFT_PARAM_TOKEN" not in again
