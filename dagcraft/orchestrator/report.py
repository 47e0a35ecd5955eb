"""Run reports and trace lookup in a store: the bridge between run state and ``tracing``."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from dagcraft.errors import DagcraftError, NotFound
from dagcraft.orchestrator import layout
from dagcraft.orchestrator.ops import load_states, ordered_states, read_control, read_record, run_status
from dagcraft.primitives.store import Store
from dagcraft.tracing import read_trace


def _attempt_dirs(store: Store, run_id: str, step: str) -> list[str]:
    prefix = f"{layout.step_prefix(run_id, step)}/attempts/"
    names = sorted({k[len(prefix):].split("/", 1)[0] for k in store.list(prefix) if k.endswith("/trace.jsonl")},
                   key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))
    return names


def _download(store: Store, key: str, dest: Path) -> Path:
    got = store.get(key)
    if got is None:
        raise NotFound(f"{key} not found in {store.url}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(got[0])
    return dest


def resolve_traces(store: Store, target: str, dest: Path | None = None) -> list[Path]:
    """Trace files for ``RUN``, ``RUN/STEP`` or ``RUN/STEP/ATTEMPT`` — or ``@all``, every run
    in the store — downloaded to ``dest`` (``<dest>[/<run>]/<step>/<attempt>/trace.jsonl``)."""
    if target == "@all":
        from dagcraft.orchestrator.ops import list_runs

        dest = dest or Path(tempfile.mkdtemp(prefix="dagcraft-traces-"))
        found: list[Path] = []
        for run in list_runs(store):
            try:
                found += resolve_traces(store, run["run_id"], dest / run["run_id"])
            except NotFound:
                continue  # a run with no finished attempt yet
        if not found:
            raise NotFound(f"no traces in {store.url} yet")
        return found
    parts = target.split("/")
    if not 1 <= len(parts) <= 3 or not all(parts):
        raise NotFound(f"{target!r} is neither a trace file nor RUN[/STEP[/ATTEMPT]]")
    run_id = parts[0]
    status = run_status(store, run_id)
    dest = dest or Path(tempfile.mkdtemp(prefix="dagcraft-traces-"))
    steps = [parts[1]] if len(parts) > 1 else [s["step"] for s in status["steps"]]
    out: list[Path] = []
    for step in steps:
        attempts = [parts[2]] if len(parts) == 3 else _attempt_dirs(store, run_id, step)
        for a in attempts:
            key = f"{layout.attempt_prefix(run_id, step, a)}/trace.jsonl"
            out.append(_download(store, key, dest / step / str(a) / "trace.jsonl"))
    if not out:
        raise NotFound(f"no traces for {target!r} yet")
    return out


def _ms(t: float | None) -> int | None:
    return int(t * 1000) if t else None


def report_view(store: Store, run_id: str) -> Any:
    """The run as ``tracing.RunView``: steps, attempts (with their trace events), status.
    Reads the run record, control and each step state once, and each attempt's trace once."""
    from dagcraft.tracing.render import AttemptView, RunView, StepView

    rec = read_record(store, run_id)
    ctl = read_control(store, run_id)
    compiled = rec.workflow.get("steps", {})
    steps = []
    with tempfile.TemporaryDirectory() as tmp:
        for st, _parent in ordered_states(rec, load_states(store, run_id)):
            attempts = []
            for h in st.history:
                name = str(h.attempt) if h.kind == "run" else f"rollback-{h.attempt}"
                events = []
                raw = store.get(f"{layout.attempt_prefix(run_id, st.step_id, name)}/trace.jsonl")
                if raw is not None:
                    p = Path(tmp) / "trace.jsonl"
                    p.write_bytes(raw[0])
                    try:
                        events = read_trace(p)
                    except DagcraftError:
                        events = []
                attempts.append(AttemptView(attempt=h.attempt, status=h.status if h.kind == "run" else f"rollback {h.status}",
                                            worker=h.worker, started_ms=_ms(h.started_at), finished_ms=_ms(h.finished_at),
                                            exit_code=h.exit_code, reason=h.reason, events=events))
            if st.status == "running":
                attempts.append(AttemptView(attempt=st.attempt, status="running", worker=st.worker,
                                            started_ms=_ms(st.started_at), finished_ms=None, exit_code=None,
                                            reason=None, events=[]))
            definition = st.definition or compiled.get(st.step_id, {})
            steps.append(StepView(step_id=st.step_id, status=st.status, attempts=attempts,
                                  needs=list(definition.get("needs", []))))
    return RunView(run_id=run_id, name=rec.name, status=ctl.status, created_ms=int(rec.submitted_at * 1000),
                   finished_ms=_ms(ctl.finished_at), params=rec.params, steps=steps)


