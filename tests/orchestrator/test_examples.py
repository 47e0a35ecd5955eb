"""Every example in examples/ runs to success through ``dagcraft run`` (real processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dagcraft.orchestrator import list_runs, run_status
from dagcraft.primitives import open_store
from tests.conftest import server_store_url
from tests.orchestrator.helpers import REPO, cli, steps, unsupported_spec_fields

EXAMPLES = REPO / "examples"


def _run(tmp_path: Path, name: str, *extra: str, store: str | None = None) -> tuple[object, dict, object]:
    store_url = store or str(tmp_path / "store")
    proc = cli("run", str(EXAMPLES / name / "pipeline.yaml"), "--store", store_url, "--workers", "2",
               *extra, cwd=tmp_path, timeout=240)
    st = open_store(store_url)
    rid = list_runs(st)[0]["run_id"]
    return proc, run_status(st, rid), st


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.iterdir() if (p / "pipeline.yaml").exists()))
def test_example_succeeds(tmp_path, name):
    if missing := unsupported_spec_fields((EXAMPLES / name / "pipeline.yaml").read_text()):
        pytest.skip(f"spec fields not merged yet: {missing}")
    proc, status, _ = _run(tmp_path, name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert status["status"] == "succeeded"
    assert "report: " in proc.stdout
    report = Path(proc.stdout.split("report: ", 1)[1].split()[0])
    assert report.exists() and b"succeeded" in report.read_bytes()


def test_feature_review_foreach_outputs_and_artifacts(tmp_path):
    proc, status, _ = _run(tmp_path, "feature-review")
    assert proc.returncode == 0, proc.stderr
    by = steps(status)
    subtasks = by["plan"]["outputs"]["subtasks"]
    assert len(subtasks) == 3
    assert by["implement"]["children"] == [f"implement[{i}]" for i in range(3)]
    assert all(by[f"implement[{i}]"]["status"] == "succeeded" for i in range(3))
    assert "change.md" in by["implement[0]"]["artifacts"]
    assert by["merge"]["outputs"]["merged_subtasks"] == 3  # plan.md reached merge via inputs


def test_shell_pipeline_values_flow(tmp_path):
    proc, status, _ = _run(tmp_path, "shell-pipeline", "-p", "count=4", "-p", "scale=2")
    assert proc.returncode == 0, proc.stderr
    by = steps(status)
    assert by["generate"]["outputs"] == {"count": 4}
    assert by["aggregate"]["outputs"]["total"] == 20.0  # 2 * (1+2+3+4)


def test_rollback_example_compensates_in_reverse(tmp_path):
    state_dir = tmp_path / "envs"
    proc, status, _ = _run(tmp_path, "rollback", "-p", "fail_at=deploy", "-p", f"state_dir={state_dir}")
    assert proc.returncode == 1
    assert status["status"] == "rolled_back"
    by = steps(status)
    assert by["deploy"]["status"] == "failed"
    assert by["provision"]["status"] == by["migrate"]["status"] == "rolled_back"
    assert not state_dir.exists() or not any(state_dir.iterdir())  # the environment was deprovisioned


def test_example_on_s3_moto_server(tmp_path, moto_server):
    _example_on_s3(tmp_path, server_store_url(moto_server))


@pytest.mark.realserver
def test_example_on_real_server(tmp_path, real_s3_url):
    _example_on_s3(tmp_path, real_s3_url)


def _example_on_s3(tmp_path: Path, url: str) -> None:
    proc, status, _ = _run(tmp_path, "research-fanout", store=url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert status["status"] == "succeeded"
    by = steps(status)
    assert by["summarize"]["artifacts"] == ["summary.md"]
