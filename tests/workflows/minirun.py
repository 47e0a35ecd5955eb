"""A tiny sequential stand-in for the run engine, used only to prove the examples really run.

It follows the run-time contract the examples rely on: a fresh scratch cwd per step, inputs
materialised into it, outputs read from ``$DAGCRAFT_OUTPUT`` (JSON object or ``key=value``
lines), artifacts collected by glob, foreach expanded when reached, ``when`` evaluated, and on
failure with ``on_failure: rollback`` compensations of succeeded steps run in reverse order.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from dagcraft.workflows import (
    CompiledWorkflow,
    RenderContext,
    evaluate_foreach,
    evaluate_when,
    expand_foreach,
    render_command,
    render_rollback,
)


def read_outputs(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    text = path.read_text()
    if text.lstrip().startswith("{"):
        return json.loads(text)
    out = {}
    for line in text.splitlines():
        if "=" in line:
            k, _, v = line.partition("=")
            out[k.strip()] = v
    return out


def run_workflow(wf: CompiledWorkflow, root: Path, env_extra: dict[str, str] | None = None) -> dict[str, Any]:
    run_id = "testrun"
    status: dict[str, str] = {}
    results: dict[str, dict[str, Any]] = {}  # concrete id -> {"outputs", "artifacts"}
    stdout: dict[str, str] = {}
    done_ok: list[Any] = []
    rollbacks: list[str] = []
    failed = False

    def ctx_for() -> RenderContext:
        steps: dict[str, dict[str, Any]] = {}
        for sid, st in wf.steps.items():
            if st.matrix or st.foreach:
                tid = st.template_id
                ids = [c for c in results if c.startswith(tid + "[")]
                steps[tid] = {"outputs": [results[c]["outputs"] for c in ids], "artifacts": {},
                              "status": status.get(tid if st.foreach else sid, "pending")}
            else:
                steps[sid] = {"outputs": results.get(sid, {}).get("outputs", {}),
                              "artifacts": results.get(sid, {}).get("artifacts", {}),
                              "status": status.get(sid, "pending")}
        return RenderContext(params=wf.params, run={"id": run_id, "name": wf.name}, steps=steps)

    def execute(step, attempt_env) -> bool:
        cwd = root / step.id.replace("[", "_").replace("]", "_")
        cwd.mkdir(parents=True)
        for inp in step.inputs:
            src = results[inp.step]["artifacts"][inp.artifact]
            dest = cwd / inp.dest
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dest)
        cmd = render_command(wf, step, ctx_for())
        out_file = cwd.parent / (cwd.name + ".outputs")
        env = {**os.environ, **cmd.env, **attempt_env, "DAGCRAFT_OUTPUT": str(out_file), "DAGCRAFT_RUN_ID": run_id,
               "DAGCRAFT_STEP": step.id, "DAGCRAFT_ATTEMPT": "1"}
        proc = subprocess.run(cmd.argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=20)
        stdout[step.id] = proc.stdout + proc.stderr
        if proc.returncode != 0:
            return False
        arts = {}
        for pattern in step.outputs_artifacts:
            for f in glob.glob(str(cwd / pattern)):
                arts[os.path.relpath(f, cwd)] = f
        results[step.id] = {"outputs": read_outputs(out_file), "artifacts": arts}
        return True

    for sid, step in wf.steps.items():
        needs_status = {n: status[n] for n in step.needs}
        if failed and not step.is_finally and wf.on_failure != "continue":
            status[sid] = "cancelled"
            continue
        if not evaluate_when(step, ctx_for(), needs_status):
            status[sid] = "skipped"
            continue
        children = [step]
        if step.foreach:
            children = expand_foreach(step, evaluate_foreach(step, ctx_for()))
        ok = True
        for child in children:
            child_ok = execute(child, env_extra or {})
            status[child.id] = "succeeded" if child_ok else "failed"
            if child_ok:
                done_ok.append(child)
            ok = ok and child_ok
        status[sid] = "succeeded" if ok else "failed"
        if not ok and not step.is_finally:
            failed = True
            if wf.on_failure == "rollback":
                for prev in reversed(done_ok):
                    rb = render_rollback(wf, prev, ctx_for())
                    if rb is not None:
                        env = {**os.environ, **rb.env, "DAGCRAFT_RUN_ID": run_id}
                        p = subprocess.run(rb.argv, env=env, capture_output=True, text=True, timeout=20)
                        rollbacks.append(f"{prev.id}: {p.returncode}: {p.stdout.strip()}")
    return {"status": status, "results": results, "stdout": stdout, "rollbacks": rollbacks}
