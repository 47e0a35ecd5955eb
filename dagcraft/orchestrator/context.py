"""The template context of a step: built here, and only here.

Everything that renders a template for a step — its ``when`` and ``foreach`` (scheduler), its
command and workdir (attempt), its compensation — uses :func:`for_step`, so a template means
the same thing at every moment of the step's life. ``env`` is the worker's environment in
every case (a ``when`` that reads ``env.HOME`` evaluates as it would in the command).
Only the step's ancestors are read (the compiler allows templates to reference nothing
else), so the cost follows the step, never the DAG.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from dagcraft.errors import InvalidInput
from dagcraft.orchestrator.model import AttemptInfo, AttemptKind
from dagcraft.orchestrator.view import LocalView, fan_in
from dagcraft.primitives.keys import validate_relpath
from dagcraft.workflows import ConcreteStep, RenderContext, render_text


def for_step(view: LocalView, sid: str, *, with_steps: bool = True, include_self: bool = False) -> RenderContext:
    """The context step ``sid`` renders in. ``with_steps=False`` leaves ``steps`` empty (for
    conditions that only look at statuses: nothing is read). ``include_self`` adds the step's
    own results (its compensation may refer to them)."""
    step = view.steps[sid]
    steps: dict[str, dict[str, Any]] = {}
    if with_steps:
        ids = view.context_ids(sid) | ({sid} if include_self else set())
        steps = view.steps_context(only=ids)
    rec = view.record
    parent = view.state(sid).parent
    loop = None if step.iteration is None or parent is None else loop_vars(view, parent, step.iteration)
    return RenderContext(params=view.wf.params,
                         run={"id": view.run_id, "name": rec.name, "spec_dir": rec.spec_dir or ""},
                         steps=steps, matrix=step.matrix, item=step.item, env=view.template_env(),
                         loop=loop)


def iteration_ids(view: LocalView, loop_id: str, iteration: int) -> list[str]:
    """The body steps of iteration ``iteration`` of loop ``loop_id`` (as far as it expanded)."""
    return [c for c in view.state(loop_id).children if c in view.steps and view.steps[c].iteration == iteration]


def loop_vars(view: LocalView, loop_id: str, iteration: int) -> dict[str, Any]:
    """``loop``: ``iteration`` (1-based) and ``previous`` — None in iteration 1, else
    ``{steps: {<body id>: {outputs, artifacts, status}}}`` of iteration - 1, from the committed
    records (so every worker on every host renders the same)."""
    previous: dict[str, Any] | None = None
    if iteration > 1:
        prev = iteration_ids(view, loop_id, iteration - 1)
        view.ensure_fresh(prev)
        previous = {"steps": {view.steps[c].template_id: {
            "outputs": view.state(c).outputs, "artifacts": {n: p.get("digest", "") for n, p in
                                                            view.state(c).artifacts.items()},
            "status": str(view.state(c).status)} for c in prev}}
    return {"iteration": iteration, "previous": previous}


def for_until(view: LocalView, loop_id: str, iteration: int) -> RenderContext:
    """The context loop ``loop_id``'s ``until`` is evaluated in after iteration ``iteration``:
    the loop's own context, with ``steps.<body id>`` that iteration's body results."""
    ctx = for_step(view, loop_id)
    body = set(iteration_ids(view, loop_id, iteration))
    view.ensure_fresh(body)
    steps = {**ctx.steps, **view.steps_context(only=body)}
    return ctx.model_copy(update={"steps": steps, "loop": loop_vars(view, loop_id, iteration)})


def with_artifact_paths(ctx: RenderContext, instances: dict[str, list[str]],
                        paths: dict[str, dict[str, str]]) -> RenderContext:
    """``ctx`` with ``steps.<id>.artifacts[name]`` resolved to the local paths of the copies
    materialised for this attempt (``paths``: concrete step id → name → path). For a fan-out
    step each instance gets its own file, in every view of it (``artifacts[i]``,
    ``instances[i].artifacts``, ``by_key[k].artifacts``): never one instance's file for all."""
    if not paths:  # nothing materialised (most steps): no copy of every upstream result
        return ctx
    steps = copy.deepcopy(ctx.steps)
    for tid, ids in instances.items():
        entry = steps.get(tid)
        if entry is None:
            continue
        if "instances" in entry:
            members = [{**i, "artifacts": {**i["artifacts"], **paths.get(i["id"], {})}} for i in entry["instances"]]
            steps[tid] = fan_in(members, entry["status"])
        else:
            for sid in ids:
                entry["artifacts"] = {**entry.get("artifacts", {}), **paths.get(sid, {})}
    return ctx.model_copy(update={"steps": steps})


def with_attempt(ctx: RenderContext, number: int, history: list[AttemptInfo]) -> RenderContext:
    """``ctx`` with ``attempt``: ``number`` and ``previous`` — the step's last run attempt
    before this one, from its committed history (so any worker on any host renders the same),
    or None on attempt 1. ``previous.check`` is always a mapping: ``exit_code`` None and
    ``output`` "" when no check ran (its command failed first)."""
    prev = [a for a in history if a.kind is AttemptKind.RUN and a.attempt < number]
    previous: dict[str, Any] | None = None
    if prev:
        p = prev[-1]
        previous = {"number": p.attempt, "status": str(p.status), "reason": p.reason,
                    "reason_kind": None if p.reason_kind is None else str(p.reason_kind),
                    "exit_code": p.exit_code,
                    "check": {"exit_code": p.check_exit_code, "output": p.check_output or ""}}
    return ctx.model_copy(update={"attempt": {"number": number, "previous": previous}})


def workdir(step: ConcreteStep, ctx: RenderContext, spec_dir: str | None, scratch: Path,
            worktree: Path | None = None) -> Path:
    """The directory the step's command (and its compensation) runs in: its ``workdir``
    rendered with the step's context — relative to the spec's directory, never escaping it —
    else ``scratch``. With the attempt's git ``worktree``, that worktree: a relative
    ``workdir`` is then a directory inside it. Created if missing."""
    if not step.workdir:
        if worktree is not None:
            return worktree
        scratch.mkdir(parents=True, exist_ok=True)
        return scratch
    variables = {"params": ctx.params, "run": ctx.run, "steps": ctx.steps, "matrix": ctx.matrix,
                 "item": ctx.item, "env": ctx.env}
    try:
        rendered = render_text(step.workdir, variables)
    except Exception as exc:  # jinja raises many types; the step fails with the message
        raise InvalidInput(f"step {step.id!r}: workdir: {exc}") from None
    wd = Path(rendered)
    if not wd.is_absolute():
        validate_relpath(rendered, "workdir")
        wd = (worktree if worktree is not None else Path(spec_dir or ".")) / wd
    wd.mkdir(parents=True, exist_ok=True)
    return wd
