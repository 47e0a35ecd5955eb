"""Benchmark of the run engine: scheduling overhead per step. Prints numbers; asserts nothing.

    python bench/bench_orchestrator.py [--steps 500] [--workers 4] [--no-s3] [--no-tracecraft]

The DAG: ``--steps`` steps ``run: ["true"]`` in layers of ``--layer`` (25); every step after the
first layer needs exactly one step of the previous layer (a permutation, so the chains cross).

1. dagcraft: ``dagcraft submit``, then ``--workers`` ``dagcraft worker --run ID --exit-when-idle
   --poll-max 0.2 --quiet`` processes, on a local store (temp dir) and on a lock-serialized moto
   S3 server (``tests/moto_server.py``'s app behind a request counter, in a subprocess).
2. tracecraft-ai (PyPI; the "coordination state as JSON objects in a bucket" predecessor),
   installed into its own venv (``--tc-venv``, default /tmp/tcvenv) when missing: the same DAG,
   the same number of worker processes (``bench/_tracecraft_worker.py``), each step one
   ``tracecraft claim`` CLI call + ``true`` + one ``tracecraft complete`` CLI call, against the
   same moto server (a fresh bucket).

Numbers (per configuration):
- wall: from the moment the worker processes are started until all have exited (run succeeded).
- bare_true: median wall time of ``subprocess.run(["true"])`` in this process (~200 runs): the
  steps' own work, with no orchestration at all.
- overhead/step = (wall * workers - steps * bare_true) / steps: worker-seconds spent per step on
  everything but the command itself (process starts, store requests, polling, idling).
- wall/step = wall / steps: the throughput view (what a user waits per step with N workers).
- requests/step (S3 only): HTTP requests the moto server received between worker start and exit,
  divided by steps (counted by the server, so CLI processes' requests are included).
Results also go to ``bench/results/orchestrator.json``.
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
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT))

TARGET_LOCAL_MS = 10.0  # target: local-store overhead per step under 10 ms

for _var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN",
             "AWS_SECURITY_TOKEN", "DAGCRAFT_STORE", "DAGCRAFT_RUN_ID", "DAGCRAFT_AGENT", "DAGCRAFT_STEP"):
    os.environ.pop(_var, None)
os.environ.update({
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
})


# -- the DAG ---------------------------------------------------------------------------------
def make_dag(n: int, layer: int) -> dict[str, list[str]]:
    """Step id -> needs. Step j of layer L>0 needs step (7j+3) mod layer of layer L-1."""
    dag: dict[str, list[str]] = {}
    for i in range(n):
        lay, j = divmod(i, layer)
        if lay == 0:
            dag[f"s{i}"] = []
        else:
            width = min(layer, n - (lay - 1) * layer)
            dag[f"s{i}"] = [f"s{(lay - 1) * layer + (7 * j + 3) % width}"]
    return dag


def dag_spec(dag: dict[str, list[str]]) -> str:
    lines = ["name: bench-overhead", "steps:"]
    for sid, needs in dag.items():
        lines.append(f"  - id: {sid}")
        if needs:
            lines.append(f"    needs: [{', '.join(needs)}]")
        lines.append('    run: ["true"]')
    return "\n".join(lines) + "\n"


def bare_true(n: int) -> float:
    subprocess.run(["true"])
    xs = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(["true"])
        xs.append(time.perf_counter() - t)
    return statistics.median(xs)


# -- moto server -----------------------------------------------------------------------------
class MotoServer:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(BENCH / "_moto_counting_server.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.proc.kill()
            raise RuntimeError(f"moto server did not start: {line!r}")
        self.endpoint = f"http://127.0.0.1:{int(line)}"

    def new_bucket(self, tag: str) -> str:
        from dagcraft.primitives.s3 import make_client
        from dagcraft.primitives.ulid import new_ulid

        name = f"bench-{tag}-{new_ulid().lower()}"
        make_client(self.endpoint, "us-east-1").create_bucket(Bucket=name)
        return name

    def take_stats(self) -> dict[str, int]:
        """Requests counted since the last call (and reset)."""
        with urllib.request.urlopen(f"{self.endpoint}/__bench_stats__", timeout=10) as r:
            return json.loads(r.read())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- helpers ---------------------------------------------------------------------------------
def wait_all(procs: list[subprocess.Popen[Any]], deadline: float) -> list[tuple[int | None, str, str]]:
    """Wait for every process (until ``deadline``, monotonic); kill the rest. Returns (rc, out, err)."""
    out = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            out.append((p.returncode, o, e))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, 9)
            except ProcessLookupError:
                pass
            o, e = p.communicate()
            out.append((None, o, e))
    return out


def child_cpu() -> float:
    """CPU seconds (user + sys) of this process's terminated, waited-for children and their
    waited-for descendants (the workers and the commands they ran)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def metrics(wall: float, steps: int, workers: int, bare: float, cpu: float) -> dict[str, float]:
    return {
        "cpu_per_step_ms": round(cpu / steps * 1000, 3),
        "wall_s": round(wall, 3),
        "wall_per_step_ms": round(wall / steps * 1000, 3),
        "overhead_per_step_ms": round((wall * workers - steps * bare) / steps * 1000, 3),
        # the issue's definition read literally: (wall time - the steps' own time) / steps
        "wall_overhead_per_step_ms": round((wall - steps * bare) / steps * 1000, 3),
        "steps_per_s": round(steps / wall, 2),
    }


