"""``status`` of a sealed run reads the summary the sealing transition wrote from the records
it sealed (``orchestrator.statusrows``): two GETs instead of one per step, and the very
status the records give (issue 12: a 10,000-step run's status in under a second). Counts and
equalities, never timings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dagcraft.errors import StoreUnavailable
from dagcraft.orchestrator import layout, prepare_resume, run_status
from dagcraft.orchestrator.model import load_control
from dagcraft.orchestrator.ops import _run_status, dumps_status, status_result
from tests.orchestrator.helpers import cli, count_gets, drive_inline, submit_spec, write_spec

#: a foreach parent and its children, a loop and its body steps, a matrix, a skipped step, a
#: failed step with a retry (its log command and stderr tail), and steps it never let run
SPEC = """
name: mixed
steps:
  - id: plan
    run: "echo 'items=[\\"a\\", \\"b\\", \\"c\\"]' >> $DAGCRAFT_OUTPUT"
    outputs: {values: [items]}
  - id: each
    needs: plan
    foreach: "${{ steps.plan.outputs.items }}"
    run: "echo v=${{ item }} >> $DAGCRAFT_OUTPUT"
    outputs: {values: [v]}
  - id: grid
    matrix: {n: [1, 2]}
    run: ["true"]
  - id: polish
    needs: [plan]
    loop:
      max_iterations: 3
      until: "${{ steps.review.outputs.verdict == 'ok' }}"
      steps:
        - id: review
          run: "if [ ${{ loop.iteration }} -ge 2 ]; then v=ok; else v=again; fi; echo verdict=$v >> $DAGCRAFT_OUTPUT"
          outputs: {values: [verdict]}
  - id: never
    needs: [plan]
    when: "${{ false }}"
    run: ["true"]
  - id: boom
    needs: [each, grid, polish]
    retries: {limit: 1, backoff: 0.01s}
    run: "echo it broke >&2; exit 3"
  - id: after
    needs: [boom]
    run: ["true"]
