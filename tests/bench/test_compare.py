"""Smoke test of bench/compare.py's DAG generation (no network, no other tool's venv): every tool
gets the same DAG, and GNU make really runs it to completion. The bench itself is not a test."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from dagcraft.workflows import compile_workflow, parse_spec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compare() -> ModuleType:
    env, path = dict(os.environ), list(sys.path)
    spec = importlib.util.spec_from_file_location("bench_compare", ROOT / "bench" / "compare.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_compare"] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
    finally:  # the benches set AWS test credentials at import: keep them out of this process
        os.environ.clear()
        os.environ.update(env)
        sys.path[:] = path
    return mod


def test_dag_is_20_layers_of_25_each_step_needing_one_of_the_layer_before(compare: ModuleType) -> None:
    dag = compare.make_dag(500, 25)
    assert len(dag) == 500
    assert sum(len(n) for n in dag.values()) == 475
    for i, sid in enumerate(dag):
        assert sid == f"s{i}"
        layer = i // 25
        if layer == 0:
            assert dag[sid] == []
        else:
            (need,) = dag[sid]
            assert int(need[1:]) // 25 == layer - 1
    for layer in range(1, 20):  # a permutation: each step of the layer before is needed once
        needed = sorted(dag[f"s{layer * 25 + j}"][0] for j in range(25))
        assert needed == sorted(f"s{(layer - 1) * 25 + j}" for j in range(25))


def test_makefile_and_pipeline_have_the_same_edges(compare: ModuleType, tmp_path: Path) -> None:
    dag = compare.make_dag(100, 25)
    markers = tmp_path / "markers"
    text = compare.makefile(dag, "true", markers)
    rules = dict(re.findall(rf"^{re.escape(str(markers))}/(s\d+):(.*)$", text, re.M))
    assert {sid: [Path(p).name for p in deps.split()] for sid, deps in rules.items()} == dag

    commands = compare.step_commands(dag, "sleep 0.05", markers)
    wf = compile_workflow(parse_spec(compare.pipeline_yaml(dag, commands)), {})
    assert {sid: list(step.needs) for sid, step in wf.steps.items()} == dag
    assert wf.steps["s30"].run == ["/bin/sh", "-c", f"sleep 0.05 && : > {markers / 's30'}"]


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make not installed")
def test_make_run_writes_every_marker(compare: ModuleType, tmp_path: Path) -> None:
    dag = compare.make_dag(50, 25)
    prep = compare.prepare("make", dag, "true", 4, tmp_path, shutil.which("make"), tmp_path / "venvs")
    subprocess.run(prep.argv, cwd=prep.cwd, check=True, capture_output=True)
    assert sorted(m.name for m in prep.markers.iterdir()) == sorted(dag)
