"""Compensation: a succeeded step's ``rollback`` command, run when its run rolls back.

Order: a step's compensation becomes claimable only when no step downstream of it still has
a compensation to run, so compensations run in reverse topological order. Each is claimed by
CAS (succeeded → rolling_back with a lease) and committed by CAS (→ rolled_back), so it
commits exactly once; a worker that dies mid-compensation loses its lease and the
compensation is claimed again (at-least-once execution, exactly-once commit).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from dagcraft.errors import DagcraftError
from dagcraft.orchestrator import layout
from dagcraft.orchestrator.attempt import StateWriter, WorkerConfig
from dagcraft.orchestrator.model import AttemptInfo, StepState
from dagcraft.tracing import Redactor, TraceWriter, traced_exec
from dagcraft.workflows import CompiledWorkflow, ConcreteStep, RenderContext, render_rollback


def compensation_ready(view: Any, sid: str, deps: dict[str, set[str]]) -> bool:
    """True when ``sid`` succeeded, has a rollback command, and nothing downstream of it is
    still waiting to be (or being) compensated."""
    if view.status(sid) != "succeeded" or not view.steps[sid].rollback:
        return False
    for d in view.descendants(sid, deps):
        if view.steps[d].rollback and view.status(d) in ("succeeded", "rolling_back"):
            return False
    return True


class Compensation:
    def __init__(self, cfg: WorkerConfig, *, run_id: str, run_name: str, spec_dir: str | None,
                 wf: CompiledWorkflow, step: ConcreteStep, state: StepState, etag: str,
                 steps_ctx: dict[str, Any], on_change: Any) -> None:
        self.cfg = cfg
        self.run_id = run_id
        self.run_name = run_name
        self.spec_dir = spec_dir
        self.wf = wf
        self.step = step
        self.writer = StateWriter(cfg.store, run_id, state, etag)
        self.steps_ctx = steps_ctx
        self.on_change = on_change
        self.n = state.rollback.attempt if state.rollback else 1
        self.cancel = threading.Event()
        self.dir = cfg.tmp_root / run_id / step.id / f"rollback-{self.n}"

    def request_cancel(self, reason: str) -> None:
        self.cancel.set()

    def run(self) -> StepState:
        started = self.cfg.store.now()
        self.dir.mkdir(parents=True, exist_ok=True)
        trace_path = self.dir / "trace.jsonl"
        trace_path.unlink(missing_ok=True)
        trace = TraceWriter(trace_path, self.run_id, redactor=Redactor(self.wf.secret_values()), fsync=False)
        trace.append("run.started", {"run": self.run_id, "step": self.step.id, "rollback_attempt": self.n,
                                     "worker": self.cfg.worker_id})
        trace.append("rollback.started", {"step": self.step.id, "attempt": self.n})
        ok = False
        exit_code = None
        try:
            ctx = RenderContext(params=self.wf.params,
                                run={"id": self.run_id, "name": self.run_name, "spec_dir": self.spec_dir or ""},
                                steps=self.steps_ctx, matrix=self.step.matrix, item=getattr(self.step, "item", None),
                                env=dict(os.environ))
            cmd = render_rollback(self.wf, self.step, ctx)
            if cmd is None:
                ok = True
            else:
                workdir = Path(self.step.workdir) if self.step.workdir and Path(self.step.workdir).is_absolute() \
                    else (Path(self.spec_dir or ".") / self.step.workdir if self.step.workdir else self.dir)
                env = dict(os.environ)
                env.update(cmd.env)
                env.update({"DAGCRAFT_STORE": self.cfg.store_url, "DAGCRAFT_RUN_ID": self.run_id,
                            "DAGCRAFT_STEP": self.step.id, "DAGCRAFT_ROLLBACK": "1",
                            "DAGCRAFT_TRACE": str(trace_path)})
                res = traced_exec(cmd.argv, writer=trace, env=env, cwd=workdir,
                                  stdout_log=self.dir / "stdout.log", stderr_log=self.dir / "stderr.log",
                                  timeout=self.step.timeout_s, cancel=self.cancel, grace=self.cfg.grace)
                exit_code = res.exit_code
                ok = res.exit_code == 0 and not res.timed_out and not res.cancelled
        except DagcraftError as exc:
            trace.append("error", {"step": self.step.id, "message": str(exc)})
        now = self.cfg.store.now()

        def mutate(s: StepState) -> None:
            s.status = "rolled_back" if ok else "succeeded"
            if s.rollback is not None:
                s.rollback.status = "done" if ok else "failed"
                s.rollback.worker = None
                s.rollback.lease_expires_at = None
                s.rollback.exit_code = exit_code
            if not ok:
                s.status = "rolled_back"  # a failed compensation is not retried; the run reports it
            s.history.append(AttemptInfo(attempt=self.n, status="succeeded" if ok else "failed", kind="rollback",
                                         worker=self.cfg.worker_id, started_at=started, finished_at=now,
                                         exit_code=exit_code))

        committed = self.writer.write(mutate)
        if committed:
            self.on_change(self.writer.state, self.writer.etag, self.writer.last_key)
        else:
            trace.append("step.fenced", {"step": self.step.id, "rollback_attempt": self.n})
        trace.append("rollback.finished", {"step": self.step.id, "success": ok, "exit_code": exit_code})
        trace.append("run.finished", {"status": "rolled_back" if ok else "rollback_failed", "step": self.step.id})
        trace.close()
        prefix = layout.attempt_prefix(self.run_id, self.step.id, f"rollback-{self.n}")
        for name in ("trace.jsonl", "stdout.log", "stderr.log"):
            p = self.dir / name
            if p.exists():
                try:
                    self.cfg.store.put_file(f"{prefix}/{name}", p)
                except DagcraftError:
                    pass
        return self.writer.state