def step_spans(status: dict[str, Any]) -> dict[str, float]:
    spans = [s["finished_at"] - s["started_at"] for s in status["steps"]
             if s.get("finished_at") is not None and s.get("started_at") is not None]
    if not spans:
        return {}
    spans.sort()
    return {"claim_to_commit_median_ms": round(statistics.median(spans) * 1000, 2),
            "claim_to_commit_p90_ms": round(spans[int(len(spans) * 0.9)] * 1000, 2),
            "claim_to_commit_min_ms": round(spans[0] * 1000, 2),
            "claim_to_commit_max_ms": round(spans[-1] * 1000, 2),
            "claim_to_commit_sum_s": round(sum(spans), 3)}


# -- dagcraft --------------------------------------------------------------------------------
def run_dagcraft(label: str, store_url: str, spec: Path, steps: int, a: argparse.Namespace, bare: float,
                 server: MotoServer | None) -> dict[str, Any]:
    from dagcraft.orchestrator import run_status
    from dagcraft.primitives import open_store

    print(f"\n[{label}] dagcraft: {steps} steps, {a.workers} workers, store {store_url}", flush=True)
    cli = [sys.executable, "-m", "dagcraft.cli.main"]
    t = time.perf_counter()
    p = subprocess.run([*cli, "submit", str(spec), "--store", store_url], capture_output=True, text=True)
    submit_s = time.perf_counter() - t
    if p.returncode != 0:
        return {"label": label, "error": f"submit failed ({p.returncode}): {p.stderr.strip()}"}
    run_id = p.stdout.strip()
    if server is not None:
        server.take_stats()  # reset: count only the workers' requests
    work = Path(tempfile.mkdtemp(prefix="bench-dagcraft-"))
    env = {**os.environ, "TMPDIR": str(work)}
    argv = [*cli, "worker", "--store", store_url, "--run", run_id, "--exit-when-idle", "--poll-max",
            str(a.poll_max), "--quiet"]
    cpu0 = child_cpu()
    t0 = time.perf_counter()
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for _ in range(a.workers)]
    results = wait_all(procs, time.monotonic() + a.timeout)
    wall = time.perf_counter() - t0
    cpu = child_cpu() - cpu0
    reqs = server.take_stats() if server is not None else None
    shutil.rmtree(work, ignore_errors=True)
    problems = [f"worker {i}: exit {rc}; stderr: {err.strip()[-2000:]}" for i, (rc, _, err) in enumerate(results)
                if rc != 0]
    noisy = [f"worker {i} stderr: {err.strip()[-1000:]}" for i, (rc, _, err) in enumerate(results)
             if rc == 0 and err.strip()]
    st = run_status(open_store(store_url), run_id)
    counts = st["counts"]
    attempts = [s["attempt"] for s in st["steps"]]
    out: dict[str, Any] = {
        "label": label, "tool": "dagcraft", "store": store_url, "run_id": run_id, "steps": steps,
        "workers": a.workers, "submit_s": round(submit_s, 3), "run_status": st["status"],
        "step_counts": counts, "steps_in_status": len(st["steps"]),
        "max_attempt": max(attempts) if attempts else None,
        **metrics(wall, steps, a.workers, bare, cpu), **step_spans(st),
    }
    if reqs is not None:
        total = reqs.pop("total", 0)
        out["requests"] = reqs
        out["requests_per_step"] = round(total / steps, 2)
        out["requests_per_step_by_kind"] = {k: round(v / steps, 2) for k, v in sorted(reqs.items())}
    if problems:
        out["problems"] = problems
    if noisy:
        out["stderr"] = noisy
    if st["status"] != "succeeded" or counts.get("succeeded") != steps or len(st["steps"]) != steps:
        out.setdefault("problems", []).append(
            f"run status {st['status']!r}, counts {counts}, {len(st['steps'])} steps (expected {steps} succeeded)")
    return out


