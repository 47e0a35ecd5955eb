"""Running one claimed step attempt: heartbeat, traced exec, outputs, artifacts, fenced commit.

Guarantees:
- The step's state record is changed only by CAS on the etag this attempt last wrote, so once
  the supervisor has taken the lease over (or the run was reset), every later write of this
  attempt — heartbeat or commit — fails: a fenced attempt can never commit its result. The
  refusal is recorded in the attempt's trace as ``step.fenced``.
- When a heartbeat finds the lease lost, the child's whole process group is killed.
- The attempt's trace and logs are uploaded under ``attempts/<n>/`` even when fenced: attempt
  numbers are unique per step, so no other worker ever writes there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dagcraft.errors import Conflict, DagcraftError, StoreUnavailable
from dagcraft.orchestrator import journal, layout
from dagcraft.orchestrator.model import AttemptInfo, StepState
from dagcraft.orchestrator.retry import backoff_delay, should_retry
from dagcraft.primitives import artifacts
from dagcraft.primitives.keys import validate_relpath
from dagcraft.primitives.store import Store
from dagcraft.tracing import Redactor, TraceWriter, traced_exec
from dagcraft.workflows import CompiledWorkflow, ConcreteStep, RenderContext, render_command

GLOB_CHARS = set("*?[")


@dataclass
class WorkerConfig:
    store: Store
    store_url: str
    worker_id: str
    lease_ttl: float = 30.0
    tmp_root: Path = field(default_factory=lambda: Path(os.environ.get("TMPDIR", "/tmp")) / "dagcraft")
    echo: bool = False
    grace: float = 5.0

    @property
    def heartbeat_s(self) -> float:
        return self.lease_ttl / 3.0


@dataclass
class Claimed:
    """Everything the attempt needs, captured by the scheduler at claim time."""

    run_id: str
    run_name: str
    spec_dir: str | None
    wf: CompiledWorkflow
    step: ConcreteStep
    state: StepState
    etag: str
    steps_ctx: dict[str, dict[str, Any]]
    #: concrete step id -> artifact name -> pointer, for the transitive needs
    upstream_artifacts: dict[str, dict[str, dict[str, Any]]]
    #: template id -> concrete ids (fan-out templates have several)
    instances: dict[str, list[str]]
    semaphore_leases: list[Any] = field(default_factory=list)
    semaphores: list[Any] = field(default_factory=list)


class StateWriter:
    """CAS writes of one step's state by the holder of its current attempt."""

    def __init__(self, store: Store, run_id: str, state: StepState, etag: str) -> None:
        self.store = store
        self.run_id = run_id
        self.state = state
        self.etag = etag
        self.lock = threading.Lock()
        self.last_key: str | None = None

    def write(self, mutate: Callable[[StepState], None], *, notify: bool = True) -> bool:
        """Apply ``mutate`` to a copy and CAS it in; False when fenced (etag moved on)."""
        with self.lock:
            new = self.state.model_copy(deep=True)
            mutate(new)
            new.rev = self.state.rev + 1
            try:
                etag = self.store.put(layout.step_state(self.run_id, new.step_id), new.dump(), if_match=self.etag)
            except Conflict:
                return False
            self.state, self.etag = new, etag
        if notify:
            self.last_key = journal.append(self.store, self.run_id, new.step_id, new.rev, new.status)
        return True


def parse_outputs(path: Path) -> dict[str, Any]:
    """``$DAGCRAFT_OUTPUT``: a JSON object, or ``key=value`` lines (values parsed as JSON when
    they are JSON, e.g. ``count=3`` or ``items=["a","b"]``, else kept as strings)."""
    if not path.exists():
        return {}
    text = path.read_text("utf-8", "replace").strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            data = json.loads(text)
            if isinstance(data, dict):
                return data
        except json.JSONDecodeError:
            pass
    out: dict[str, Any] = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def collect_artifacts(workdir: Path, patterns: list[str]) -> tuple[list[tuple[str, Path]], list[str]]:
    """Files in ``workdir`` matching the declared globs, as (name, path), and the literal names
    that are missing. Files resolving outside the workdir (symlinks) are never collected."""
    root = workdir.resolve()
    found: dict[str, Path] = {}
    missing: list[str] = []
    for pattern in patterns:
        validate_relpath(pattern.replace("*", "x").replace("?", "x"), "artifact pattern")
        matches = [p for p in sorted(workdir.glob(pattern)) if p.is_file()]
        if not matches and not (GLOB_CHARS & set(pattern)):
            missing.append(pattern)
        for p in matches:
            real = p.resolve()
            if root not in real.parents:
                continue
            found[p.relative_to(workdir).as_posix()] = p
    return sorted(found.items()), missing


