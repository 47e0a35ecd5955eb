"""Counts that agree, one run duration everywhere, and finally steps after the rollback
(issue 11, "Counts disagree")."""

from __future__ import annotations

import json
import re

from dagcraft.orchestrator import layout, run_status
from dagcraft.orchestrator.model import load_state
from tests.orchestrator.helpers import FANOUT, cli, run_spec, steps, write_spec


def test_summary_counts_what_was_submitted_and_one_duration(local_store, tmp_path):
    spec = write_spec(tmp_path, FANOUT)
    store_dir = str(local_store.root)
    r = cli("run", str(spec), "--store", store_dir, "--workers", "2", "--no-report")
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"submitted \((\d+) steps\)", r.stdout)
    assert m and m.group(1) == "3"
    # the three submitted steps, not 3 + 3 foreach children
    m2 = re.search(r": succeeded in ([\d.]+)s \((\d+) succeeded\)", r.stdout)
    assert m2 and m2.group(2) == "3", r.stdout
    assert re.search(r"each: 3 of 3 succeeded in [\d.]+s", r.stdout), r.stdout
    rid = r.stdout.split()[1]
    st = json.loads(cli("status", rid, "--store", store_dir, "--json").stdout)
    assert st["counts"] == {"succeeded": 3}
    each = steps(st)["each"]
    assert each["children_counts"] == {"succeeded": 3} and each["duration_s"] is not None
    # one definition: first claim → finish, the same figure in `run`, `status` and --json
    timing = st["timing"]
    assert timing["duration_s"] == st["duration_s"] or abs(timing["duration_s"] - st["duration_s"]) < 1e-3
    assert abs(timing["finished_at"] - timing["first_claim_at"] - st["duration_s"]) < 1e-3
    assert timing["queued_s"] >= 0 and timing["first_claim_at"] >= timing["submitted_at"]
    assert f"{st['duration_s']:.1f}" == m2.group(1)
    text = cli("status", rid, "--store", store_dir).stdout
    assert text.splitlines()[0].endswith(f"succeeded in {st['duration_s']:.1f}s")


def test_resumed_run_duration_covers_every_session(local_store, tmp_path):
    flag = tmp_path / "fixed"
    spec = write_spec(tmp_path, f"""
        name: resumed
        steps:
          - id: slow
            run: "sleep 1"
          - id: flaky
            needs: [slow]
            run: "test -f {flag}"
    """)
    store_dir = str(local_store.root)
    first = cli("run", str(spec), "--store", store_dir, "--workers", "1", "--no-report")
    assert first.returncode == 1
    rid = first.stdout.split()[1]
    flag.write_text("ok")
    again = cli("resume", rid, "--retry-failed", "--store", store_dir, "--workers", "1", "--no-report")
    assert again.returncode == 0, again.stdout + again.stderr
    st = run_status(local_store, rid)
    assert st["duration_s"] >= 1.0  # includes the first session's `slow`
    m = re.search(r": succeeded in ([\d.]+)s \(2 succeeded; this session ([\d.]+)s\)", again.stdout)
    assert m, again.stdout
    assert m.group(1) == f"{st['duration_s']:.1f}"


def test_finally_steps_run_after_the_rollback(local_store, tmp_path):
    rid, st = run_spec(local_store, tmp_path, """
        name: rb-finally
        on_failure: rollback
        steps:
          - id: provision
            run: "echo up"
            rollback: "echo down"
          - id: deploy
            needs: [provision]
            run: "exit 3"
        finally:
          - id: notify
            run: 'echo "seen=${{ steps.provision.status }}" >> $DAGCRAFT_OUTPUT'
            outputs: {values: [seen]}
    """)
    assert st["status"] == "rolled_back", st
    by = steps(st)
    assert by["provision"]["status"] == "rolled_back"
    assert by["notify"]["status"] == "succeeded"
    assert by["notify"]["outputs"]["seen"] == "rolled_back"
    prov = load_state(local_store.get(layout.step_state(rid, "provision"))[0])
    comp = [h for h in prov.history if h.kind == "rollback"][-1]
    assert comp.finished_at is not None and by["notify"]["started_at"] >= comp.finished_at