"""


def _finished(store: Any, tmp_path: Path, text: str = SPEC) -> str:
    rid = submit_spec(store, write_spec(tmp_path, text), run_id="r")
    drive_inline(store, rid, tmp_path, status=False)
    return rid


def _frozen_clock(store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    now = store.now()
    monkeypatch.setattr(store, "now", lambda: now)


def test_sealed_run_status_is_read_from_its_summary_and_equals_the_records(local_store, tmp_path, monkeypatch):
    rid = _finished(local_store, tmp_path)
    ctl = load_control(local_store.get(layout.control(rid))[0])
    assert ctl.status == "failed" and ctl.seal is not None and ctl.seal.summary is not None
    _frozen_clock(local_store, monkeypatch)
    from_records = _run_status(local_store, rid, summary=False).as_dict()
    reads = count_gets(local_store, monkeypatch)
    st = run_status(local_store, rid)
    assert reads == {layout.control(rid): 1, layout.status_summary(rid): 1}  # no run.json, no step record
    assert st == from_records and dumps_status(st) == dumps_status(from_records)
    # `status --json` prints the summary's rows as they are: the very text of the records' status
    res = status_result(local_store, rid)
    assert res.lines is not None and res.to_json() == dumps_status(from_records)
    by = {s["step"]: s for s in st["steps"]}
    # what the rows are made of is there: children under their parent, a loop's progress, a
    # failed attempt's log command (with this reader's store URL)
    assert [s["step"] for s in st["steps"] if s["parent"] == "each"] == ["each[0]", "each[1]", "each[2]"]
    assert by["each"]["children_counts"] == {"succeeded": 3}
    assert by["polish"]["loop"]["iterations"] == 2
    assert by["boom"]["status"] == "failed" and "it broke" in by["boom"]["stderr_tail"]
    assert by["boom"]["more"].endswith(f"--store {local_store.url}") and by["never"]["status"] == "skipped"
    assert st["counts"] == from_records["counts"] and sum(st["counts"].values()) == 8


def test_a_summary_its_seal_does_not_name_is_not_used(local_store, tmp_path, monkeypatch):
    rid = _finished(local_store, tmp_path)
    _frozen_clock(local_store, monkeypatch)
    from_records = _run_status(local_store, rid, summary=False).as_dict()
    key = layout.status_summary(rid)
    head, first, *rest = local_store.get(key)[0].decode().split("\n")
    row = json.loads(first)
    row["status"] = "succeeded-ish"
    forged = "\n".join([head, json.dumps(row), *rest])
    local_store.put(key, forged.encode())  # e.g. a racing finisher's, or an edit
    reads = count_gets(local_store, monkeypatch)
    assert run_status(local_store, rid) == from_records
    assert reads.get(layout.step_state(rid, "boom")) == 1  # read from the records
    local_store.delete(key)
    assert run_status(local_store, rid) == from_records


def test_a_reopened_run_is_read_from_its_records(local_store, tmp_path, monkeypatch):
    rid = _finished(local_store, tmp_path)
    prepare_resume(local_store, rid, retry_failed=True)
    ctl = load_control(local_store.get(layout.control(rid))[0])
    assert ctl.status == "running" and ctl.seal is None
    reads = count_gets(local_store, monkeypatch)
    st = run_status(local_store, rid)
    assert reads.get(layout.status_summary(rid)) is None and reads.get(layout.step_state(rid, "boom")) == 1
    assert {s["step"]: s["status"] for s in st["steps"]}["boom"] in ("pending", "retrying")


def test_a_summary_that_cannot_be_written_leaves_the_run_finished_and_read_from_records(local_store, tmp_path,
                                                                                      monkeypatch):
    put_file = local_store.put_file

    def failing_put_file(key: str, *args: Any, **kwargs: Any) -> Any:
        if key.endswith("/status.json"):
            raise StoreUnavailable("the store is away")
        return put_file(key, *args, **kwargs)

    monkeypatch.setattr(local_store, "put_file", failing_put_file)
    rid = _finished(local_store, tmp_path, "name: small\nsteps:\n  - id: a\n    run: ['true']\n")
    ctl = load_control(local_store.get(layout.control(rid))[0])
    assert ctl.status == "succeeded" and ctl.seal is not None and ctl.seal.summary is None
    assert local_store.get(layout.status_summary(rid)) is None
    assert run_status(local_store, rid)["counts"] == {"succeeded": 1}


def test_a_run_with_agents_has_no_summary(local_store, tmp_path):
    # its spend is read from the ledger each time: the records are read too
    text = """
name: agents
agents:
  echo: {command: ["cat"]}
steps:
  - id: ask
    agent: echo
    prompt: hello
"""
    rid = _finished(local_store, tmp_path, text)
    ctl = load_control(local_store.get(layout.control(rid))[0])
    assert ctl.seal is not None and ctl.seal.summary is None


def test_cli_status_json_of_a_sealed_run_is_the_records_status(local_store, tmp_path, monkeypatch):
    rid = _finished(local_store, tmp_path)
    proc = cli("status", rid, "--store", str(local_store.root), "--json")
    assert proc.returncode == 1, proc.stderr  # the run failed
    shown = json.loads(proc.stdout)
    from_records = _run_status(local_store, rid, summary=False).as_dict()
    for d in (shown, from_records):  # the clock moved between the two reads
        d.pop("timing")
        d.pop("duration_s")
    assert shown == json.loads(json.dumps(from_records))


def test_a_resume_that_dies_before_reopening_leaves_status_reading_the_records(local_store, tmp_path, monkeypatch):
    from dagcraft.orchestrator import transitions

    rid = _finished(local_store, tmp_path)

    def dies(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("killed between the resets and the reopening CAS")

    monkeypatch.setattr(transitions, "reopen", dies)
    with pytest.raises(RuntimeError):
        prepare_resume(local_store, rid, retry_failed=True)
    ctl = load_control(local_store.get(layout.control(rid))[0])
    assert ctl.status == "failed" and ctl.seal is not None and ctl.seal.summary is not None  # still sealed
    _frozen_clock(local_store, monkeypatch)
    st = run_status(local_store, rid)
    assert {s["step"]: s["status"] for s in st["steps"]}["boom"] == "pending"  # what the records say now
    assert st == _run_status(local_store, rid, summary=False).as_dict()
