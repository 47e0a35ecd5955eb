"""Approval gates (issue 10): a step waits for ``dagcraft approve|reject`` (or its timeout),
decided exactly once from any host; a run whose workers left while it waited continues
with ``resume``. Real processes for the CLI, races and pools; local store and moto server."""

from __future__ import annotations

import json

import pytest

from dagcraft.errors import Conflict, DagcraftError
from dagcraft.orchestrator import run_status
from dagcraft.orchestrator.approval import decide, waiting
from dagcraft.workflows import compile_file
from tests.conftest import server_store_url
from tests.orchestrator.helpers import (
    cli,
    drive_inline,
    read_trace_events,
    spawn_cli,
    steps,
    submit_spec,
    write_spec,
)

GATED = """
    name: gated
    steps:
      - id: build
        run: echo built
      - id: gate
        needs: [build]
        approval: {{prompt: "ship it?"{extra}}}
      - id: deploy
        needs: [gate]
        run: echo deployed > {marker}
"""


def _spec(tmp_path, extra: str = ""):
    marker = tmp_path / "deployed"
    return write_spec(tmp_path, GATED.format(extra=extra, marker=marker)), marker


@pytest.fixture(params=["local", "s3"])
def store_url(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return server_store_url(request.getfixturevalue("moto_server"))


def test_gate_fields_compile_and_bad_ones_are_named(tmp_path):
    spec, _ = _spec(tmp_path, ", timeout: 1h, on_timeout: approve")
    wf = compile_file(spec, {})
    gate = wf.steps["gate"]
    assert gate.run is None and gate.approval is not None
    assert gate.approval.timeout == 3600 and gate.approval.on_timeout == "approve"
    bad = write_spec(tmp_path, GATED.format(extra=", on_timeout: maybe", marker="x"), "bad.yaml")
    with pytest.raises(DagcraftError) as exc:
        compile_file(bad, {})
    assert "on_timeout" in str(exc.value) and exc.value.exit_code == 2
    neg = write_spec(tmp_path, GATED.format(extra=", timeout: -5", marker="x"), "neg.yaml")
    with pytest.raises(DagcraftError) as exc:
        compile_file(neg, {})
    assert "timeout" in str(exc.value)


def test_approve_then_resume_runs_downstream(tmp_path, store_url):
    spec, marker = _spec(tmp_path)
    first = cli("run", str(spec), "--store", store_url, "--workers", "1", "--no-report", timeout=120)
    # the pool exits while the gate waits: exit 0, the approve command printed, nothing deployed
    assert first.returncode == 0, first.stderr
    assert "waiting_approval" in first.stdout and "dagcraft approve" in first.stdout
    assert not marker.exists()
    listed = json.loads(cli("approvals", "--store", store_url, "--json", check=True).stdout)
    assert [(w["step"], w["prompt"]) for w in listed] == [("gate", "ship it?")]
    rid = listed[0]["run_id"]
    st = json.loads(cli("status", rid, "--store", store_url, "--json", check=True).stdout)
    assert steps(st)["gate"]["status"] == "waiting_approval" and st["status"] == "running"
    ok = cli("approve", f"{rid}/gate", "--comment", "lgtm", "--as", "alice", "--store", store_url, "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["decided_by"] == "alice"
    assert json.loads(cli("approvals", "--store", store_url, "--json", check=True).stdout) == []
    done = cli("resume", rid, "--store", store_url, "--workers", "1", "--no-report", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert marker.read_text().strip() == "deployed"
    st = json.loads(cli("status", rid, "--store", store_url, "--json", check=True).stdout)
    gate = steps(st)["gate"]
    assert st["status"] == "succeeded" and gate["status"] == "succeeded"
    assert gate["approval"]["decision"] == "approved" and gate["approval"]["comment"] == "lgtm"
    # who decided, when and why is in a trace the decision's CAS pinned; the run's seal covers it
    verified = cli("trace", "verify", rid, "--store", store_url, "--json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert any(t["path"].endswith("/gate/approval-1") for t in json.loads(verified.stdout)["traces"])


def test_two_deciders_race_exactly_one_wins(tmp_path, store_url):
    spec, _ = _spec(tmp_path)
    rid = cli("submit", str(spec), "--store", store_url, check=True).stdout.strip()
    # a worker told to exit when idle leaves a run that only a person can move on: exit 0
    w = cli("worker", "--run", rid, "--exit-when-idle", "--quiet", "--poll-max", "0.2", "--store", store_url,
            timeout=120)
    assert w.returncode == 0, w.stderr
    assert json.loads(cli("approvals", "--store", store_url, "--json", check=True).stdout)[0]["run_id"] == rid
    procs = [spawn_cli("approve", rid, "gate", "--as", "alice", "--store", store_url),
             spawn_cli("reject", rid, "gate", "--as", "bob", "--store", store_url)]
    outs = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    codes = sorted(o[0] for o in outs)
    assert codes == [0, 3], outs
    winner = "alice" if outs[0][0] == 0 else "bob"
    loser_err = outs[1][2] if outs[0][0] == 0 else outs[0][2]
    assert f"by {winner} at " in loser_err and "Traceback" not in loser_err
    assert len(loser_err.strip().splitlines()) == 1


def test_reject_fails_step_and_skips_downstream(tmp_path, store):
    spec, marker = _spec(tmp_path)
    rid = submit_spec(store, spec)
    st = drive_inline(store, rid, tmp_path)  # exits: only a person can move the run on
    assert steps(st)["gate"]["status"] == "waiting_approval"
    got = decide(store, rid, "gate", False, by="carol", comment="not today")
    assert got["status"] == "failed"
    with pytest.raises(Conflict, match="already rejected by carol"):
        decide(store, rid, "gate", True)
    st = drive_inline(store, rid, tmp_path)
    s = steps(st)
    assert st["status"] == "failed"
    assert s["gate"]["reason_kind"] == "rejected" and "not today" in s["gate"]["reason"]
    assert s["deploy"]["status"] == "skipped" and not marker.exists()
    events = read_trace_events(store, rid, "gate", "approval-1")
    decision = [e for e in events if e["kind"] == "x.dagcraft.approval"]
    assert len(decision) == 1 and decision[0]["payload"]["by"] == "carol"
    assert decision[0]["payload"]["decision"] == "rejected" and decision[0]["payload"]["comment"] == "not today"


@pytest.mark.parametrize("default,final", [("approve", "succeeded"), ("reject", "failed")])
def test_timeout_decides_with_declared_default(tmp_path, local_store, default, final):
    spec, marker = _spec(tmp_path, f", timeout: 1s, on_timeout: {default}")
    rid = submit_spec(local_store, spec)
    # a gate with a timeout keeps the worker: the timeout will decide it
    st = drive_inline(local_store, rid, tmp_path)
    gate = steps(st)["gate"]
    assert st["status"] == final
    assert gate["approval"]["decided_by"] == "timeout"
    assert gate["approval"]["decision"] == {"approve": "approved", "reject": "rejected"}[default]
    assert marker.exists() == (default == "approve")
    assert waiting(local_store) == []


def test_gate_on_a_command_step_runs_it_after_approval(tmp_path, local_store):
    marker = tmp_path / "ran"
    spec = write_spec(tmp_path, f"""
        name: gatedcmd
        steps:
          - id: release
            run: echo released > {marker}
            approval: {{prompt: "release?"}}
    """)
    rid = submit_spec(local_store, spec)
    st = drive_inline(local_store, rid, tmp_path)
    assert steps(st)["release"]["status"] == "waiting_approval" and not marker.exists()
    assert decide(local_store, rid, "release", True)["status"] == "pending"
    st = drive_inline(local_store, rid, tmp_path)
    assert st["status"] == "succeeded" and marker.read_text().strip() == "released"
    assert run_status(local_store, rid)["steps"][0]["attempt"] == 1


def test_decide_unknown_step_or_not_a_gate(tmp_path, local_store):
    spec, _ = _spec(tmp_path)
    rid = submit_spec(local_store, spec)
    drive_inline(local_store, rid, tmp_path)
    nf = cli("approve", rid, "nope", "--store", local_store.url)
    assert nf.returncode == 4 and "no step 'nope'" in nf.stderr and "Traceback" not in nf.stderr
    with pytest.raises(DagcraftError) as exc:
        decide(local_store, rid, "build", True)
    assert exc.value.exit_code == 2 and "no approval gate" in str(exc.value)


def test_ui_offers_and_decides_a_waiting_gate(tmp_path, local_store):
    from tests.ui.test_server import client_for, post

    spec, marker = _spec(tmp_path)
    rid = submit_spec(local_store, spec)
    drive_inline(local_store, rid, tmp_path)
    with client_for(local_store) as c:
        gate = next(s for s in c.get(f"/api/runs/{rid}").json()["steps"] if s["step"] == "gate")
        assert gate["actions"] == ["approve", "reject"]
        ok = post(c, rid, "approve", {"step": "gate", "comment": "from the ui"})
        assert ok.status_code == 200, ok.text
        again = post(c, rid, "reject", {"step": "gate"})
        assert again.status_code == 409 and "already approved" in again.json()["error"]
        c.app.state.ui.drivers[rid].join(120)  # the workers it started finish the run
    st = run_status(local_store, rid)
    assert st["status"] == "succeeded" and marker.exists()
    assert steps(st)["gate"]["approval"]["comment"] == "from the ui"


def test_foreach_gate_is_decided_once_for_all_children(tmp_path, local_store):
    out = tmp_path / "out"
    spec = write_spec(tmp_path, f"""
        name: fangate
        steps:
          - id: each
            foreach: '${{{{ ["a", "b"] }}}}'
            run: echo ${{{{ item }}}} >> {out}
            approval: {{prompt: "run both?"}}
    """)
    rid = submit_spec(local_store, spec)
    drive_inline(local_store, rid, tmp_path)
    assert [w["step"] for w in waiting(local_store)] == ["each"]
    decide(local_store, rid, "each", True)
    st = drive_inline(local_store, rid, tmp_path)
    assert st["status"] == "succeeded", st
    assert sorted(out.read_text().split()) == ["a", "b"]
