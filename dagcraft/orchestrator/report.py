"""Run reports and trace lookup in a store: the bridge between run state and ``tracing``."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dagcraft.errors import DagcraftError, NotFound
from dagcraft.orchestrator import layout
from dagcraft.orchestrator.model import (
    ACTIVE,
    RUN_FINISHED,
    AttemptInfo,
    AttemptStatus,
    Control,
    StepState,
    StepStatus,
    run_timing,
    seal_material,
)
from dagcraft.orchestrator.ops import (
    load_states,
    ordered_states,
    read_control,
    read_record,
    run_status,
    spend_summary,
)
from dagcraft.orchestrator.statusrows import logs_command, loop_summary, step_span
from dagcraft.orchestrator.view import workflow_of
from dagcraft.primitives.store import Store
from dagcraft.tracing import RunVerifyReport, TraceStatus, VerifyReport, read_trace, seal, verify

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


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


def resolve_traces(store: Store, target: str, dest: Path) -> list[Path]:
    """Trace files for ``RUN``, ``RUN/STEP`` or ``RUN/STEP/ATTEMPT`` — or ``@all``, every run
    in the store — downloaded to ``dest`` (``<dest>[/<run>]/<step>/<attempt>/trace.jsonl``).
    The caller owns ``dest`` (and removes it: the CLI uses a temporary directory)."""
    if target == "@all":
        from dagcraft.orchestrator.ops import list_runs

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
    steps = [parts[1]] if len(parts) > 1 else [s["step"] for s in status["steps"]]
    # a step the run does not have is said so; a foreach child or loop body step not made yet
    # (``[``, ``#`` never occur in a declared id) may still come: it has no traces yet
    if len(parts) > 1 and not any(s["step"] == parts[1] for s in status["steps"]) \
            and not any(c in parts[1] for c in "[#"):
        raise NotFound(f"step {parts[1]!r} not found in run {run_id!r}")
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
    """The run as ``tracing.RunView``: steps (spans, reasons, foreach parents and children),
    attempts (with their trace events, reasons and stderr tails), status, and the run's
    :class:`RunTiming`. Reads the run record, control and each step state once, and each
    attempt's trace once."""
    from dagcraft.tracing.render import AttemptView, RunView, StepView

    rec = read_record(store, run_id)
    ctl = read_control(store, run_id)
    compiled = rec.workflow.get("steps", {})
    states = load_states(store, run_id, rec)
    now = store.now()
    steps = []
    with tempfile.TemporaryDirectory() as tmp:
        for st, parent in ordered_states(rec, states):
            attempts = []
            for h in st.history:
                events = []
                raw = store.get(f"{layout.attempt_prefix(run_id, st.step_id, h.name)}/trace.jsonl")
                if raw is not None:
                    p = Path(tmp) / "trace.jsonl"
                    p.write_bytes(raw[0])
                    try:
                        events = read_trace(p)
                    except DagcraftError:
                        events = []
                attempts.append(AttemptView(attempt=h.attempt, status=h.status if h.kind == "run" else f"rollback {h.status}",
                                            worker=h.worker, started_ms=_ms(h.started_at), finished_ms=_ms(h.finished_at),
                                            exit_code=h.exit_code, reason=h.reason,
                                            reason_kind=None if h.reason_kind is None else str(h.reason_kind),
                                            stderr_tail=h.stderr_tail, events=events))
            if st.status in ACTIVE:
                rolling = st.status == StepStatus.ROLLING_BACK
                attempts.append(AttemptView(attempt=st.rollback_attempt if rolling else st.attempt,
                                            status="rollback running" if rolling else "running", worker=st.worker,
                                            started_ms=_ms(st.lease.acquired_at if rolling and st.lease else st.started_at),
                                            finished_ms=None, exit_code=None, reason=None, events=[]))
            definition = st.definition or compiled.get(st.step_id, {})
            start, end = step_span(st, [states[c] for c in st.children if c in states])
            last = st.history[-1] if st.history else None
            more = (logs_command(store, run_id, st.step_id, last.name)
                    if st.status == StepStatus.FAILED and last is not None and last.status != AttemptStatus.SUCCEEDED
                    else None)
            steps.append(StepView(step_id=st.step_id, status=st.status, attempts=attempts,
                                  needs=list(definition.get("needs", [])), reason=st.reason,
                                  reason_kind=None if st.reason_kind is None else str(st.reason_kind),
                                  started_ms=_ms(start), finished_ms=_ms(end), agent=definition.get("agent"),
                                  parent=parent, children=list(st.children), more=more,
                                  iteration=definition.get("iteration") if st.definition else None,
                                  loop=loop_summary(st, [states[c] for c in st.children if c in states],
                                                    definition["loop"]) if definition.get("loop") else None))
    timing = run_timing(rec, ctl, states.values(), now)
    from dagcraft.workflows.graph_render import to_svg  # networkx: only when a report is drawn

    return RunView(run_id=run_id, name=rec.name, status=ctl.status, reason=ctl.reason,
                   created_ms=int(rec.submitted_at * 1000), finished_ms=_ms(timing.finished_at), params=rec.params,
                   steps=steps, first_claim_ms=_ms(timing.first_claim_at),
                   duration_ms=None if timing.duration_s is None else int(timing.duration_s * 1000),
                   queued_ms=None if timing.queued_s is None else int(timing.queued_s * 1000),
                   dag_svg=to_svg(workflow_of(rec, store.url, with_secrets=False),
                                  {sid: str(st.status) for sid, st in states.items()}),
                   budget=spend_summary(store, rec, ctl, states))


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


