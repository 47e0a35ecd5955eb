"""StepTable and read_run_record: a run's steps held compactly, read one step at a time."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from dagcraft.orchestrator.steptable import Dependents, StepTable, read_run_record
from dagcraft.workflows import ConcreteStep


def _step(sid: str, needs: list[str], **kw: Any) -> dict[str, Any]:
    return ConcreteStep(id=sid, template_id=kw.pop("template_id", sid), needs=needs, run=["true"],
                        **kw).model_dump(mode="json")


def _record(steps: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    return {"run_id": "r", "name": "n", "order": [s["id"] for s in steps], "params": {},
            "workflow": {"name": "n", "params": {"p": 1}, "steps": {s["id"]: s for s in steps}}, **kw}


def test_steps_read_back_equal_and_shapes_are_shared():
    steps = [_step(f"s{i}", [f"s{i - 1}"] if i else []) for i in range(50)]
    steps.append(_step("odd", ["s3", "s4"], env={"A": "b"}, template_id="tmpl"))
    fields, wf, table = read_run_record(json.dumps(_record(steps), sort_keys=True))
    assert fields["run_id"] == "r" and "workflow" not in fields and wf == {"name": "n", "params": {"p": 1}}
    assert len(table) == 51 and "s7" in table and "nope" not in table
    for data in steps:
        assert table[data["id"]].model_dump(mode="json") == data
    assert table._shapes.__len__() == 2  # 50 steps of one shape, one of another
    assert table.needs_of("odd") == ("s3", "s4") and table.template_id_of("odd") == "tmpl"
    assert table.attr("odd", "env") == {"A": "b"} and table.attr("s3", "is_finally") is False


def test_any_json_layout_reads_the_same():
    rec = _record([_step("a", []), _step("b", ["a"])])
    compact = read_run_record(json.dumps(rec, separators=(",", ":")))
    pretty = read_run_record(json.dumps(rec, indent=3))
    assert compact[0] == pretty[0] and compact[1] == pretty[1]
    assert [compact[2][s].model_dump() for s in compact[2]] == [pretty[2][s].model_dump() for s in pretty[2]]


@pytest.mark.parametrize("text", ['{"workflow": {"steps": {"a": [1]}}}', '{"a": 1', '{"a" 1}', '[]', '{"a": 1} x',
                                  '{"workflow": {"steps": {"a": {"id": "b", "template_id": "b", "needs": []}}}}'])
def test_malformed_records_raise_value_error(text: str):
    with pytest.raises(ValueError):
        read_run_record(text)


def test_an_invalid_step_is_refused_when_added():
    table = StepTable()
    bad = _step("a", [])
    bad["retries"] = "often"
    with pytest.raises(ValidationError):
        table.add_data(bad)
    with pytest.raises(ValidationError):
        table.add_data({**_step("b", []), "needs": "a"})
    assert len(table) == 0


def test_models_held_are_bounded_and_a_replaced_step_is_rebuilt():
    table = StepTable(cache_size=8)
    for i in range(100):
        table.add_data(_step(f"s{i}", []))
    built = [table[f"s{i}"] for i in range(100)]
    assert len(table._cache) == 8 and built[42].id == "s42"
    assert table["s99"] is built[99]  # still cached
    table.add_data(_step("s99", ["s1"], env={"X": "1"}))
    assert table["s99"].env == {"X": "1"} and table.needs_of("s99") == ("s1",)


def test_reorder_puts_steps_in_order_and_needs_share_the_id_strings():
    # JSON keys sort s10 before s9: a need parsed before its step is a copy until reordered
    steps = [_step(f"s{i}", [f"s{i + 1}"] if i < 11 else []) for i in range(12)]
    _, _, table = read_run_record(json.dumps(_record(steps), sort_keys=True))
    order = [f"s{i}" for i in range(12)]
    table.reorder(order)
    assert list(table) == order and table.needs_of("s9") == ("s10",)
    held = {id(s) for s in table}
    assert all(id(n) in held for sid in table for n in table.needs_of(sid))
    assert table["s9"].needs == ["s10"]


def test_view_states_keep_finished_records_packed_and_read_back_equal():
    from dagcraft.orchestrator.model import StepState, StepStatus
    from dagcraft.orchestrator.view import StepStates

    states = StepStates()
    done = [StepState(step_id=f"s{i}", status=StepStatus.SUCCEEDED, rev=3, parent="p", outputs={"n": i})
            for i in range(200)]
    for rec in done:
        states[rec.step_id] = (rec, f"etag{rec.step_id}")
    running = StepState(step_id="r", status=StepStatus.RUNNING, rev=1)
    states["r"] = (running, "e")
    states.set_brief("b", StepStatus.FAILED, 2)
    assert len(states) == 202 and set(states) == {*(s.step_id for s in done), "r", "b"}
    assert not states._full.keys() - {"r"} and len(states._packed) == 200  # finished: packed
    # ... and their bytes are on disk, not in memory: each held as a small int handle
    assert all(isinstance(p[0], int) for p in states._packed.values())
    assert states["r"][0] is running
    for rec in done:
        assert states[rec.step_id] == (rec, f"etag{rec.step_id}")
    assert len(states._unpacked) <= StepStates.UNPACKED
    assert (states.status("s7"), states.rev("s7"), states.parent("s7"), states.etag("s7")) == (
        StepStatus.SUCCEEDED, 3, "p", "etags7")
    assert states["b"] == (StepState(step_id="b", status=StepStatus.FAILED, rev=2), None)
    assert states.has_record("s7") and not states.has_record("b") and states.etag("b") is None


def _naive_dependents(needs: dict[str, list[str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for sid, nd in needs.items():
        for n in nd:
            out.setdefault(n, []).append(sid)
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=40).flatmap(lambda n: st.tuples(
    st.just(n),
    st.lists(st.lists(st.integers(min_value=0, max_value=n + 4), max_size=4), min_size=n, max_size=n),
    st.lists(st.lists(st.integers(min_value=0, max_value=n + 4), max_size=3), max_size=5))))
def test_dependents_match_the_reverse_of_needs(case: tuple[int, list[list[int]], list[list[int]]]):
    """The compact reverse index names exactly the steps a dict of lists would, for steps
    in the table when it is built (needs naming steps that exist, that come later, or none)
    and for steps added after (children), in table order."""
    n, base_needs, later = case
    table = StepTable()
    needs: dict[str, list[str]] = {}
    for i, nd in enumerate(base_needs):
        needs[f"s{i}"] = [f"s{j}" for j in nd if j != i]
        table.add_data(_step(f"s{i}", needs[f"s{i}"]))
    deps = Dependents(table)
    for k, nd in enumerate(later):
        cid = f"c{k}"
        needs[cid] = [f"s{j}" if j % 2 else f"c{j}" for j in nd]
        table.add_data(_step(cid, needs[cid]))
        deps.add(cid, table.needs_of(cid))
    want = _naive_dependents(needs)
    for name in [*needs, *(f"s{j}" for j in range(n + 5)), *(f"c{j}" for j in range(n + 5))]:
        assert deps.of(name) == want.get(name, []), name
