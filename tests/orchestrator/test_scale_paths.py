"""Costs that must not follow the DAG's size: submit writes a constant number of objects (a
step without a record is pending), and status reads each step by key, never listing the steps'
directories (which also hold every attempt's logs and traces). Counts, not timings."""

from __future__ import annotations

import pytest

from dagcraft.errors import NotFound
from dagcraft.orchestrator import run_status
from dagcraft.orchestrator.model import StepStatus
from dagcraft.orchestrator.ops import latest_attempt, read_step_state
from dagcraft.primitives.local import LocalStore
from tests.orchestrator.helpers import drive_inline, submit_spec, write_spec


def chain_spec(n: int) -> str:
    lines = ["name: scale", "steps:"]
    for i in range(n):
        lines.append(f"  - id: s{i}")
        if i >= 10:
            lines.append(f"    needs: [s{i - 10}]")
        lines.append('    run: ["true"]')
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("n", [10, 1000])
def test_submit_writes_five_objects_whatever_the_size(tmp_path, n):
    store = LocalStore(tmp_path / "store", fsync=False)
    rid = submit_spec(store, write_spec(tmp_path, chain_spec(n)))
    # run.json, control.json, a journal entry, the index entry, the idle workers' wake key
    assert store.stats["put"] == 5
    before = dict(store.stats)
    st = run_status(store, rid)
    assert st["counts"] == {"pending": n} and len(st["steps"]) == n
    assert store.stats["list"] - before.get("list", 0) <= 1  # the worker registry, not the steps
    assert store.stats["get"] - before.get("get", 0) <= n + 3
    assert read_step_state(store, rid, "s5").status == StepStatus.PENDING
    with pytest.raises(NotFound, match="has not started"):
        latest_attempt(store, rid, "s5")
    with pytest.raises(NotFound, match="step 'nope' not found"):
        read_step_state(store, rid, "nope")


def test_a_run_of_unwritten_steps_runs_to_the_end(tmp_path):
    store = LocalStore(tmp_path / "store", fsync=False)
    rid = submit_spec(store, write_spec(tmp_path, chain_spec(40)))
    st = drive_inline(store, rid, tmp_path)
    assert st["status"] == "succeeded" and st["counts"] == {"succeeded": 40}
    before = dict(store.stats)
    run_status(store, rid)
    assert store.stats["list"] == before.get("list", 0)  # finished: not even the registry