def write_report(store: Store, run_id: str, out: Path | None = None) -> Path:
    """Render the run report, store it at ``runs/<run>/report.html`` and write a local copy
    (``out``; else ``<local store>/reports/<run>.html``; else ``./<run>.html``)."""
    from dagcraft.tracing.render import render_run_html

    html = render_run_html(report_view(store, run_id))
    data = html.encode()
    store.put(layout.report(run_id), data)
    if out is None:
        root = getattr(store, "root", None)
        out = Path(root) / "reports" / f"{run_id}.html" if root else Path(f"{run_id}.html")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return out


def verify_run(store: Store, target: str) -> list[Any]:
    """Verify every trace a run's committed attempts should have (``RUN`` or ``RUN/STEP``):
    each must be present (a trace whose upload is still queued is reported missing), its hash
    chain intact, and the head its commit pinned must be one of its lines — so a trace
    rewritten and re-chained after the commit is caught. Attempts that lost their worker have
    no trace to check. Returns one ``tracing.VerifyReport`` per expected trace."""
    import hashlib

    from dagcraft.orchestrator.model import AttemptKind, AttemptStatus
    from dagcraft.tracing import verify
    from dagcraft.tracing.reader import VerifyReport

    parts = target.split("/")
    if not 1 <= len(parts) <= 2 or not all(parts):
        raise NotFound(f"{target!r} is neither a trace file nor RUN[/STEP]")
    run_id = parts[0]
    states = load_states(store, run_id)
    if not states:
        read_record(store, run_id)  # NotFound for an unknown run
    if len(parts) == 2 and parts[1] not in states:
        raise NotFound(f"run {run_id} has no step {parts[1]!r}")
    out: list[VerifyReport] = []
    with tempfile.TemporaryDirectory(prefix="dagcraft-verify-") as tmp:
        for st, _parent in ordered_states(read_record(store, run_id), states):
            if len(parts) == 2 and st.step_id != parts[1]:
                continue
            for h in st.history:
                if h.status == AttemptStatus.LOST:
                    continue
                name = str(h.attempt) if h.kind == AttemptKind.RUN else f"rollback-{h.attempt}"
                label = f"{run_id}/{st.step_id}/{name}"
                got = store.get(f"{layout.attempt_prefix(run_id, st.step_id, name)}/trace.jsonl")
                if got is None:
                    out.append(VerifyReport(path=label, ok=False, problems=[
                        "trace missing: its upload has not landed (yet); the worker retries it"]))
                    continue
                p = Path(tmp) / "trace.jsonl"
                p.write_bytes(got[0])
                rep = verify(p)
                rep.path = label
                if h.trace_head and rep.ok:
                    heads = {hashlib.sha256(line).hexdigest() for line in got[0].split(b"\n") if line}
                    if h.trace_head not in heads:
                        rep.ok = False
                        rep.problems.append("the line its commit pinned is gone: rewritten after the commit")
                out.append(rep)
    if not out:
        raise NotFound(f"no committed attempts in {target!r} yet")
    return out
