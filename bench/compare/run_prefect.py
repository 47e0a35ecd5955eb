"""Prefect driver for bench/compare.py (runs in the bench's own Prefect venv, not dagcraft's).

    python run_prefect.py DAG_JSON WORKERS

One flow on a ``ThreadPoolTaskRunner(max_workers=WORKERS)``: every step is one ``@task`` that runs
``subprocess.run(["/bin/sh", "-c", command], check=True)``, submitted in topological order with
``wait_for=`` the futures of its needs (so a step starts only when its needs succeeded). Prefect's
default local setup: no PREFECT_API_URL, so it starts its ephemeral API server on a SQLite
database under PREFECT_HOME. Exits non-zero if any task failed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner

SPEC = json.loads(Path(sys.argv[1]).read_text())
WORKERS = int(sys.argv[2])


@task
def step(command: str) -> None:
    subprocess.run(["/bin/sh", "-c", command], check=True)


@flow(task_runner=ThreadPoolTaskRunner(max_workers=WORKERS))  # type: ignore[misc]
def dag() -> None:
    futures = {}
    for sid, needs in SPEC["steps"].items():  # generated in topological order
        futures[sid] = step.with_options(name=sid).submit(
            SPEC["commands"][sid], wait_for=[futures[n] for n in needs])
    for f in futures.values():
        f.result()  # raises if the step failed


if __name__ == "__main__":
    dag()