# -- tracecraft-ai ---------------------------------------------------------------------------
def ensure_tracecraft(venv: Path, install: bool) -> tuple[Path | None, str | None]:
    """The ``tracecraft`` executable of the venv (installing tracecraft-ai into it when asked),
    or None and why not."""
    exe = venv / "bin" / "tracecraft"
    py = venv / "bin" / "python"
    if not exe.exists():
        if not install:
            return None, f"{exe} not found and --no-tracecraft-install given"
        print(f"installing tracecraft-ai into {venv} ...", flush=True)
        if not py.exists():
            p = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
            if p.returncode != 0:
                # the dev venv's interpreter may lack ensurepip; fall back on the system python3
                syspy = shutil.which("python3") or "python3"
                p = subprocess.run([syspy, "-m", "venv", str(venv)], capture_output=True, text=True)
                if p.returncode != 0:
                    return None, f"could not create a venv at {venv}: {p.stderr.strip()[-500:]}"
        p = subprocess.run([str(py), "-m", "pip", "install", "-q", "tracecraft-ai"], capture_output=True, text=True)
        if p.returncode != 0 or not exe.exists():
            return None, f"`pip install tracecraft-ai` failed ({p.returncode}): {p.stderr.strip()[-800:]}"
    p = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    if p.returncode != 0:
        return None, f"`tracecraft --help` failed ({p.returncode}): {p.stderr.strip()[-500:]}"
    missing = [c for c in ("claim", "complete", "init") if c not in p.stdout]
    if missing:
        return None, f"tracecraft CLI has no {', '.join(missing)} command(s); `tracecraft --help`:\n{p.stdout}"
    p = subprocess.run([str(exe), "init", "--help"], capture_output=True, text=True)
    if "--endpoint" not in p.stdout:
        return None, f"`tracecraft init` has no --endpoint option (no custom S3 endpoint):\n{p.stdout}"
    return exe, None


def tracecraft_version(venv: Path) -> str:
    p = subprocess.run([str(venv / "bin" / "python"), "-c",
                        "import importlib.metadata as m; print(m.version('tracecraft-ai'))"],
                       capture_output=True, text=True)
    return p.stdout.strip() or "?"


