"""One tracecraft-ai worker for bench_orchestrator.py (runs under the tracecraft venv's python).

    python _tracecraft_worker.py DAG.json TRACECRAFT_EXE [--poll-max 0.2]

cwd must hold the ``.tracecraft.json`` written by ``tracecraft init``; the agent id comes from
``$TRACECRAFT_AGENT`` (tracecraft's own override). Loop:
  1. find steps whose dependencies are complete and that nobody has claimed: one LIST of
     ``steps/`` through tracecraft's own S3 wrapper, in-process (no CLI start per poll). A step
     is complete when ``steps/<id>/handoff.json`` exists: ``tracecraft complete`` writes it
     after ``status.json`` = complete; a step is taken when ``steps/<id>/claim.json`` exists;
  2. ``tracecraft claim <id>`` (one CLI call; atomic If-None-Match; exit 1 "already claimed"
     when another worker won);
  3. run ``true``;
  4. ``tracecraft complete <id>`` (one CLI call).
Exits when every step is complete. Prints one JSON line of counters on stdout.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time


def main() -> None:
    dag_path, exe = sys.argv[1], sys.argv[2]
    poll_max = float(sys.argv[sys.argv.index("--poll-max") + 1]) if "--poll-max" in sys.argv else 0.2
    dag: dict[str, list[str]] = json.load(open(dag_path))
    from tracecraft.store import get_store

    store, _cfg = get_store()
    c = {"steps_run": 0, "claim_conflicts": 0, "claim_calls": 0, "complete_calls": 0, "lists": 0,
         "cli_seconds": 0.0, "true_seconds": 0.0, "polls_idle": 0}
    rng = random.Random()
    interval = 0.01
    while True:
        keys = set(store.list_keys("steps/"))
        c["lists"] += 1
        done = {s for s in dag if f"steps/{s}/handoff.json" in keys}
        if len(done) == len(dag):
            break
        ready = [s for s, needs in dag.items()
                 if f"steps/{s}/claim.json" not in keys and all(n in done for n in needs)]
        rng.shuffle(ready)
        ran = False
        for sid in ready:
            t = time.perf_counter()
            p = subprocess.run([exe, "claim", sid], capture_output=True, text=True)
            c["cli_seconds"] += time.perf_counter() - t
            c["claim_calls"] += 1
            if p.returncode != 0:
                if "already claimed" in p.stderr:
                    c["claim_conflicts"] += 1
                    continue
                sys.exit(f"tracecraft claim {sid} failed ({p.returncode}): {p.stderr.strip()}")
            t = time.perf_counter()
            r = subprocess.run(["true"])
            c["true_seconds"] += time.perf_counter() - t
            if r.returncode != 0:
                sys.exit(f"`true` failed for {sid}")
            t = time.perf_counter()
            p = subprocess.run([exe, "complete", sid], capture_output=True, text=True)
            c["cli_seconds"] += time.perf_counter() - t
            c["complete_calls"] += 1
            if p.returncode != 0:
                sys.exit(f"tracecraft complete {sid} failed ({p.returncode}): {p.stderr.strip()}")
            c["steps_run"] += 1
            ran = True
            break  # re-list: completing a step may have made others ready
        if ran:
            interval = 0.01
            continue
        c["polls_idle"] += 1
        time.sleep(interval)
        interval = min(poll_max, interval * 2)
    c["cli_seconds"] = round(c["cli_seconds"], 3)
    c["true_seconds"] = round(c["true_seconds"], 3)
    print(json.dumps(c), flush=True)


if __name__ == "__main__":
    main()
