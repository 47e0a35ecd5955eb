"""Scale benchmark of the local store: does the cost per step stay flat as the DAG grows?
Prints numbers; asserts nothing (never part of the test suite).

    python bench/bench_scale.py [--sizes 500,2000,10000] [--layer 100] [--workers 4] [--rounds 1]

For each size N: a DAG of N ``true`` steps in layers of ``--layer`` (bench_orchestrator's
``make_dag``: every step after the first layer needs one step of the previous layer), on a fresh
local store (temp dir), driven through the CLI exactly as a user would:

- submit:   wall (and CPU) of ``dagcraft submit SPEC --store S`` (process start, compile, writes).
- wall:     ``--workers`` ``dagcraft worker --run ID --exit-when-idle --quiet`` processes, from
            start until all have exited (the run succeeded); with ``--launch run``, one
            ``dagcraft resume ID --workers N`` instead (its workers fork from it: one start-up).
- work:     N x the median wall of a bare ``subprocess.run(["true"])`` in this process.
- overhead: (wall - work) / N, the issue's "wall minus the work, per step".
- status:   wall (and CPU) of ``dagcraft status ID --store S --json`` on the finished run (median of 3).
- RSS:      peak resident set of each worker process (``wait4`` rusage), the largest of them.
- CPU:      user+sys CPU of the launched processes / N, as ``wait4`` reports it (with what they
            reaped: forked workers, and the steps' commands): on a loaded machine wall times
            swing several-fold, CPU per step much less.

With ``--rounds R`` every size runs R times, interleaved (500, 2000, ..., 500, 2000, ...), and
the medians are reported, so a load spike on a shared machine skews one round, not the result.
Results also go to ``bench/results/scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from bench_orchestrator import bare_true, dag_spec, make_dag  # noqa: E402

CLI = [sys.executable, "-m", "dagcraft.cli.main"]


def _wait_rss(procs: list[subprocess.Popen[bytes]], deadline: float) -> tuple[list[int | None], int, float]:
    """Reap every process with ``wait4`` (for its own peak RSS and CPU); kill what outlives
    ``deadline``. Returns (exit codes, the largest peak RSS in KiB, CPU seconds of all)."""
    codes: list[int | None] = []
    peak = 0
    cpu = 0.0
    for p in procs:
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                codes.append(os.waitstatus_to_exitcode(status))
                peak = max(peak, ru.ru_maxrss)
                cpu += ru.ru_utime + ru.ru_stime
                p.returncode = codes[-1]
                break
            if time.monotonic() > deadline:
                os.killpg(p.pid, 9)
                _, status, ru = os.wait4(p.pid, 0)
                p.returncode = -9
                codes.append(None)
                break
            time.sleep(0.05)  # polling a child's exit, not synchronising with it
    return codes, peak, cpu


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def one(n: int, a: argparse.Namespace, bare: float, tmp: Path) -> dict[str, Any]:
    spec = tmp / f"pipeline-{n}.yaml"
    if not spec.exists():
        spec.write_text(dag_spec(make_dag(n, a.layer)))
    store = Path(tempfile.mkdtemp(prefix=f"scale-{n}-", dir=tmp)) / "store"
    t, c = time.perf_counter(), _child_cpu()
    p = subprocess.run([*CLI, "submit", str(spec), "--store", str(store)], capture_output=True, text=True)
    submit_s, submit_cpu = time.perf_counter() - t, _child_cpu() - c
    if p.returncode != 0:
        return {"steps": n, "error": f"submit exit {p.returncode}: {p.stderr.strip()[-500:]}"}
    run_id = p.stdout.strip().splitlines()[-1]
    logs = store.parent / "logs"
    logs.mkdir()
    if n > a.run_max:  # submit and status only (status then reads the submitted run)
        t, c = time.perf_counter(), _child_cpu()
        sp = subprocess.run([*CLI, "status", run_id, "--store", str(store), "--json"], capture_output=True, text=True)
        row0 = {"steps": n, "submit_s": round(submit_s, 3), "submit_cpu_s": round(submit_cpu, 3),
                "status_unfinished_s": round(time.perf_counter() - t, 3),
                "status_unfinished_cpu_s": round(_child_cpu() - c, 3), "status_exit": sp.returncode}
        return row0
    if a.launch == "run":  # one `dagcraft resume --workers N`: its workers fork from it, imports done
        argvs = [[*CLI, "resume", run_id, "--store", str(store), "--workers", str(a.workers), "--no-report"]]
    else:
        argvs = [[*CLI, "worker", "--store", str(store), "--run", run_id, "--exit-when-idle", "--poll-max",
                  str(a.poll_max), "--quiet"]] * a.workers
    t0 = time.perf_counter()
    procs = []
    for i, argv in enumerate(argvs):
        with open(logs / f"w{i}.err", "wb") as err:
            procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                                          env={**os.environ, "TMPDIR": str(store.parent)}))
    codes, rss_kib, cpu = _wait_rss(procs, time.monotonic() + a.timeout)
    wall = time.perf_counter() - t0
    status_s, status_cpu = [], []
    out = ""
    for _ in range(3):
        t, c = time.perf_counter(), _child_cpu()
        sp = subprocess.run([*CLI, "status", run_id, "--store", str(store), "--json"], capture_output=True, text=True)
        status_s.append(time.perf_counter() - t)
        status_cpu.append(_child_cpu() - c)
        out = sp.stdout
    try:
        st = json.loads(out)
        run_status, counts = st["status"], st["counts"]
    except (ValueError, KeyError):
        run_status, counts = f"? ({sp.returncode}: {sp.stderr.strip()[-300:]})", {}
    row: dict[str, Any] = {
        "steps": n, "workers": a.workers, "submit_s": round(submit_s, 3), "submit_cpu_s": round(submit_cpu, 3),
        "wall_s": round(wall, 3), "status_cpu_s": round(statistics.median(status_cpu), 3),
        "work_s": round(n * bare, 3), "overhead_per_step_ms": round((wall - n * bare) / n * 1000, 3),
        "status_s": round(statistics.median(status_s), 3), "peak_worker_rss_mib": round(rss_kib / 1024, 1),
        # the workers' own CPU (their commands are reaped by them, not counted): robust to load
        "worker_cpu_per_step_ms": round(cpu / n * 1000, 3),
        "run_status": run_status, "counts": counts, "worker_exit_codes": codes,
    }
    if codes != [0] * len(argvs) or run_status != "succeeded":
        row["stderr"] = [(logs / f"w{i}.err").read_text()[-800:] for i in range(len(argvs))]
    # no rmtree here: see ``main`` (every run's files are removed once, after the last run)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="500,2000,10000", help="comma-separated step counts")
    ap.add_argument("--layer", type=int, default=100, help="steps per DAG layer")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--launch", choices=("workers", "run"), default="workers",
                    help="workers: that many `dagcraft worker` processes (each imports dagcraft, as on "
                         "separate hosts); run: one `dagcraft resume --workers N` (forked workers)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds per size (medians reported)")
    ap.add_argument("--poll-max", type=float, default=0.2, help="workers' longest idle poll interval")
    ap.add_argument("--timeout", type=float, default=1200.0, help="per run, seconds")
    ap.add_argument("--run-max", type=int, default=10**9,
                    help="sizes above this are only submitted and their status read (no workers)")
    ap.add_argument("--json-out", type=Path, default=BENCH / "results" / "scale.json")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    bare = bare_true(200)
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
          f"bare `true` {bare * 1000:.3f} ms; {a.workers} workers, layers of {a.layer}", flush=True)
    # Every run's files stay until the last run ended. On ext4 without a journal (this project's
    # CI machine) a file created within a few minutes after many were removed costs a scan over
    # the recently freed inodes, so removing one run's 50,000 files would bill the next run.
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    rows: dict[int, list[dict[str, Any]]] = {n: [] for n in sizes}
    try:
        for r in range(a.rounds):
            for n in sizes:
                row = one(n, a, bare, tmp)
                rows[n].append(row)
                print(f"round {r + 1} {n:>6} steps: {json.dumps(row)}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    keys = ("submit_s", "submit_cpu_s", "wall_s", "work_s", "overhead_per_step_ms", "status_s", "status_cpu_s",
            "peak_worker_rss_mib", "worker_cpu_per_step_ms")
    summary = []
    for n in sizes:
        ok = [x for x in rows[n] if "wall_s" in x]
        med = {k: round(statistics.median(x[k] for x in ok), 3) for k in keys} if ok else {}
        only = [x for x in rows[n] if "status_unfinished_s" in x]  # above --run-max
        if only:
            med = {k: round(statistics.median(x[k] for x in only), 3)
                   for k in ("submit_s", "submit_cpu_s", "status_unfinished_s", "status_unfinished_cpu_s")}
        summary.append({"steps": n, "rounds": len(ok), **med,
                        "all_succeeded": all(x.get("run_status") == "succeeded" for x in rows[n])})
    print(f"\n{'steps':>6} {'submit s (CPU)':>15} {'wall s':>8} {'work s':>7} {'overhead/step ms':>17} "
          f"{'status s (CPU)':>15} {'worker RSS MiB':>15} {'worker CPU/step ms':>19}  ok")
    for s in summary:
        if "status_unfinished_s" in s:
            print(f"{s['steps']:>6} {s['submit_s']:>7.2f} ({s['submit_cpu_s']:>5.2f})   not run; status of the "
                  f"submitted run {s['status_unfinished_s']:.2f} s (CPU {s['status_unfinished_cpu_s']:.2f} s)")
            continue
        if not s["rounds"]:
            print(f"{s['steps']:>6} FAILED")
            continue
        print(f"{s['steps']:>6} {s['submit_s']:>7.2f} ({s['submit_cpu_s']:>5.2f}) {s['wall_s']:>8.1f} "
              f"{s['work_s']:>7.2f} {s['overhead_per_step_ms']:>17.2f} {s['status_s']:>7.2f} ({s['status_cpu_s']:>5.2f}) "
              f"{s['peak_worker_rss_mib']:>15.1f} {s['worker_cpu_per_step_ms']:>19.2f}  "
              f"{'yes' if s['all_succeeded'] else 'NO'}")
    ran = [s for s in summary if s.get("rounds") and "status_s" in s]
    if ran:  # issue 12's three targets, at the largest size run (and memory against the smallest)
        big, small = ran[-1], ran[0]
        print(f"targets at {big['steps']} steps: submit {big['submit_s']:.2f} s (target < 2), status "
              f"{big['status_s']:.2f} s (target < 1), worker peak RSS {big['peak_worker_rss_mib']:.1f} MiB "
              f"({small['peak_worker_rss_mib']:.1f} MiB at {small['steps']} steps; target: flat)")
    a.json_out.parent.mkdir(parents=True, exist_ok=True)
    a.json_out.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": platform.platform(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "bare_true_ms": round(bare * 1000, 4), "layer": a.layer,
        "workers": a.workers, "summary": summary, "rounds": rows}, indent=2))
    print(f"JSON: {a.json_out}")


if __name__ == "__main__":
    main()