def run_tracecraft(exe: Path, venv: Path, dag: dict[str, list[str]], a: argparse.Namespace, bare: float,
                   server: MotoServer) -> dict[str, Any]:
    label = "tracecraft-ai / moto S3"
    print(f"\n[{label}] tracecraft-ai {tracecraft_version(venv)}: {len(dag)} steps, {a.workers} workers",
          flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-tracecraft-"))
    from dagcraft.primitives.ulid import new_ulid

    bucket = f"bench-tc-{new_ulid().lower()}"
    # `tracecraft init` writes ./.tracecraft.json and creates the bucket (ensure_bucket)
    p = subprocess.run([str(exe), "init", "--endpoint", server.endpoint, "--bucket", bucket, "--project", "bench",
                        "--agent", "w0"], cwd=work, capture_output=True, text=True)
    if p.returncode != 0:
        return {"label": label, "skipped": f"`tracecraft init` failed ({p.returncode}): {p.stderr.strip()}"}
    (work / "dag.json").write_text(json.dumps(dag))
    server.take_stats()
    cpu0 = child_cpu()
    t0 = time.perf_counter()
    procs = [subprocess.Popen([str(venv / "bin" / "python"), str(BENCH / "_tracecraft_worker.py"),
                               str(work / "dag.json"), str(exe), "--poll-max", str(a.poll_max)],
                              cwd=work, env={**os.environ, "TRACECRAFT_AGENT": f"w{i}"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for i in range(a.workers)]
    results = wait_all(procs, time.monotonic() + a.timeout)
    wall = time.perf_counter() - t0
    cpu = child_cpu() - cpu0
    reqs = server.take_stats()
    problems = [f"worker {i}: exit {rc}; stderr: {err.strip()[-2000:]}" for i, (rc, _, err) in enumerate(results)
                if rc != 0]
    per_worker = []
    for _rc, o, _ in results:
        try:
            per_worker.append(json.loads(o.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            pass
    totals: dict[str, float] = {}
    for c in per_worker:
        for k, v in c.items():
            totals[k] = round(totals.get(k, 0) + v, 3)
    # verify through tracecraft's own status resolution: every step complete, each run once
    check = ("import json; from tracecraft.store import get_store; from tracecraft.protocol import effective_status;"
             "s,_=get_store(); d=json.load(open('dag.json'));"
             "print(json.dumps({k: effective_status(s, k)[0] for k in d}))")
    p = subprocess.run([str(venv / "bin" / "python"), "-c", check], cwd=work, capture_output=True, text=True)
    statuses: dict[str, int] = {}
    try:
        for v in json.loads(p.stdout).values():
            statuses[v] = statuses.get(v, 0) + 1
    except ValueError:
        problems.append(f"status check failed: {p.stderr.strip()[-500:]}")
    if statuses.get("complete") != len(dag):
        problems.append(f"step statuses {statuses} (expected {len(dag)} complete)")
    if totals.get("steps_run") != len(dag):
        problems.append(f"workers ran {totals.get('steps_run')} steps (expected {len(dag)})")
    shutil.rmtree(work, ignore_errors=True)
    total = reqs.pop("total", 0)
    out: dict[str, Any] = {
        "label": label, "tool": f"tracecraft-ai {tracecraft_version(venv)}", "store": f"s3://{bucket}/bench",
        "steps": len(dag), "workers": a.workers, "step_statuses": statuses, "worker_counters": totals,
        **metrics(wall, len(dag), a.workers, bare, cpu),
        "requests": reqs, "requests_per_step": round(total / len(dag), 2),
        "requests_per_step_by_kind": {k: round(v / len(dag), 2) for k, v in sorted(reqs.items())},
        "cli_calls_per_step": round((totals.get("claim_calls", 0) + totals.get("complete_calls", 0)) / len(dag), 3),
        "cli_call_mean_ms": round(totals.get("cli_seconds", 0) * 1000
                                  / max(1, totals.get("claim_calls", 0) + totals.get("complete_calls", 0)), 1),
    }
    if problems:
        out["problems"] = problems
    return out


# -- report ----------------------------------------------------------------------------------
def table(rows: list[dict[str, Any]]) -> None:
    cols = [("configuration", 30), ("steps", 6), ("wall s", 8), ("wall/step ms", 13), ("overhead/step ms", 17),
            ("CPU/step ms", 12), ("steps/s", 8), ("req/step", 9), ("status", 12)]
    print("\n" + " ".join(f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, w) in enumerate(cols)))
    print("-" * (sum(w for _, w in cols) + len(cols) - 1))
    for r in rows:
        if "wall_s" not in r:
            print(f"{r['label']:<30} {'SKIPPED/FAILED: ' + (r.get('skipped') or r.get('error') or '?')}")
            continue
        if "run_status" in r:
            status = r["run_status"]
        else:
            done = r.get("step_statuses", {}).get("complete", 0)
            status = "complete" if done == r["steps"] else f"{done}/{r['steps']} done"
        if r.get("problems"):
            status += " (!)"
        req = f"{r['requests_per_step']:.2f}" if "requests_per_step" in r else "-"
        vals = [r["label"], str(r["steps"]), f"{r['wall_s']:.2f}", f"{r['wall_per_step_ms']:.2f}",
                f"{r['overhead_per_step_ms']:.2f}", f"{r['cpu_per_step_ms']:.2f}", f"{r['steps_per_s']:.1f}", req,
                status]
        print(" ".join(f"{v:>{w}}" if i else f"{v:<{w}}" for i, (v, (_, w)) in enumerate(zip(vals, cols, strict=True))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--layer", type=int, default=25, help="steps per DAG layer")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--poll-max", type=float, default=0.2, help="workers' longest idle poll interval")
    ap.add_argument("--bare-n", type=int, default=200, help="runs of `true` for the bare cost")
    ap.add_argument("--timeout", type=float, default=290.0, help="per configuration, seconds")
    ap.add_argument("--no-local", action="store_true")
    ap.add_argument("--no-s3", action="store_true", help="skip everything on the moto server")
    ap.add_argument("--tracecraft", dest="tracecraft", action="store_true", default=True,
                    help="also drive the DAG with tracecraft-ai (default)")
    ap.add_argument("--no-tracecraft", dest="tracecraft", action="store_false")
    ap.add_argument("--tc-steps", type=int, default=200,
                    help="steps of the DAG driven by tracecraft-ai (its CLI starts cost ~0.5 s each, so 500 "
                         "steps take ~7 min on 2 cores); when it differs from --steps, dagcraft also runs that "
                         "DAG on the moto server so the ratio compares the same DAG")
    ap.add_argument("--tc-venv", type=Path, default=Path("/tmp/tcvenv"))
    ap.add_argument("--no-tracecraft-install", action="store_true")
    ap.add_argument("--json-out", type=Path, default=BENCH / "results" / "orchestrator.json")
    a = ap.parse_args()

    dag = make_dag(a.steps, a.layer)
    tmp = Path(tempfile.mkdtemp(prefix="bench-orch-"))
    spec = tmp / "pipeline.yaml"
    spec.write_text(dag_spec(dag))
    bare = bare_true(a.bare_n)
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"DAG: {a.steps} steps `true`, layers of {a.layer}, each step after layer 0 needs 1 step of the "
          f"previous layer; {a.workers} worker processes, --poll-max {a.poll_max}")
    print(f"bare `subprocess.run(['true'])`: median {bare * 1000:.3f} ms over {a.bare_n} runs")

    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    if not a.no_local:
        rows.append(run_dagcraft("dagcraft / local store", str(tmp / "store"), spec, a.steps, a, bare, None))
    server = None
    tc_skip: str | None = None
    if a.no_s3:
        if a.tracecraft:
            tc_skip = "--no-s3 given (tracecraft-ai needs the S3 server)"
    else:
        server = MotoServer()
        print(f"moto server (lock-serialized, counting): {server.endpoint}")
    try:
        if server is not None:
            from dagcraft.primitives.url import s3_url

            url = s3_url(server.new_bucket("dc"), "bench", endpoint=server.endpoint)
            rows.append(run_dagcraft("dagcraft / moto S3", url, spec, a.steps, a, bare, server))
            if a.tracecraft:
                tc_n = min(a.tc_steps, a.steps)
                exe, why = ensure_tracecraft(a.tc_venv, not a.no_tracecraft_install)
                if exe is None:
                    tc_skip = why
                else:
                    if tc_n != a.steps:
                        tc_dag = make_dag(tc_n, a.layer)
                        tc_spec = tmp / "pipeline-tc.yaml"
                        tc_spec.write_text(dag_spec(tc_dag))
                        url = s3_url(server.new_bucket("dc"), "bench", endpoint=server.endpoint)
                        rows.append(run_dagcraft(f"dagcraft / moto S3 ({tc_n})", url, tc_spec, tc_n, a, bare,
                                                 server))
                    else:
                        tc_dag = dag
                    rows.append(run_tracecraft(exe, a.tc_venv, tc_dag, a, bare, server))
    finally:
        if server is not None:
            server.close()
        shutil.rmtree(tmp, ignore_errors=True)
    if a.tracecraft and tc_skip:
        rows.append({"label": "tracecraft-ai / moto S3", "skipped": tc_skip})

    table(rows)
    by = {r["label"]: r for r in rows}
    tc = by.get("tracecraft-ai / moto S3", {})
    dc = next((r for r in rows if r.get("tool") == "dagcraft" and r["label"].startswith("dagcraft / moto S3")
               and r.get("steps") == tc.get("steps")), {})
    ratio = None
    if "wall_s" in dc and "wall_s" in tc and not tc.get("problems") and not dc.get("problems"):
        ratio = {"steps": tc["steps"], "wall": round(dc["wall_s"] / tc["wall_s"], 4),
                 "overhead_per_step": round(dc["overhead_per_step_ms"] / tc["overhead_per_step_ms"], 4),
                 "cpu_per_step": round(dc["cpu_per_step_ms"] / tc["cpu_per_step_ms"], 4),
                 "requests_per_step": round(dc["requests_per_step"] / tc["requests_per_step"], 4)}
        print(f"\ndagcraft / tracecraft-ai, same {tc['steps']}-step DAG, same moto server, {a.workers} workers:\n"
              f"  wall {dc['wall_s']:.2f} s / {tc['wall_s']:.2f} s = {ratio['wall']:.3f} "
              f"(tracecraft-ai takes {1 / ratio['wall']:.1f}x as long)\n"
              f"  overhead/step {dc['overhead_per_step_ms']:.1f} / {tc['overhead_per_step_ms']:.1f} ms = "
              f"{ratio['overhead_per_step']:.3f}; CPU/step {dc['cpu_per_step_ms']:.1f} / {tc['cpu_per_step_ms']:.1f} ms"
              f" = {ratio['cpu_per_step']:.3f}; requests/step {dc['requests_per_step']:.2f} / "
              f"{tc['requests_per_step']:.2f} = {ratio['requests_per_step']:.3f}")
    elif a.tracecraft:
        why = tc_skip or tc.get("skipped") or ("; ".join(tc.get("problems", []) + dc.get("problems", []))
                                               or "no result")
        print(f"\ntracecraft-ai comparison SKIPPED or INVALID: {why}")
    loc = by.get("dagcraft / local store", {})
    if "overhead_per_step_ms" in loc:
        ok = loc["wall_overhead_per_step_ms"] < TARGET_LOCAL_MS
        print(f"local-store overhead/step, (wall - steps x bare_true) / steps: {loc['wall_overhead_per_step_ms']:.2f} ms "
              f"vs target < {TARGET_LOCAL_MS:g} ms: {'MET' if ok else 'NOT MET'}")
        print(f"local-store overhead/step in worker-time, (wall x workers - steps x bare_true) / steps: "
              f"{loc['overhead_per_step_ms']:.2f} ms (4 workers share 2 cores, so this counts each core ~twice)")
    for r in rows:
        for k in ("claim_to_commit_median_ms",):
            if k in r:
                print(f"{r['label']}: claim→commit per step (store clock, includes the command) median "
                      f"{r['claim_to_commit_median_ms']} ms, p90 {r['claim_to_commit_p90_ms']} ms; submit "
                      f"{r['submit_s']} s")
        if "requests_per_step_by_kind" in r:
            print(f"{r['label']}: requests/step by kind {json.dumps(r['requests_per_step_by_kind'])}")
        if "worker_counters" in r:
            wc = r["worker_counters"]
            print(f"{r['label']}: CLI calls/step {r['cli_calls_per_step']}, mean CLI call {r['cli_call_mean_ms']} ms, "
                  f"claim conflicts {int(wc.get('claim_conflicts', 0))}, LISTs {int(wc.get('lists', 0))}")
        for prob in r.get("problems", []):
            print(f"PROBLEM [{r['label']}]: {prob}")
            notes.append(f"{r['label']}: {prob}")
        for e in r.get("stderr", []):
            print(f"NOTE [{r['label']}]: {e}")
    print("\nDefinitions:\n"
          "  wall          = worker processes started -> all exited (run succeeded / all steps complete)\n"
          f"  overhead/step = (wall x workers - steps x bare_true) / steps, worker-ms per step not spent in the "
          f"command (bare_true = {bare * 1000:.3f} ms)\n"
          "  wall/step     = wall / steps (throughput view)\n"
          "  CPU/step      = user+sys CPU of the worker processes and everything they ran (commands, CLI calls) / "
          "steps\n"
          "  req/step      = HTTP requests the moto server received during the wall time / steps")

    a.json_out.parent.mkdir(parents=True, exist_ok=True)
    a.json_out.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": platform.platform(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "steps": a.steps, "layer": a.layer, "workers": a.workers,
        "poll_max": a.poll_max, "bare_true_ms": round(bare * 1000, 4), "target_local_overhead_ms": TARGET_LOCAL_MS,
        "results": rows, "ratio_dagcraft_over_tracecraft": ratio, "tracecraft_skipped": tc_skip, "problems": notes,
        "definitions": {
            "wall_s": "worker processes started -> all exited, run finished",
            "overhead_per_step_ms": "(wall * workers - steps * bare_true) / steps: worker-ms per step not spent "
                                    "in the command itself",
            "wall_per_step_ms": "wall / steps",
            "cpu_per_step_ms": "user+sys CPU of the worker processes and their descendants / steps",
            "requests_per_step": "HTTP requests received by the moto server during the wall time / steps",
            "claim_to_commit": "finished_at - started_at of each step state (store clock): claim to commit, "
                               "includes the command",
        },
    }, indent=2, default=str))
    print(f"\nJSON: {a.json_out}")


if __name__ == "__main__":
    main()
