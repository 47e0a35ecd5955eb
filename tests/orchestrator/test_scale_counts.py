"""``status`` and a worker's view of a large run: counts, never timings (issue 12: a
10,000-step run's status in under a second; worker memory flat in run size)."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import pytest

from dagcraft.errors import CorruptRecord
from dagcraft.orchestrator import layout, run_status
from dagcraft.orchestrator.view import LocalView
from dagcraft.workflows import CompiledWorkflow
from tests.orchestrator.helpers import count_gets, submit_spec, write_spec

N = 300


def _spec(tmp_path: Path) -> Path:
    lines = ["name: big", "steps:"]
    for i in range(N):
        lines += [f"  - id: s{i}", '    run: ["true"]'] + ([f"    needs: [s{i - 30}]"] if i >= 30 else [])
    return write_spec(tmp_path, "\n".join(lines) + "\n")


def test_status_reads_each_step_once_and_validates_no_workflow(local_store: Any, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch):
    rid = submit_spec(local_store, _spec(tmp_path))
    validated = [0]
    original = CompiledWorkflow.model_validate

    def counting(*args: Any, **kwargs: Any) -> Any:
        validated[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(CompiledWorkflow, "model_validate", counting)
    reads = count_gets(local_store, monkeypatch)
    collections: list[int] = []

    def note(phase: str, info: dict[str, Any]) -> None:
        if phase == "start" and not gc.isenabled():
            collections.append(info["generation"])  # an explicit collect(): none is made

    gc.callbacks.append(note)
    try:
        st = run_status(local_store, rid)
    finally:
        gc.callbacks.remove(note)
    assert st["counts"] == {"pending": N}
    # a workflow without agents spends nothing: its 10,000 steps are not validated for that
    assert validated[0] == 0
    state_keys = {layout.step_state(rid, f"s{i}") for i in range(N)}
    state_reads = {k: n for k, n in reads.items() if k in state_keys}
    assert len(state_reads) == N and set(state_reads.values()) == {1}
    assert reads[layout.run_record(rid)] == 1
    assert collections == [] and gc.isenabled()


def test_worker_view_keeps_no_plain_copy_of_the_workflow(local_store: Any, tmp_path: Path):
    rid = submit_spec(local_store, _spec(tmp_path))
    view = LocalView(local_store, rid)
    # the workflow is held once, as models: the record's plain-data copy is not kept
    assert view.record.workflow == {}
    assert list(view.wf.steps) == view.record.order and len(view.wf.steps) == N
    assert view.record.name == "big" and view.record.run_id == rid
    stored = json.loads(local_store.get(layout.run_record(rid))[0])
    # the steps, built on demand, are the stored ones
    assert {sid: view.wf.steps[sid].model_dump(mode="json") for sid in view.wf.steps} == stored["workflow"]["steps"]
    assert view.steps is view.wf.steps


def test_worker_view_names_a_corrupt_workflow(local_store: Any, tmp_path: Path):
    rid = submit_spec(local_store, _spec(tmp_path))
    key = layout.run_record(rid)
    data = json.loads(local_store.get(key)[0])
    data["workflow"]["steps"]["s3"]["retries"] = "often"
    local_store.put(key, json.dumps(data).encode())
    with pytest.raises(CorruptRecord) as err:
        LocalView(local_store, rid)
    assert "workflow is not valid" in str(err.value) and "run.json" in str(err.value)


def test_run_record_is_the_generic_dump(local_store: Any, tmp_path: Path):
    # submit serialises the workflow once, in Rust (dump_run_record): the same data as dump()
    from dagcraft.orchestrator.model import RunRecord, dump

    rid = submit_spec(local_store, _spec(tmp_path))
    body = local_store.get(layout.run_record(rid))[0]
    assert json.loads(dump(RunRecord.model_validate_json(body))) == json.loads(body)


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``code``."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_importing_a_name_of_the_orchestrator_loads_only_its_module():
    loaded = _modules_after("import json\nfrom dagcraft.orchestrator import submit, run_status")
    assert {"dagcraft.orchestrator.submission", "dagcraft.orchestrator.ops"} <= loaded
    # not the worker, the pool or the attempt (and what they import) for a submit or a status
    assert not loaded & {"dagcraft.orchestrator.worker", "dagcraft.orchestrator.pool",
                         "dagcraft.orchestrator.attempt", "networkx"}
    import dagcraft.orchestrator as orch

    assert set(orch.__all__) == set(orch._HOME) and set(orch.__all__) <= set(dir(orch))
    assert all(getattr(orch, name) is not None for name in orch.__all__)
    with pytest.raises(AttributeError):
        orch.no_such_name  # noqa: B018


def _cli_modules(*args: str) -> set[str]:
    """The modules loaded by one ``dagcraft`` command run in a fresh interpreter."""
    return _modules_after(f"import json\nfrom dagcraft.cli.main import cli\ncli({list(args)!r}, standalone_mode=False)")


def test_submit_and_status_import_only_what_they_use(tmp_path: Path):
    store = str(tmp_path / "store")
    spec = str(_spec(tmp_path))
    submitted = _cli_modules("submit", spec, "--store", store, "--run-id", "r1")
    assert "dagcraft.orchestrator.submission" in submitted
    assert not submitted & {"networkx", "rich", "dagcraft.orchestrator.view", "dagcraft.orchestrator.worker",
                            "dagcraft.orchestrator.attempt", "dagcraft.orchestrator.pool"}
    shown = _cli_modules("status", "r1", "--store", store, "--json")
    assert "dagcraft.orchestrator.ops" in shown
    assert not shown & {"networkx", "rich", "dagcraft.cli.watch", "dagcraft.orchestrator.worker",
                        "dagcraft.orchestrator.pool"}
    # a reader of a run without agents needs no workflow model (its records, not its spec), nor
    # the YAML loader, the compiler or jinja2
    assert not shown & {"yaml", "jinja2", "dagcraft.workflows.spec", "dagcraft.workflows.loader",
                        "dagcraft.workflows.compile"}
    # nor what changes a run (the worker's view, transitions, tracing, signing)
    assert not shown & {"dagcraft.orchestrator.view", "dagcraft.orchestrator.transitions", "dagcraft.tracing",
                        "cryptography"}


def test_a_worker_loads_neither_cryptography_nor_jinja2_unless_it_needs_them(tmp_path: Path):
    """A worker's start-up imports what it runs steps with; signing (cryptography) is loaded
    only where a key is given or a signature checked, Jinja2 only where a template is rendered."""
    store = str(tmp_path / "store")
    spec = str(_spec(tmp_path))
    _cli_modules("submit", spec, "--store", store, "--run-id", "r1")
    args = ["worker", "--store", store, "--run", "r1", "--exit-when-idle", "--quiet"]
    # the worker command exits (SystemExit): the modules are listed after it, whatever it raised
    worked = _modules_after(f"import json\nfrom dagcraft.cli.main import cli\ntry:\n"
                            f"    cli({args!r}, standalone_mode=False)\nexcept SystemExit:\n    pass")
    assert {"dagcraft.orchestrator.worker", "dagcraft.orchestrator.attempt", "dagcraft.tracing.seal"} <= worked
    assert not worked & {"cryptography", "jinja2"}


def test_the_cli_exit_collection_walks_almost_nothing(tmp_path: Path):
    import subprocess
    import sys

    # the interpreter's exit runs a full collection; the CLI leaves it (almost) nothing to walk
    code = ("import gc, sys\n"
            "gc.callbacks.append(lambda phase, info: phase == 'start' and sys.is_finalizing()"
            " and sys.stderr.write(f'walked at exit {len(gc.get_objects())}\\n'))\n"
            "from dagcraft.cli.main import main\n"
            f"sys.argv = ['dagcraft', 'submit', {str(_spec(tmp_path))!r}, '--store', {str(tmp_path / 's')!r}]\n"
            "main()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    walked = [int(line.split()[-1]) for line in out.stderr.splitlines() if line.startswith("walked at exit")]
    assert out.stdout.startswith("big-") and walked and max(walked) < 5_000, walked


def _big_spec(tmp_path: Path, n: int, name: str) -> Path:
    lines = [f"name: {name}", "steps:"]
    for i in range(n):
        lines += [f"  - id: s{i}", '    run: ["true"]'] + ([f"    needs: [s{i - 50}]"] if i >= 50 else [])
    return write_spec(tmp_path, "\n".join(lines) + "\n", name=f"{name}.yaml")


def _live(cls: type) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is cls)


def test_worker_view_holds_a_bounded_number_of_models_whatever_the_run_size(local_store: Any, tmp_path: Path):
    # issue 12 (worker memory flat in run size): a model per step (10,000 ConcreteSteps, and
    # a StepState for each untouched pending step) was ~7 KB a step
    from dagcraft.orchestrator.model import StepState
    from dagcraft.orchestrator.scheduler import Scheduler
    from dagcraft.workflows import ConcreteStep

    n = 1500
    rid = submit_spec(local_store, _big_spec(tmp_path, n, "wide"))
    steps0, states0 = _live(ConcreteStep), _live(StepState)
    view = LocalView(local_store, rid)
    sched = Scheduler(view, "w", 30.0)
    ready = sched.ready()
    assert sorted(ready, key=lambda s: int(s[1:])) == [f"s{i}" for i in range(50)]
    assert view.needs("s70") == ["s20"] and view.status("s70") == "pending" and len(view.open_ids) == n
    assert view.steps["s70"].needs == ["s20"] and view.steps["s70"].run == ["true"]
    held_steps, held_states = _live(ConcreteStep) - steps0, _live(StepState) - states0
    bound = 2 * getattr(view.steps, "cache_size", 256)  # StepTable's cache of built models
    assert held_steps <= bound < n, held_steps
    assert held_states <= 2, held_states  # no state for a step nothing changed
    # every step is still there, in submission order, built on demand
    assert list(view.steps) == [f"s{i}" for i in range(n)]
    assert [view.steps[f"s{i}"].id for i in range(0, n, 97)] == [f"s{i}" for i in range(0, n, 97)]
    assert _live(ConcreteStep) - steps0 <= bound


def test_worker_view_memory_per_step_is_small(local_store: Any, tmp_path: Path):
    import tracemalloc

    from dagcraft.orchestrator.scheduler import Scheduler

    def measure(n: int) -> tuple[int, int]:
        rid = submit_spec(local_store, _big_spec(tmp_path, n, f"m{n}"))
        gc.collect()
        tracemalloc.start()
        try:
            view = LocalView(local_store, rid)
            Scheduler(view, "w", 30.0).ready()
            gc.collect()
            cur, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        del view
        return cur, peak

    small, big = measure(300), measure(1500)
    per_step = (big[0] - small[0]) / 1200
    peak_per_step = (big[1] - small[1]) / 1200
    # measured ~500 B held and ~1.4 KB at the peak (run.json's bytes and text, ~600 B a
    # step each, while it is read) per step; it was ~6.8 KB of both
    assert per_step < 1000, per_step
    assert peak_per_step < 2000, peak_per_step


def test_a_view_of_a_finished_run_keeps_only_statuses_and_seals_it_the_same(local_store: Any, tmp_path: Path):
    # a worker learns of other workers' steps from journal entries: it keeps their status and
    # rev, not a record each; the seal reads those records without keeping them
    from dagcraft.orchestrator.model import StepState, load_control, seal_digest, seal_material
    from dagcraft.tracing import seal
    from tests.orchestrator.helpers import drive_inline

    rid = submit_spec(local_store, _big_spec(tmp_path, 60, "done"))
    drive_inline(local_store, rid, tmp_path, status=False)
    ctl = load_control(local_store.get(layout.control(rid))[0])
    assert ctl.seal is not None
    states0 = _live(StepState)
    view = LocalView(local_store, rid)
    assert view.counts() == {"succeeded": 60}
    assert _live(StepState) - states0 <= 1
    assert not any(view.states.has_record(f"s{i}") for i in range(60))
    material = seal_material(rid, ctl.status, ctl.generation, view.exact_states())
    assert seal.digest(material) == ctl.seal.digest and len(material["steps"]) == ctl.seal.steps == 60
    assert seal_digest(rid, ctl.status, ctl.generation, view.exact_states()) == (ctl.seal.digest, 60)
    with pytest.raises(ValueError):  # it streams: the order is the caller's to keep
        seal_digest(rid, ctl.status, ctl.generation, reversed(list(view.exact_states())))
    assert not any(view.states.has_record(f"s{i}") for i in range(60))
    assert view.state("s59").status == "succeeded" and view.etag("s59") is None  # stale until read
    assert view.fresh("s59").status == "succeeded" and view.etag("s59") is not None


def test_cleaning_a_large_runs_scratch_holds_names_only(tmp_path: Path):
    """The sealing worker removes the run's empty step directories (one per step) at the end:
    holding a DirEntry per directory cost ~250 B each at that worker's peak (2.5 MiB at
    10,000 steps); names cost ~80. A non-empty directory stays."""
    import os
    import tracemalloc

    from dagcraft.orchestrator.scratch import clean_run_scratch

    n = 3000
    for i in range(n):
        (tmp_path / "r1" / f"step-{i:05d}-0123456789ab").mkdir(parents=True)
    (tmp_path / "r1" / "busy").mkdir()
    (tmp_path / "r1" / "busy" / "f").write_text("x")
    tracemalloc.start()
    try:
        clean_run_scratch(tmp_path, "r1")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert os.listdir(tmp_path / "r1") == ["busy"]
    assert peak / n < 150, peak / n
