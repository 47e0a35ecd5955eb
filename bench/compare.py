"""Side by side: dagcraft against GNU make, Snakemake, Luigi and Prefect on the same DAG.

    python bench/compare.py [--rounds 3] [--steps 500] [--jobs 4] [--out docs/benchmarks.md]
                            [--chart docs/img/benchmarks.png] [--tools make,luigi,...]

What it does, in order:

1. Tools. GNU make from the system (``apt-get install -y make`` when missing and run as root;
   otherwise it stops and says so). Snakemake, Luigi and Prefect each in their own venv under
   ``--venvs`` (default ``~/.cache/dagcraft-bench/venvs/<tool>``), pip-installed from the
   configured index when the venv is missing or cannot import the tool, reused otherwise;
   matplotlib likewise in ``<venvs>/plot`` (it is never a dagcraft dependency). dagcraft is the one
   installed in the interpreter running this script (its ``dagcraft`` console script), so the
   numbers are those of whatever checkout that venv was installed from.
2. The DAG (``bench_orchestrator.make_dag``, the one the orchestrator bench uses): ``--steps``
   steps in layers of ``--layer`` (25); every step after the first layer needs exactly one step of
   the previous layer, step j of layer L needing step (7j+3) mod 25 of layer L-1 (a permutation,
   so the chains cross). 500 steps = 20 layers of 25, 475 edges.
3. Two workloads: every step runs ``/bin/sh -c '<work> && : > MARKERS/<id>'`` with work ``true``
   and ``sleep 0.05`` (Snakemake runs the same line through its ``shell:``, which is bash). The
   marker is written by the step's own command, so each tool's run is checked afterwards: exit 0
   and exactly the expected ``--steps`` marker files, else the run counts as failed.
4. Each tool with ``--jobs`` (4) parallel jobs: ``make -jN``, ``snakemake --cores N``, Luigi
   ``workers=N`` with the local scheduler, Prefect's ``ThreadPoolTaskRunner(max_workers=N)``
   (each task runs the command via ``subprocess``), ``dagcraft run --workers N --no-report`` on a
   fresh local store (a new temp directory per run). Default output of each tool, to a log file.
5. One untimed warm-up run per tool (``true``, one layer) (page cache, .pyc files, Prefect's
   database), then ``--rounds`` interleaved rounds: round r runs every tool once per workload,
   the tool order rotated by r. Wall time is from process start to exit (start-up included: it is
   what a user waits for).
6. Medians per tool and workload, ratios to make and to dagcraft, written as a Markdown block
   between ``<!-- compare:begin -->`` and ``<!-- compare:end -->`` in ``--out`` (the rest of the
   file is left as it is), a PNG bar chart at ``--chart``, and every raw number in
   ``bench/results/compare.json``; all three after every complete round, so an interrupted
   bench leaves its finished rounds. ``--report-only`` re-renders the block and chart from the JSON.

The bench is not part of the test suite. Exit 0 when every run of every tool succeeded, 1 if
any failed (the table then says which).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
HELPERS = BENCH / "compare"
sys.path.insert(0, str(BENCH))

from bench_orchestrator import make_dag  # noqa: E402  (the one DAG generator of the benches)

TOOLS = ("make", "snakemake", "luigi", "prefect", "dagcraft")
WORKLOADS = {"true": "true", "sleep": "sleep 0.05"}
BEGIN, END = "<!-- compare:begin -->", "<!-- compare:end -->"
# venv name -> (pip requirement, module to import as the "is it installed" check, dist for the version)
VENV_PACKAGES = {
    "snakemake": ("snakemake", "snakemake", "snakemake"),
    "luigi": ("luigi", "luigi", "luigi"),
    "prefect": ("prefect", "prefect", "prefect"),
    "plot": ("matplotlib", "matplotlib", "matplotlib"),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- tools -----------------------------------------------------------------------------------
def ensure_make() -> str:
    """Path of GNU make; installs Debian's ``make`` with apt-get when missing and we are root."""
    found = shutil.which("make")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        log("make not found: apt-get install -y make")
        subprocess.run(["apt-get", "install", "-y", "-q", "make"], check=False,
                       stdout=subprocess.DEVNULL)
        found = shutil.which("make")
    if found is None:
        raise SystemExit("compare: GNU make not found; install it (Debian: apt-get install -y make)")
    return found


