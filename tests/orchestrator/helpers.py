"""Shared helpers for run-engine tests: write a spec, submit it, drive it, read results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from dagcraft.orchestrator import WorkerConfig, run_status, submit
from dagcraft.orchestrator.worker import Worker
from dagcraft.workflows import compile_file

REPO = Path(__file__).resolve().parents[2]


def write_spec(tmp_path: Path, text: str, name: str = "pipeline.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def submit_spec(store: Any, spec: Path, params: dict[str, Any] | None = None, run_id: str | None = None) -> str:
    wf = compile_file(spec, params or {})
    return submit(store, wf, run_id=run_id, spec_dir=str(spec.parent))


def drive_inline(store: Any, run_id: str, tmp_path: Path, *, concurrency: int = 4, lease_ttl: float = 30.0,
                 inline: bool = False, status: bool = True) -> dict[str, Any]:
    """Run a worker in this process until the run finishes; return ``run_status`` (which
    reads every step once: ``status=False`` skips it, for request counting)."""
    cfg = WorkerConfig(store=store, store_url=store.url, worker_id=f"test-worker-{os.getpid()}",
                       lease_ttl=lease_ttl, tmp_root=tmp_path / "work", grace=1.0)
    Worker(cfg, run_id=run_id, concurrency=concurrency, exit_when_idle=True, poll_min=0.01, poll_max=0.05,
           inline=inline).run()
    return run_status(store, run_id) if status else {}


def run_spec(store: Any, tmp_path: Path, text: str, params: dict[str, Any] | None = None,
             **kw: Any) -> tuple[str, dict[str, Any]]:
    spec = write_spec(tmp_path, text)
    rid = submit_spec(store, spec, params)
    return rid, drive_inline(store, rid, tmp_path, **kw)


def steps(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["step"]: s for s in status["steps"]}


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 120,
        check: bool = False) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "dagcraft.cli.main", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"dagcraft {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def spawn_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
              new_session: bool = True) -> subprocess.Popen[str]:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "dagcraft.cli.main", *args], cwd=cwd, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=new_session)


def wait_for(predicate: Any, timeout: float = 60.0, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll ``predicate`` (an observable state in the store or on disk) until truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def killpg(proc: subprocess.Popen[Any], sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def read_trace_events(store: Any, run_id: str, step: str, attempt: int | str) -> list[dict[str, Any]]:
    from dagcraft.orchestrator import layout

    got = store.get(f"{layout.attempt_prefix(run_id, step, attempt)}/trace.jsonl")
    assert got is not None, f"no trace for {step} attempt {attempt}"
    return [json.loads(line) for line in got[0].decode().splitlines() if line.strip()]


#: plan → foreach each over 3 items → merge (3 submitted steps, 6 concrete ones)
FANOUT = """
    name: fanout
    steps:
      - id: plan
        run: 'echo ''items=["a","b","c"]'' >> $DAGCRAFT_OUTPUT'
        outputs: {values: [items]}
      - id: each
        needs: [plan]
        foreach: "${{ steps.plan.outputs.items }}"
        run: "echo ${{ item }}"
      - id: merge
        needs: [each]
        run: "true"
"""


#: spec fields of issue 10 that land on other branches (loops: A, budgets: B); an example that
#: uses one is skipped where this checkout's schema lacks it, and runs once they are merged
PENDING_SPEC_FIELDS = ("loop", "budget")


def unsupported_spec_fields(spec_text: str) -> list[str]:
    """Which of :data:`PENDING_SPEC_FIELDS` ``spec_text`` uses as a YAML key while ``dagcraft
    schema`` (here: :func:`spec_json_schema`) has no such property anywhere."""
    import re

    from dagcraft.workflows.spec import spec_json_schema

    schema = spec_json_schema()
    known = set(schema["properties"]) | {p for d in schema["$defs"].values() for p in d.get("properties", {})}
    return [f for f in PENDING_SPEC_FIELDS
            if f not in known and re.search(rf"^\s*(- )?{f}:", spec_text, re.M)]


def count_gets(store: Any, monkeypatch: Any) -> dict[str, int]:
    """Count ``store.get`` calls per key from now on (the real store still answers them)."""
    reads: dict[str, int] = {}
    get = store.get

    def counting_get(key: str, *args: Any, **kwargs: Any) -> Any:
        reads[key] = reads.get(key, 0) + 1
        return get(key, *args, **kwargs)

    monkeypatch.setattr(store, "get", counting_get)
    return reads
