"""Corruption is contained: one unreadable record affects only its own run, is reported once
with its key, shows as ``corrupt`` in ``runs``, and every command on that run exits 1 with a
one-line message naming the key — never a traceback. Real processes on a real local store."""

from __future__ import annotations

import json
import os
import signal

import pytest

from dagcraft.errors import CorruptRecord
from dagcraft.orchestrator import layout, list_runs, run_status
from dagcraft.orchestrator.ops import prepare_resume
from dagcraft.primitives import open_store
from tests.orchestrator.helpers import cli, drive_inline, killpg, spawn_cli, submit_spec, wait_for, write_spec

SPEC = """
    name: two
    steps:
      - id: a
        run: "echo a"
      - id: b
        needs: [a]
        run: "echo b"
"""


def _one_line_error(proc, key: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and key in lines[0] and lines[0].startswith("dagcraft: corrupt record"), proc.stderr


def test_generic_worker_keeps_serving_other_runs_when_one_state_is_corrupt(tmp_path):
    store_url = str(tmp_path / "store")
    store = open_store(store_url)
    spec = write_spec(tmp_path, SPEC)
    submit_spec(store, spec, run_id="bad-1")
    submit_spec(store, spec, run_id="good-1")
    bad_key = layout.step_state("bad-1", "a")
    store.put(bad_key, b"not json")
    w = spawn_cli("worker", "--store", store_url, "--poll-max", "0.1")
    try:
        wait_for(lambda: run_status(store, "good-1")["status"] == "succeeded", timeout=90,
                 what="the healthy run to finish")
        wait_for(lambda: store.get(layout.corrupt_note("bad-1")) is not None, what="the corrupt mark")
        assert w.poll() is None  # the worker lives on
        os.kill(w.pid, signal.SIGTERM)
        w.wait(timeout=60)
    finally:
        killpg(w)
    err = w.stderr.read()
    assert w.returncode == 0, err
    assert "Traceback" not in err
    assert err.count(bad_key) == 1, err  # reported once, with its key
    runs = {r["run_id"]: r for r in list_runs(store)}
    assert runs["bad-1"]["status"] == "corrupt" and runs["bad-1"]["corrupt"] == bad_key
    assert runs["good-1"]["status"] == "succeeded" and runs["good-1"]["corrupt"] is None

    # a restarted worker does not crash either (the bug: it crashed on every restart)
    again = cli("worker", "--store", store_url, "--run", "bad-1", "--exit-when-idle", "--quiet")
    _one_line_error_or_exit_1(again, bad_key)

    listing = cli("runs", "--store", store_url)
    assert listing.returncode == 0, listing.stderr
    assert any(ln.startswith("bad-1") and " corrupt " in ln for ln in listing.stdout.splitlines())
    for args in (("status", "bad-1"), ("logs", "bad-1", "a"), ("resume", "bad-1", "--no-report"),
                 ("retry", "bad-1", "--from", "a", "--no-report"), ("trace", "summary", "bad-1")):
        _one_line_error(cli(*args, "--store", store_url), bad_key)


def _one_line_error_or_exit_1(proc, key: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count(key) == 1, proc.stderr


def test_corrupt_control_lists_the_run_as_corrupt_and_others_normally(tmp_path):
    store_url = str(tmp_path / "store")
    store = open_store(store_url)
    spec = write_spec(tmp_path, SPEC)
    submit_spec(store, spec, run_id="ok-1")
    submit_spec(store, spec, run_id="broken-1")
    key = layout.control("broken-1")
    store.put(key, b"bad")
    res = cli("runs", "--store", store_url, "--json")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    runs = {r["run_id"]: r for r in json.loads(res.stdout)}
    assert runs["broken-1"]["status"] == "corrupt" and runs["broken-1"]["corrupt"] == key
    assert runs["ok-1"]["status"] == "running"
    only = cli("runs", "--store", store_url, "--status", "corrupt", "--json")
    assert [r["run_id"] for r in json.loads(only.stdout)] == ["broken-1"]
    for args in (("status", "broken-1"), ("cancel", "broken-1"), ("resume", "broken-1", "--no-report")):
        _one_line_error(cli(*args, "--store", store_url), key)


@pytest.mark.parametrize("record", ["run.json", "control.json", "state"])
def test_corrupt_records_raise_corrupt_record_naming_the_key(local_store, tmp_path, record):
    spec = write_spec(tmp_path, SPEC)
    submit_spec(local_store, spec, run_id="r")
    key = {"run.json": layout.run_record("r"), "control.json": layout.control("r"),
           "state": layout.step_state("r", "a")}[record]
    local_store.put(key, b'{"status": 42}')
    with pytest.raises(CorruptRecord) as exc:
        run_status(local_store, "r")
    assert exc.value.key == key and key in str(exc.value) and "\n" not in str(exc.value)


def test_resume_clears_the_mark_once_the_record_is_repaired(local_store, tmp_path):
    spec = write_spec(tmp_path, SPEC)
    submit_spec(local_store, spec, run_id="r")
    key = layout.step_state("r", "a")
    local_store.put(key, b"not json")
    st = drive_inline(local_store, "r", tmp_path, status=False)
    assert st == {}
    assert local_store.get(layout.corrupt_note("r")) is not None
    with pytest.raises(CorruptRecord):
        prepare_resume(local_store, "r")
    local_store.delete(key)  # the operator repairs it: a missing state reads as pending
    prepare_resume(local_store, "r")
    assert local_store.get(layout.corrupt_note("r")) is None
    assert drive_inline(local_store, "r", tmp_path)["status"] == "succeeded"


def test_run_whose_record_turns_corrupt_mid_run_stops_with_one_error(tmp_path):
    store_url = str(tmp_path / "store")
    spec = write_spec(tmp_path, """
        name: mid
        steps:
          - id: a
            run: "mkdir -p $DAGCRAFT_STORE/objects/runs/$DAGCRAFT_RUN_ID/steps/b && echo 'not json' > $DAGCRAFT_STORE/objects/runs/$DAGCRAFT_RUN_ID/steps/b/state.json%"
          - id: b
            needs: [a]
            run: "true"
    """)
    proc = cli("run", str(spec), "--store", store_url, "--workers", "2", "--run-id", "mid-1", "--no-report",
               timeout=120)
    key = layout.step_state("mid-1", "b")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(f"dagcraft: corrupt record {key}")
    assert proc.stderr.count(key) <= 3  # once per worker (2) and the final line: no restart loop


def test_resume_of_an_unmarked_corrupt_run_fails_before_any_worker_starts(tmp_path):
    store_url = str(tmp_path / "store")
    store = open_store(store_url)
    submit_spec(store, write_spec(tmp_path, SPEC), run_id="y1")
    key = layout.step_state("y1", "b")
    store.put(key, b"[1, 2]")
    proc = cli("resume", "y1", "--store", store_url, "--no-report")
    _one_line_error(proc, key)
    assert "resuming" not in proc.stdout