def venv_python(venvs: Path, name: str) -> Path:
    return venvs / name / "bin" / "python"


def ensure_venv(venvs: Path, name: str) -> Path:
    """The venv ``venvs/name`` with its package importable: reused when it is, else (re)created
    and pip-installed from the configured index. Returns its python."""
    req, module, _ = VENV_PACKAGES[name]
    py = venv_python(venvs, name)
    if py.exists() and subprocess.run([str(py), "-c", f"import {module}"],
                                      capture_output=True).returncode == 0:
        return py
    log(f"installing {req} into {venvs / name}")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venvs / name)], check=True)
    p = subprocess.run([str(py), "-m", "pip", "install", "-q", req], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"compare: pip install {req} into {venvs / name} failed:\n{p.stderr[-2000:]}")
    return py


def dist_version(py: Path, dist: str) -> str:
    p = subprocess.run([str(py), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
                       capture_output=True, text=True)
    return p.stdout.strip() or "?"


def dagcraft_cli() -> list[str]:
    script = Path(sys.executable).parent / "dagcraft"
    return [str(script)] if script.exists() else [sys.executable, "-m", "dagcraft.cli.main"]


def tool_versions(make: str, venvs: Path, tools: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    if "make" in tools:
        out["make"] = subprocess.run([make, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    for t in ("snakemake", "luigi", "prefect"):
        if t in tools:
            out[t] = dist_version(venv_python(venvs, t), t)
    if "dagcraft" in tools:
        ver = dist_version(Path(sys.executable), "dagcraft")
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "dagcraft"],
                               capture_output=True, text=True).stdout.strip()
        out["dagcraft"] = f"{ver} (git {rev}{', modified' if dirty else ''})" if rev else ver
    return out


# -- the DAG, once per tool ------------------------------------------------------------------
def step_commands(dag: dict[str, list[str]], work: str, markers: Path) -> dict[str, str]:
    """Step id -> the shell line every tool runs for it: the work, then the step's marker."""
    return {sid: f"{work} && : > {markers / sid}" for sid in dag}


def makefile(dag: dict[str, list[str]], work: str, markers: Path) -> str:
    """A Makefile whose targets are the marker files; prerequisites are the needs' markers."""
    lines = [".PHONY: all", "all: " + " ".join(str(markers / s) for s in dag), ""]
    for sid, needs in dag.items():
        lines.append(f"{markers / sid}: " + " ".join(str(markers / n) for n in needs))
        lines.append(f"\t{work} && : > $@")
    return "\n".join(lines) + "\n"


def snakefile(dag_json: Path, work: str) -> str:
    """One wildcard rule; its input function returns the needs' markers (read from DAG_JSON)."""
    return f'''import json
SPEC = json.load(open({str(dag_json)!r}))
M = SPEC["markers"]

rule all:
    input: [f"{{M}}/{{s}}" for s in SPEC["steps"]]

rule step:
    output: M + "/{{sid}}"
    input: lambda w: [f"{{M}}/{{n}}" for n in SPEC["steps"][w.sid]]
    shell: "{work} && : > {{output}}"
'''


def pipeline_yaml(dag: dict[str, list[str]], commands: dict[str, str]) -> str:
    lines = ["name: compare", "steps:"]
    for sid, needs in dag.items():
        lines.append(f"  - id: {sid}")
        if needs:
            lines.append(f"    needs: [{', '.join(needs)}]")
        lines.append(f"    run: [/bin/sh, -c, {json.dumps(commands[sid])}]")
    return "\n".join(lines) + "\n"


@dataclass
class Prepared:
    argv: list[str]
    cwd: Path
    markers: Path
    env: dict[str, str] = field(default_factory=dict)


def prepare(tool: str, dag: dict[str, list[str]], work: str, jobs: int, base: Path, make: str,
            venvs: Path) -> Prepared:
    """Write TOOL's files for DAG under the fresh directory BASE; return how to run it."""
    markers = base / "markers"
    markers.mkdir(parents=True)
    commands = step_commands(dag, work, markers)
    dag_json = base / "dag.json"
    dag_json.write_text(json.dumps({"steps": dag, "commands": commands, "markers": str(markers)}))
    if tool == "make":
        (base / "Makefile").write_text(makefile(dag, work, markers))
        return Prepared([make, f"-j{jobs}", "-f", str(base / "Makefile"), "all"], base, markers)
    if tool == "snakemake":
        (base / "Snakefile").write_text(snakefile(dag_json, work))
        exe = venvs / "snakemake" / "bin" / "snakemake"
        return Prepared([str(exe), "--cores", str(jobs), "--snakefile", str(base / "Snakefile"),
                         "--directory", str(base)], base, markers)
    if tool == "luigi":
        return Prepared([str(venv_python(venvs, "luigi")), str(HELPERS / "run_luigi.py"), str(dag_json),
                         str(jobs)], base, markers)
    if tool == "prefect":
        # a persistent PREFECT_HOME (its SQLite database created by the warm-up), as a user has
        home = venvs.parent / "prefect-home"
        # the ephemeral server's 20 s start-up timeout is too short for a loaded machine (the first
        # start also migrates the database): a slow start is measured, not turned into a failure
        env = {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "DO_NOT_TRACK": "1", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600"}
        return Prepared([str(venv_python(venvs, "prefect")), str(HELPERS / "run_prefect.py"),
                         str(dag_json), str(jobs)], base, markers, env)
    if tool == "dagcraft":
        (base / "pipeline.yaml").write_text(pipeline_yaml(dag, commands))
        return Prepared([*dagcraft_cli(), "run", str(base / "pipeline.yaml"), "--workers", str(jobs),
                         "--store", str(base / "store"), "--no-report"], base, markers)
    raise ValueError(tool)


# -- running ---------------------------------------------------------------------------------
def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DAGCRAFT_", "PREFECT_", "SNAKEMAKE_", "LUIGI_"))
           and k not in ("VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE", "PYTHONPATH")}
    return env


def run_once(tool: str, dag: dict[str, list[str]], work: str, jobs: int, make: str, venvs: Path,
             scratch: Path, timeout: float) -> dict[str, Any]:
    """One timed run of TOOL; ``ok`` only if it exited 0 and wrote exactly every step's marker."""
    base = Path(tempfile.mkdtemp(prefix=f"{tool}-", dir=scratch))
    prep = prepare(tool, dag, work, jobs, base, make, venvs)
    logfile = base / "output.log"
    with open(logfile, "wb") as out:
        t0 = time.perf_counter()
        p = subprocess.Popen(prep.argv, cwd=prep.cwd, env={**clean_env(), **prep.env}, stdout=out,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc: int | None = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        except BaseException:  # interrupted: take the tool's whole process group down with us
            os.killpg(p.pid, 9)
            raise
        finally:
            if p.returncode is None:
                os.killpg(p.pid, 9)
                p.wait()
        wall = time.perf_counter() - t0
    done = {m.name for m in prep.markers.iterdir()}
    missing = len(set(dag) - done)
    extra = len(done - set(dag))
    ok = rc == 0 and missing == 0 and extra == 0
    res: dict[str, Any] = {"tool": tool, "wall_s": round(wall, 3), "rc": rc, "markers": len(done), "ok": ok}
    # a run's files are not removed here but with ``scratch`` after the last round: on ext4
    # without a journal, removing thousands of files makes every file created in the next minutes
    # (by whichever tool runs next) scan the recently freed inodes
    if not ok:
        res["log"] = str(logfile)
        tail = logfile.read_text(errors="replace").strip().splitlines()[-5:]
        res["error"] = (f"timeout after {timeout:.0f} s" if rc is None else f"exit {rc}") + \
            f", {len(done)}/{len(dag)} markers; log {logfile}: " + " | ".join(tail)[-400:]
    return res


def rotated(tools: Sequence[str], r: int) -> list[str]:
    k = r % len(tools)
    return [*tools[k:], *tools[:k]]


# -- report ----------------------------------------------------------------------------------
def summarise(runs: list[dict[str, Any]], tools: Sequence[str]) -> dict[str, dict[str, Any]]:
    """workload -> tool -> {median, min, max, n, failed}."""
    out: dict[str, dict[str, Any]] = {}
    for wl in WORKLOADS:
        out[wl] = {}
        for t in tools:
            rs = [r for r in runs if r["workload"] == wl and r["tool"] == t]
            walls = [r["wall_s"] for r in rs if r["ok"]]
            out[wl][t] = {"median": round(statistics.median(walls), 3) if walls else None,
                          "min": min(walls, default=None), "max": max(walls, default=None),
                          "n": len(walls), "failed": len(rs) - len(walls)}
    return out


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a is not None and b else "–"


def markdown(summary: dict[str, dict[str, Any]], tools: Sequence[str], meta: dict[str, Any],
             chart_rel: str | None) -> str:
    wl_names = {"true": "`true`", "sleep": "`sleep 0.05`"}
    order = sorted(tools, key=lambda t: (summary["true"][t]["median"] is None, summary["true"][t]["median"] or 0))
    head = ["tool"]
    for wl in WORKLOADS:
        head += [f"{wl_names[wl]} median", "vs make", "vs dagcraft"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in order:
        cells = [t]
        for wl in WORKLOADS:
            s = summary[wl][t]
            med = "failed" if s["median"] is None else f"{s['median']:.2f} s"
            if s["failed"] and s["median"] is not None:
                med += f" ({s['failed']} failed)"
            cells += [med, ratio(s["median"], summary[wl].get("make", {}).get("median")),
                      ratio(s["median"], summary[wl].get("dagcraft", {}).get("median"))]
        rows.append("| " + " | ".join(cells) + " |")
    load = meta["loadavg_start"], meta["loadavg_end"]
    early = "" if meta["rounds_done"] == meta["rounds"] else f" (of {meta['rounds']} asked; stopped early)"
    lines = [
        BEGIN,
        f"Measured {meta['date']} with `{meta['command']}`.",
        "",
        f"Machine: {meta['cores']} cores, {meta['platform']}, Python {meta['python']}; "
        f"{meta['steps']} steps, {meta['jobs']} parallel jobs, medians of {meta['rounds_done']} interleaved "
        f"round(s){early}. Load average (1 min) {load[0]:.1f} at the start, {load[1]:.1f} at the end.",
    ]
    # the start is what other work left; by the end the bench's own runs (4 jobs on every tool)
    # have raised the 1-minute average themselves
    if load[0] > meta["cores"]:
        lines += ["", f"**Taken under load**: the machine was shared with other work (load average above "
                  f"its {meta['cores']} cores), so absolute times are inflated and noisier than on an idle "
                  "machine, and the load shifts the ratios too: compare only within one run."]
    lines += ["", "Versions: " + "; ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".", "", *rows]
    if chart_rel:
        lines += ["", f"![Side-by-side wall times (medians; bars span min to max)]({chart_rel})"]
    lines.append(END)
    return "\n".join(lines) + "\n"


DOC_SKELETON = """# Benchmarks

## Side by side

{block}
"""


def write_doc(path: Path, block: str) -> None:
    """Replace the text between the markers in PATH (create the file/section if absent)."""
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        pre, rest = text.split(BEGIN, 1)
        post = rest.split(END, 1)[1]
        text = pre + block.rstrip("\n") + post
    elif text:
        text = text.rstrip("\n") + "\n\n## Side by side\n\n" + block
    else:
        text = DOC_SKELETON.format(block=block.rstrip("\n"))
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# -- main ------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--layer", type=int, default=25)
    ap.add_argument("--jobs", type=int, default=4, help="parallel jobs/workers of every tool")
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset of " + ",".join(TOOLS))
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--chart", type=Path, default=ROOT / "docs" / "img" / "benchmarks.png")
    ap.add_argument("--json", type=Path, default=BENCH / "results" / "compare.json")
    ap.add_argument("--venvs", type=Path, default=Path.home() / ".cache" / "dagcraft-bench" / "venvs")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds before one run counts as failed")
    ap.add_argument("--report-only", action="store_true",
                    help="re-write the doc block and chart from --json without running anything")
    a = ap.parse_args(argv)
    tools = [t.strip() for t in a.tools.split(",") if t.strip()]
    bad = [t for t in tools if t not in TOOLS]
    if bad or not tools:
        ap.error(f"--tools: unknown {', '.join(bad)} (choose from {', '.join(TOOLS)})")
    command = "python bench/compare.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if a.report_only:
        saved = json.loads(a.json.read_text())
        report(a, list(saved["meta"]["versions"]), saved["meta"], saved["runs"],
               ensure_venv(a.venvs, "plot"), keep_load=True)
        return 0

    make = ensure_make() if "make" in tools else "make"
    a.venvs.mkdir(parents=True, exist_ok=True)
    for t in ("snakemake", "luigi", "prefect"):
        if t in tools:
            ensure_venv(a.venvs, t)
    plot_py = ensure_venv(a.venvs, "plot")
    versions = tool_versions(make, a.venvs, tools)
    log("versions: " + "; ".join(f"{k} {v}" for k, v in versions.items()))

    dag = make_dag(a.steps, a.layer)
    warm = make_dag(min(a.layer, a.steps), a.layer)
    scratch = Path(tempfile.mkdtemp(prefix="dagcraft-compare-"))
    meta: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": command.strip(),
        "cores": os.cpu_count(), "platform": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(), "steps": a.steps, "layer": a.layer, "jobs": a.jobs,
        "rounds": a.rounds, "versions": versions, "loadavg_start": os.getloadavg()[0],
    }
    runs: list[dict[str, Any]] = []
    for t in tools:
        r = run_once(t, warm, WORKLOADS["true"], a.jobs, make, a.venvs, scratch, a.timeout)
        log(f"warm-up {t:9} {r['wall_s']:7.2f} s {'ok' if r['ok'] else r['error']}")
    try:
        for rnd in range(a.rounds):
            for wl, work in WORKLOADS.items():
                for t in rotated(tools, rnd):
                    r = run_once(t, dag, work, a.jobs, make, a.venvs, scratch, a.timeout)
                    r.update(round=rnd, workload=wl)
                    runs.append(r)
                    log(f"round {rnd} {t:9} {wl:5} {r['wall_s']:7.2f} s {'ok' if r['ok'] else r['error']}")
            # after every complete round, so an interrupted bench still leaves its finished rounds
            meta["rounds_done"] = rnd + 1
            report(a, tools, meta, runs, plot_py)
    except KeyboardInterrupt:
        log(f"interrupted: the report keeps the {meta.get('rounds_done', 0)} complete round(s)")
        return 130
    if all(r["ok"] for r in runs):
        shutil.rmtree(scratch, ignore_errors=True)
    return 0 if runs and all(r["ok"] for r in runs) else 1


def report(a: argparse.Namespace, tools: Sequence[str], meta: dict[str, Any], runs: list[dict[str, Any]],
           plot_py: Path, keep_load: bool = False) -> None:
    """Write the JSON, the chart and the Markdown block for the runs so far."""
    if not keep_load:
        meta["loadavg_end"] = os.getloadavg()[0]
    summary = summarise(runs, tools)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1))
    chart_rel: str | None = None
    a.chart.parent.mkdir(parents=True, exist_ok=True)
    p = subprocess.run([str(plot_py), str(HELPERS / "plot.py"), str(a.json), str(a.chart)],
                       capture_output=True, text=True)
    if p.returncode == 0:
        chart_rel = os.path.relpath(a.chart.resolve(), a.out.resolve().parent)
    else:
        log(f"chart not written: {p.stderr.strip()[-500:]}")
    block = markdown(summary, tools, meta, chart_rel)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_doc(a.out, block)
    print(block, flush=True)


if __name__ == "__main__":
    sys.exit(main())
