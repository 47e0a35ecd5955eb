"""Luigi driver for bench/compare.py (runs in the bench's own Luigi venv, not dagcraft's).

    python run_luigi.py DAG_JSON WORKERS

DAG_JSON: {"steps": {id: [needs...]}, "commands": {id: shell command}, "markers": dir}. One
``luigi.Task`` class, parameterised by step id: ``requires()`` is the step's needs, ``output()`` its
marker file (which the command itself writes, so Luigi's completeness check sees the real work),
``run()`` is ``subprocess.run(["/bin/sh", "-c", command], check=True)``. Scheduled by
``luigi.build(..., workers=WORKERS, local_scheduler=True)``; exits 0 only if Luigi reports success.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import luigi

SPEC = json.loads(Path(sys.argv[1]).read_text())
WORKERS = int(sys.argv[2])


class Step(luigi.Task):
    sid = luigi.Parameter()

    def requires(self):  # type: ignore[no-untyped-def]
        return [Step(sid=n) for n in SPEC["steps"][self.sid]]

    def output(self):  # type: ignore[no-untyped-def]
        return luigi.LocalTarget(str(Path(SPEC["markers"]) / self.sid))

    def run(self):  # type: ignore[no-untyped-def]
        subprocess.run(["/bin/sh", "-c", SPEC["commands"][self.sid]], check=True)


if __name__ == "__main__":
    ok = luigi.build([Step(sid=s) for s in SPEC["steps"]], workers=WORKERS, local_scheduler=True)
    sys.exit(0 if ok else 1)
