"""``dagcraft submit`` and ``dagcraft status --json`` of large runs, one or more source trees
side by side (issue 12: submit of 10,000 steps < 2 s, status of a 10,000-step run < 1 s).
Prints numbers; asserts nothing (never part of the test suite).

    git archive <before> dagcraft | tar -x -C /tmp/before     # a tree to compare against
    python bench/bench_cli_scale.py --tree before=/tmp/before --tree after=. \\
        --submit 500=/tmp/s500.yaml --submit 10000=/tmp/s10k.yaml \\
        --status 10000=/tmp/store/RUN_ID [--rounds 3]

Each command runs as a fresh ``python -m dagcraft.cli.main`` process with ``PYTHONPATH`` set to
the tree and the working directory outside it (so that the tree, not the installed package, is
imported), ``PYTHONDONTWRITEBYTECODE`` unset (an installed dagcraft has its ``.pyc``), after one
warm-up run per tree. Rounds interleave the trees; reported: the median and the minimum of the
wall times and the median CPU (user + sys, ``wait4``). Submits go to a fresh temp store each time;
``--status`` names an existing run as ``STORE/RUN_ID`` (make one with ``dagcraft submit`` and 4
``dagcraft worker --run ID --exit-when-idle``). Make a spec with
``python -c "import sys; sys.path.insert(0, 'bench'); from bench_orchestrator import make_dag,
dag_spec; open('/tmp/s10k.yaml', 'w').write(dag_spec(make_dag(10000, 100)))"``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _run(tree: Path, args: list[str]) -> tuple[float, float]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(tree)
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "dagcraft.cli.main", *args], cwd=tempfile.gettempdir(), env=env,
                         stdout=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{tree}: dagcraft {' '.join(args)}: exit {os.waitstatus_to_exitcode(status)}")
    return wall, ru.ru_utime + ru.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", required=True, metavar="NAME=DIR", help="a source tree (repeat)")
    ap.add_argument("--submit", action="append", default=[], metavar="N=SPEC", help="time `submit SPEC`")
    ap.add_argument("--status", action="append", default=[], metavar="N=STORE/RUN", help="time `status RUN --json`")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    trees = {n: Path(d).resolve() for n, d in (t.split("=", 1) for t in a.tree)}
    store = Path(tempfile.mkdtemp(prefix="dagcraft-cli-bench-"))
    cmds: dict[str, list[str]] = {}
    for item in a.submit:
        n, spec = item.split("=", 1)
        cmds[f"submit {n}"] = ["submit", str(Path(spec).resolve()), "--store", str(store / "s")]
    for item in a.status:
        n, where = item.split("=", 1)
        root, run_id = where.rstrip("/").rsplit("/", 1)
        cmds[f"status {n}"] = ["status", run_id, "--store", str(Path(root).resolve()), "--json"]
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    try:
        for r in range(a.rounds + 1):  # round 0: warm-up (writes each tree's .pyc)
            for name, args in cmds.items():
                for tree, path in trees.items():
                    shutil.rmtree(store / "s", ignore_errors=True)
                    got = _run(path, args)
                    if r:
                        results.setdefault((name, tree), []).append(got)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    print(f"{'command':<14} {'tree':<10} {'wall median':>11} {'wall min':>9} {'CPU median':>11}")
    for (name, tree), runs in results.items():
        walls = [w for w, _ in runs]
        print(f"{name:<14} {tree:<10} {statistics.median(walls):>11.2f} {min(walls):>9.2f} "
              f"{statistics.median(c for _, c in runs):>11.2f}")
    print(f"load average {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f} {os.getloadavg()[2]:.1f}")


if __name__ == "__main__":
    main()