def verify_run(store: Store, target: str) -> list[VerifyReport]:
    """The per-trace part of :func:`verify_sealed` (one report per committed attempt)."""
    return verify_sealed(store, target, allow_open=True).traces


def verify_sealed(store: Store, target: str, *, public_key: Ed25519PublicKey | None = None,
                  allow_open: bool = False) -> RunVerifyReport:
    """Verify ``RUN``, ``RUN/STEP`` or ``RUN/STEP/ATTEMPT`` against what its commits pinned.

    - Every committed attempt's trace (those of attempts that lost their worker or were
      fenced never committed) must be present (a trace whose upload is still queued is
      reported ``missing``), hash-chained from its first line, and its last line must hash to
      the head its commit pinned: a trace rewritten and re-chained, or with its last line
      edited, cut or extended, is a ``head mismatch``.
    - The run's seal (written by the transition that finished it) must match the digest of
      every step's committed result and heads (``seal mismatch``: a step state was
      rewritten), and with ``public_key`` carry a valid signature (``unsigned`` /
      ``bad signature``). A run not finished yet is ``open`` — accepted with ``allow_open``.
    """
    parts = target.split("/")
    if not 1 <= len(parts) <= 3 or not all(parts):
        raise NotFound(f"{target!r} is neither a trace file nor RUN[/STEP[/ATTEMPT]]")
    run_id = parts[0]
    rec = read_record(store, run_id)  # NotFound for an unknown run
    states = load_states(store, run_id, rec)
    if len(parts) >= 2 and parts[1] not in states and parts[1] not in rec.workflow.get("steps", {}):
        raise NotFound(f"run {run_id} has no step {parts[1]!r}")
    ctl = read_control(store, run_id)
    out = RunVerifyReport(target=target, ok=False, run_status=str(ctl.status))
    with tempfile.TemporaryDirectory(prefix="dagcraft-verify-") as tmp:
        for st, _parent in ordered_states(rec, states):
            if len(parts) >= 2 and st.step_id != parts[1]:
                continue
            for h in st.history:
                if h.status in (AttemptStatus.LOST, AttemptStatus.FENCED):
                    continue  # never committed: nothing pinned its trace
                if len(parts) == 3 and h.name != parts[2]:
                    continue
                out.traces.append(_verify_attempt(store, run_id, st.step_id, h, Path(tmp) / "trace.jsonl"))
    if len(parts) == 3 and not out.traces:
        raise NotFound(f"run {run_id} step {parts[1]} has no committed attempt {parts[2]!r}")
    _check_seal(out, run_id, ctl, states, public_key, allow_open)
    bad = [t for t in out.traces if not t.ok]
    out.status = bad[0].status if bad else out.seal_status
    out.ok = not bad and (out.seal_status == TraceStatus.OK or (allow_open and out.seal_status == TraceStatus.OPEN))
    return out


def _verify_attempt(store: Store, run_id: str, step: str, h: AttemptInfo, scratch: Path) -> VerifyReport:
    label = f"{run_id}/{step}/{h.name}"
    got = store.get(f"{layout.attempt_prefix(run_id, step, h.name)}/trace.jsonl")
    if got is None:
        rep = VerifyReport(path=label, ok=False)
        rep.fail(TraceStatus.MISSING, "trace missing: deleted, or its upload has not landed yet (the worker "
                                      "retries it)")
        return rep
    scratch.write_bytes(got[0])
    rep = verify(scratch, expect_head=h.trace_head, require_chain=True)
    rep.path = label
    if h.trace_head is None and rep.ok:
        rep.fail(TraceStatus.HEAD_MISMATCH, "its commit pinned no head (committed by an older dagcraft?)")
    return rep


def _check_seal(out: RunVerifyReport, run_id: str, ctl: Control, states: dict[str, StepState],
                public_key: Ed25519PublicKey | None, allow_open: bool) -> None:
    def fail(status: TraceStatus, problem: str) -> None:
        out.seal_status, out.seal_problem = status, problem

    if ctl.status not in RUN_FINISHED:
        out.seal_status = TraceStatus.OPEN
        if not allow_open:
            out.seal_problem = f"run is {ctl.status}: it is sealed when it finishes (--allow-open accepts that)"
        return
    sealed = ctl.seal
    if sealed is None:
        return fail(TraceStatus.UNSEALED, "the finished run carries no seal (finished by an older dagcraft, or "
                                          "the seal was removed)")
    out.digest, out.signed, out.key_id = sealed.digest, sealed.signature is not None, sealed.key_id
    actual = seal.digest(seal_material(run_id, ctl.status, ctl.generation, states.values()))
    if actual != sealed.digest or sealed.steps != len(states):
        return fail(TraceStatus.SEAL_MISMATCH, f"the run's seal does not match its {len(states)} step record(s) "
                                               f"(sealed over {sealed.steps}): a step state or the run status was "
                                               f"changed after the run finished")
    if public_key is None:
        return
    if sealed.signature is None:
        return fail(TraceStatus.UNSIGNED, "the seal carries no signature, and a public key was given")
    out.signature_checked = True
    if sealed.key_id != seal.key_id(public_key):
        return fail(TraceStatus.BAD_SIGNATURE, f"signed by key {sealed.key_id}, not by the given key "
                                               f"{seal.key_id(public_key)}")
    if not seal.check_signature(public_key, sealed.digest, sealed.signature):
        return fail(TraceStatus.BAD_SIGNATURE, "the seal's signature does not verify with the given public key")