class Attempt:
    """One attempt of one step, run on a worker thread."""

    def __init__(self, cfg: WorkerConfig, claimed: Claimed, *, on_change: Callable[[StepState, str, str | None], None]) -> None:
        self.cfg = cfg
        self.c = claimed
        self.store = cfg.store
        self.on_change = on_change
        self.writer = StateWriter(cfg.store, claimed.run_id, claimed.state, claimed.etag)
        self.n = claimed.state.attempt
        self.cancel = threading.Event()  # set: kill the child (lease lost, run cancelled, hand back)
        self.cancel_reason: str | None = None
        self.lost = threading.Event()
        self._stop_hb = threading.Event()
        self.dir = cfg.tmp_root / claimed.run_id / claimed.step.id / str(self.n)
        self.trace: TraceWriter | None = None
        self._log_sizes: dict[str, int] = {}

    # -- control from the worker ---------------------------------------------------------
    def request_cancel(self, reason: str) -> None:
        """``cancelled`` (run cancel) or ``interrupted`` (worker hands the step back)."""
        if self.cancel_reason is None:
            self.cancel_reason = reason
        self.cancel.set()

    # -- heartbeat -----------------------------------------------------------------------
    def _heartbeat(self) -> None:
        deadline = self.c.state.lease_expires_at or 0.0
        while not self._stop_hb.wait(self.cfg.heartbeat_s):
            try:
                now = self.store.now()
                expires = now + self.cfg.lease_ttl
                def extend(s: StepState, e: float = expires) -> None:
                    s.lease_expires_at = e

                ok = self.writer.write(extend, notify=False)
                if ok:
                    deadline = expires
                    self._snapshot_logs()
                    for i, sem in enumerate(self.c.semaphores):
                        try:
                            self.c.semaphore_leases[i] = sem.renew(self.c.semaphore_leases[i])
                        except DagcraftError:
                            pass  # a lost slot only loosens the cap; the step's own lease matters
                    continue
                self._lose("lease taken over")
                return
            except StoreUnavailable:
                # keep trying while the lease may still be ours; past it, stop the child
                if time.time() > deadline:
                    self._lose("store unreachable past lease expiry")
                    return

    def _snapshot_logs(self) -> None:
        """Upload logs that grew since the last heartbeat, so ``dagcraft logs --follow`` works
        from any host while the step runs (bounded: big logs wait for the final upload)."""
        for name in ("stdout.log", "stderr.log"):
            p = self.dir / name
            try:
                size = p.stat().st_size
            except FileNotFoundError:
                continue
            if 0 < size <= 8 << 20 and self._log_sizes.get(name) != size:
                self._log_sizes[name] = size
                try:
                    self.store.put_file(f"{layout.attempt_prefix(self.c.run_id, self.c.step.id, self.n)}/{name}", p)
                except DagcraftError:
                    pass

    def _lose(self, why: str) -> None:
        self.lost.set()
        if self.trace is not None:
            self.trace.append("step.heartbeat_lost", {"step": self.c.step.id, "attempt": self.n, "reason": why})
        self.request_cancel("lost")

    # -- main ----------------------------------------------------------------------------
    def run(self) -> StepState:
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        trace_path = self.dir / "trace.jsonl"
        redactor = Redactor(self.c.wf.secret_values())
        self.trace = TraceWriter(trace_path, self.c.run_id, redactor=redactor, fsync=False)
        step = self.c.step
        self.trace.append("run.started", {"run": self.c.run_id, "workflow": self.c.run_name, "step": step.id,
                                          "attempt": self.n, "worker": self.cfg.worker_id})
        self.trace.append("step.claimed", {"step": step.id, "attempt": self.n, "worker": self.cfg.worker_id,
                                           "lease_expires_at": self.c.state.lease_expires_at})
        hb = threading.Thread(target=self._heartbeat, name=f"heartbeat-{step.id}", daemon=True)
        hb.start()
        try:
            outcome = self._execute(trace_path)
        except Exception as exc:  # an engine or store error: the attempt fails, the worker lives
            outcome = {"status": "failed", "reason": f"internal error: {type(exc).__name__}: {exc}",
                       "exit_code": None, "signal": None, "timed_out": False, "retryable": True}
        finally:
            self._stop_hb.set()
            hb.join(timeout=5)
        return self._finish(outcome)

    def _workdir(self) -> Path:
        if self.c.step.workdir:
            wd = Path(self.c.step.workdir)
            if not wd.is_absolute():
                validate_relpath(self.c.step.workdir, "workdir")
                wd = Path(self.c.spec_dir or ".") / wd
            wd.mkdir(parents=True, exist_ok=True)
            return wd
        wd = self.dir / "work"
        wd.mkdir(parents=True, exist_ok=True)
        return wd

    def _materialize(self, workdir: Path) -> tuple[dict[str, dict[str, str]], list[str]]:
        """Download declared inputs, and upstream artifacts when templates mention them.
        Returns local paths per upstream step and the digests read (for the cache key)."""
        digests: list[str] = []
        paths: dict[str, dict[str, str]] = {}
        for inp in self.c.step.inputs:
            ids = self.c.instances.get(inp.step, [inp.step])
            validate_relpath(inp.dest, "input destination")
            for sid in ids:
                ptr = self.c.upstream_artifacts.get(sid, {}).get(inp.artifact)
                if ptr is None:
                    if len(ids) > 1:
                        continue
                    raise FileNotFoundError(f"input artifact {inp.artifact!r} of step {sid!r} not found")
                dest = workdir / inp.dest if len(ids) == 1 else workdir / inp.dest / sid / Path(inp.artifact).name
                dest.parent.mkdir(parents=True, exist_ok=True)
                artifacts.get(self.store, scope=ptr["scope"], name=ptr["name"], dest=dest)
                digests.append(f"{inp.step}:{inp.artifact}:{ptr['digest']}")
        text = json.dumps([self.c.step.run, self.c.step.prompt, self.c.step.env])
        if "artifacts" in text:
            for sid, ptrs in self.c.upstream_artifacts.items():
                for name, ptr in ptrs.items():
                    dest = workdir / ".dagcraft-inputs" / sid / name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    artifacts.get(self.store, scope=ptr["scope"], name=ptr["name"], dest=dest)
                    paths.setdefault(sid, {})[name] = str(dest)
                    digests.append(f"{sid}:{name}:{ptr['digest']}")
        return paths, sorted(digests)

    def _context(self, artifact_paths: dict[str, dict[str, str]]) -> RenderContext:
        steps_ctx = json.loads(json.dumps(self.c.steps_ctx))
        # artifacts referenced from templates resolve to local paths of materialised copies
        for tid, ids in self.c.instances.items():
            if tid in steps_ctx:
                for sid in ids:
                    for name, p in artifact_paths.get(sid, {}).items():
                        steps_ctx[tid].setdefault("artifacts", {})[name] = p
        return RenderContext(
            params=self.c.wf.params,
            run={"id": self.c.run_id, "name": self.c.run_name, "spec_dir": self.c.spec_dir or ""},
            steps=steps_ctx,
            matrix=self.c.step.matrix,
            item=getattr(self.c.step, "item", None),
            env=dict(os.environ),
        )

    def _execute(self, trace_path: Path) -> dict[str, Any]:
        assert self.trace is not None
        step = self.c.step
        workdir = self._workdir()
        try:
            art_paths, input_digests = self._materialize(workdir)
            cmd = render_command(self.c.wf, step, self._context(art_paths))
        except (DagcraftError, FileNotFoundError) as exc:
            self.trace.append("error", {"step": step.id, "message": str(exc)})
            return {"status": "failed", "reason": str(exc), "exit_code": None, "signal": None,
                    "timed_out": False, "retryable": False}
        cache_key = None
        if step.cache:
            cache_key = self._cache_key(cmd, input_digests)
            hit = self._cache_lookup(cache_key)
            if hit is not None:
                return hit
        out_file = self.dir / "outputs"
        out_file.unlink(missing_ok=True)
        env = dict(os.environ)
        env.update(cmd.env)
        # the step can call `dagcraft memory|send|artifact|wait-for|trace ingest` even when the
        # worker's virtualenv is not activated
        bindir = os.path.dirname(sys.executable)
        if bindir not in env.get("PATH", "").split(os.pathsep):
            env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
        env.update({
            "DAGCRAFT_STORE": self.cfg.store_url,
            "DAGCRAFT_RUN_ID": self.c.run_id,
            "DAGCRAFT_STEP": step.id,
            "DAGCRAFT_ATTEMPT": str(self.n),
            "DAGCRAFT_OUTPUT": str(out_file),
            "DAGCRAFT_TRACE": str(trace_path),
            "DAGCRAFT_WORKDIR": str(workdir),
        })
        stdout_log, stderr_log = self.dir / "stdout.log", self.dir / "stderr.log"
        res = traced_exec(cmd.argv, writer=self.trace, env=env, cwd=workdir, stdout_log=stdout_log,
                          stderr_log=stderr_log, timeout=step.timeout_s, adapter=cmd.adapter,
                          echo=self.cfg.echo, cancel=self.cancel, grace=self.cfg.grace)
        self._upload_logs(stdout_log, stderr_log)
        base = {"exit_code": res.exit_code, "signal": res.signal, "timed_out": res.timed_out,
                "logs": [stdout_log, stderr_log]}
        if res.cancelled or self.cancel.is_set():
            return {**base, "status": self.cancel_reason or "cancelled", "reason": self.cancel_reason or "cancelled"}
        if res.timed_out:
            return {**base, "status": "failed", "reason": f"timed out after {step.timeout_s:g}s", "retryable": True}
        if res.exit_code != 0:
            why = f"exit code {res.exit_code}" if res.signal is None else f"killed by signal {res.signal}"
            return {**base, "status": "failed", "reason": why, "retryable": True}
        outputs = parse_outputs(out_file)
        for name, value in outputs.items():
            self.trace.append("output.set", {"name": name, "value": value})
        missing_out = [k for k in step.outputs_values if k not in outputs]
        if missing_out:
            return {**base, "status": "failed", "reason": f"missing declared output {missing_out[0]!r}",
                    "retryable": True}
        found, missing_art = collect_artifacts(workdir, step.outputs_artifacts)
        if missing_art:
            return {**base, "status": "failed", "reason": f"missing declared artifact {missing_art[0]!r}",
                    "retryable": True}
        arts: dict[str, dict[str, Any]] = {}
        scope = layout.step_scope(self.c.run_id, step.id)
        for name, path in found:
            ptr = artifacts.put(self.store, path, scope=scope, name=name, uploader=self.cfg.worker_id)
            arts[name] = ptr.model_dump(mode="json")
            self.trace.append("artifact.put", {"name": name, "digest": ptr.digest, "size": ptr.size})
        result = {**base, "status": "succeeded", "reason": None, "outputs": outputs, "artifacts": arts}
        if cache_key is not None:
            self._cache_store(cache_key, outputs, arts)
        return result

    # -- cache ---------------------------------------------------------------------------
    def _cache_key(self, cmd: Any, input_digests: list[str]) -> str:
        step = self.c.step
        agent = self.c.wf.agents.get(step.agent) if step.agent else None
        material = {
            "argv": cmd.argv, "shell": cmd.shell, "adapter": cmd.adapter,
            "env": dict(sorted(cmd.env.items())), "agent": step.agent,
            "agent_command": agent.command if agent else None,
            "inputs": input_digests, "outputs": [step.outputs_values, step.outputs_artifacts],
        }
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()

    def _cache_lookup(self, key: str) -> dict[str, Any] | None:
        got = self.store.get(layout.cache_entry(key))
        if got is None:
            return None
        entry = json.loads(got[0])
        assert self.trace is not None
        self.trace.append("x.dagcraft.cache_hit", {"key": key, "from_run": entry["run"], "from_step": entry["step"],
                                                   "from_attempt": entry["attempt"]})
        return {"status": "succeeded", "reason": None, "outputs": entry["outputs"], "artifacts": entry["artifacts"],
                "cached_from": f"{entry['run']}/{entry['step']}#{entry['attempt']}", "exit_code": 0,
                "signal": None, "timed_out": False}

    def _cache_store(self, key: str, outputs: dict[str, Any], arts: dict[str, Any]) -> None:
        body = json.dumps({"run": self.c.run_id, "step": self.c.step.id, "attempt": self.n,
                           "outputs": outputs, "artifacts": arts}, sort_keys=True).encode()
        try:
            self.store.put(layout.cache_entry(key), body, if_none_match=True)
        except Conflict:
            pass  # an identical result is already cached

    # -- uploads and commit ----------------------------------------------------------------
    def _upload_logs(self, *paths: Path) -> None:
        prefix = layout.attempt_prefix(self.c.run_id, self.c.step.id, self.n)
        for p in paths:
            if p.exists() and p.stat().st_size > 0:  # an empty log costs no request
                self.store.put_file(f"{prefix}/{p.name}", p)

    def _finish(self, outcome: dict[str, Any]) -> StepState:
        assert self.trace is not None
        step = self.c.step
        status = outcome["status"]
        now = self.store.now()
        info = AttemptInfo(attempt=self.n, status=status, worker=self.cfg.worker_id,
                           started_at=self.c.state.started_at, finished_at=now,
                           exit_code=outcome.get("exit_code"), signal=outcome.get("signal"),
                           reason=outcome.get("reason"))
        retry_delay: float | None = None

        def mutate(s: StepState) -> None:
            nonlocal retry_delay
            s.worker = None
            s.lease_expires_at = None
            s.exit_code = outcome.get("exit_code")
            s.reason = outcome.get("reason")
            s.history.append(info)
            if status == "succeeded":
                s.status = "succeeded"
                s.outputs = outcome.get("outputs", {})
                s.artifacts = outcome.get("artifacts", {})
                s.cached_from = outcome.get("cached_from")
                s.finished_at = now
            elif status == "interrupted":
                s.status = "pending"  # handed back: the next worker starts a new attempt at once
            elif status == "cancelled":
                s.status = "cancelled"
                s.finished_at = now
            else:
                s.failures += 1
                retry = outcome.get("retryable", False) and should_retry(
                    step.retries, s.failures, outcome.get("exit_code"), outcome.get("logs", []),
                    outcome.get("timed_out", False))
                if retry:
                    retry_delay = backoff_delay(step.retries, s.failures)
                    s.status = "retrying"
                    s.not_before = now + retry_delay
                else:
                    s.status = "failed"
                    s.finished_at = now

        if status == "lost":
            committed = False
        else:
            committed = self.writer.write(mutate)
        if committed:
            if retry_delay is not None:
                self.trace.append("step.retry", {"step": step.id, "attempt": self.n, "failures": self.writer.state.failures,
                                                 "delay_s": round(retry_delay, 3), "reason": outcome.get("reason")})
            elif status == "cancelled":
                self.trace.append("step.cancelled", {"step": step.id, "attempt": self.n})
            self.on_change(self.writer.state, self.writer.etag, self.writer.last_key)
        else:
            self.trace.append("step.fenced", {"step": step.id, "attempt": self.n, "worker": self.cfg.worker_id,
                                              "reason": "lease lost: a newer attempt or reset owns this step",
                                              "result_discarded": status})
        final = self.writer.state.status if committed else "fenced"
        self.trace.append("run.finished", {"status": final, "step": step.id, "attempt": self.n,
                                           "exit_code": outcome.get("exit_code"), "reason": outcome.get("reason"),
                                           "redactions": self.trace.redactor.count if self.trace.redactor else 0})
        self.trace.close()
        try:
            prefix = layout.attempt_prefix(self.c.run_id, step.id, self.n)
            self.store.put_file(f"{prefix}/trace.jsonl", self.dir / "trace.jsonl")
        except DagcraftError:
            pass  # the committed state stands; a missing trace is reported by `trace` commands
        for sem, lease in zip(self.c.semaphores, self.c.semaphore_leases, strict=True):
            try:
                sem.release(lease)
            except DagcraftError:
                pass
        return self.writer.state
