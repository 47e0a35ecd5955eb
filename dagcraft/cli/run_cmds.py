"""Run commands: run, submit, worker, status, runs, logs, resume, retry, cancel, rollback."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from dagcraft.cli.common import (
    RunStatusChoice,
    command_hint,
    echo_json,
    json_option,
    parse_address,
    printable,
    resolve_run,
)
from dagcraft.errors import EXIT_BUDGET, DagcraftError, Failed, InvalidInput

KEEP_HELP = "keep each attempt's scratch directory (private, 0700) instead of removing it afterwards"
SIGNING_HELP = ("Ed25519 private key (PEM) that signs the seal of the runs it finishes "
                "(default $DAGCRAFT_SIGNING_KEY, the PEM text; never stored)")
STORE_HELP = "store URL: a directory or s3://bucket/prefix[?endpoint=URL] (default $DAGCRAFT_STORE, else .dagcraft)"


def _store(url: str | None, *, create: bool = True, coordinate: bool = False) -> tuple[Any, str]:
    """The store and its URL for children. ``create=False`` for read-only commands: a
    mistyped path is "no store at PATH" (exit 4), never a new empty store. ``coordinate``
    (run, submit, worker): refuse, exit 5 with one line, a store whose probed capabilities
    cannot give dagcraft's guarantees, before anything is written (else workers hang)."""
    from dagcraft.primitives import open_store
    from dagcraft.primitives.capabilities import require
    from dagcraft.primitives.url import resolve_store_url

    resolved = resolve_store_url(url)
    store = open_store(resolved, create=create)
    if coordinate:
        require(store)
    # children (workers, steps) must reach the same store whatever their cwd
    root = getattr(store, "root", None)
    return store, (str(root) if root is not None else resolved)


F = TypeVar("F", bound=Callable[..., Any])


def secret_options(f: F) -> F:
    """``--secret-file NAME=PATH`` and ``--secret-stdin NAME``: secret params kept out of the
    command line (which any user can read in ``/proc/<pid>/cmdline``), like
    ``DAGCRAFT_PARAM_<NAME>`` in the environment. One definition for every command."""
    f = click.option("--secret-stdin", "secret_stdin", metavar="NAME",
                     help="read secret parameter NAME from standard input")(f)
    return click.option("--secret-file", "secret_files", multiple=True, metavar="NAME=PATH",
                        help="read secret parameter NAME from the file PATH (repeatable)")(f)


def read_secret_options(secret_files: tuple[str, ...], secret_stdin: str | None) -> dict[str, str]:
    if not secret_files and secret_stdin is None:
        return {}  # without loading the worker's view module (a submit needs none of it)
    from dagcraft.orchestrator.view import read_secrets

    return read_secrets(secret_files, secret_stdin, sys.stdin if secret_stdin is not None else None)


def compile_with_secrets(spec: str, params: tuple[str, ...], secret_files: tuple[str, ...],
                         secret_stdin: str | None) -> Any:
    from dagcraft.orchestrator.submission import compile_spec

    return compile_spec(Path(spec), params, read_secret_options(secret_files, secret_stdin))


def _check_run_id(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--run-id``: refused (exit 2) before anything is written."""
    from dagcraft.primitives.keys import validate_run_id

    return validate_run_id(value) if value is not None else None


def _secret_env(wf: Any) -> dict[str, str]:
    from dagcraft.orchestrator.view import secret_env

    return secret_env({n: str(wf.params[n]) for n in wf.secret_params if wf.params.get(n) is not None})


def _pool_opts(workers: int | None, lease_ttl: float, env: dict[str, str] | None = None,
               keep_workdirs: bool = False, signing_key: str | None = None) -> Any:
    from dagcraft.orchestrator import PoolOptions
    from dagcraft.tracing.seal import load_signer

    load_signer(signing_key)  # a bad key stops here (exit 2), before any worker starts
    opts = PoolOptions(lease_ttl=lease_ttl, env=env or {}, keep_workdirs=keep_workdirs,
                       signing_key=str(Path(signing_key).resolve()) if signing_key else None)
    if workers:
        opts.workers = workers
    return opts


def _resume_opts(store: Any, run_id: str, workers: int | None, lease_ttl: float,
                 secret_files: tuple[str, ...], secret_stdin: str | None, signing_key: str | None = None) -> Any:
    from dagcraft.orchestrator.view import require_secrets, secret_env

    env = _resume_env()
    env.update(secret_env(read_secret_options(secret_files, secret_stdin)))
    require_secrets(store, run_id, env)
    return _pool_opts(workers, lease_ttl, env, signing_key=signing_key)


def _drive_and_report(store: Any, url: str, run_id: str, opts: Any, report: str | None, no_report: bool) -> None:
    from dagcraft.cli.progress import Progress
    from dagcraft.orchestrator import drive, run_status, write_report

    t0 = time.time()
    with Progress() as progress:
        status = drive(store, url, run_id, opts, on_update=progress.update)
    st = run_status(store, run_id)
    counts = ", ".join(f"{v} {k}" for k, v in sorted(st["counts"].items()))
    # one duration everywhere (first claim → finish, every session of the run): run_status's
    session = f"; this session {time.time() - t0:.1f}s" if st["generation"] else ""
    click.echo(f"run {run_id}: {status} in {_secs(st['duration_s'])} ({counts}{session})")
    for s in st["steps"]:
        if s.get("loop"):
            click.echo(f"  {s['step']}: {_iterations(s['loop'])}")
        elif s.get("children_counts"):
            click.echo(f"  {s['step']}: {_children(s)}")
    for s in st["steps"]:
        if s["status"] == "failed" and not s.get("children"):
            for line in _failure_lines(s):
                click.echo(line)
    if not no_report:
        try:
            path = write_report(store, run_id, Path(report) if report else None)
            click.echo(f"report: {path}")
        except (DagcraftError, OSError) as exc:
            # the run's outcome is decided and stored: a report that cannot be written (disk
            # full, store gone) is a warning and never changes the exit code
            why = str(exc)
            if isinstance(exc, OSError):
                why = f"{report or 'local copy'}: {exc.strerror or type(exc).__name__}"
            click.echo(f"dagcraft: warning: report not written: {why}", err=True)
    click.echo("traces: " + command_hint("dagcraft", "trace", "summary", run_id, "--store", url))
    if status == "waiting_approval":
        # the workers have left; a decision from any host, then `resume`, continues the run
        for s in st["steps"]:
            if s["status"] == "waiting_approval":
                prompt = (s.get("approval") or {}).get("prompt") or "approval needed"
                click.echo(f"  {s['step']}: waiting for approval: {prompt}")
                click.echo("    " + command_hint("dagcraft", "approve", run_id, s["step"], "--store", url)
                           + "  (or reject), then: " + command_hint("dagcraft", "resume", run_id, "--store", url))
        return
    if status == "budget_exceeded":
        click.echo("  budget exhausted; raise a limit and continue: "
                   + command_hint("dagcraft", "resume", run_id, "--budget", "usd=N", "--store", url))
        sys.exit(EXIT_BUDGET)
    if status != "succeeded":
        sys.exit(1)


def _drive(as_json: bool, store: Any, url: str, run_id: str, *args: Any,
           extra: dict[str, Any] | None = None, **kw: Any) -> None:
    """``_drive_and_report(store, url, run_id, *args, **kw)``: the human summary on stdout, or
    with ``as_json`` on stderr while stdout gets one JSON object (``status --json``'s, plus
    ``extra``). The exit code is the same either way."""
    if not as_json:
        _drive_and_report(store, url, run_id, *args, **kw)
        return
    code: Any = 0
    with contextlib.redirect_stdout(sys.stderr):
        try:
            _drive_and_report(store, url, run_id, *args, **kw)
        except SystemExit as exc:
            code = exc.code
    _print_result(store, run_id, extra)
    if code:
        sys.exit(code)


def _print_result(store: Any, run_id: str, extra: dict[str, Any] | None = None) -> None:
    from dagcraft.orchestrator import run_status

    echo_json({**run_status(store, run_id), **(extra or {})})


def _worker_run(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``worker --run``: a run id or ``@latest`` (resolved when the worker starts)."""
    from dagcraft.cli.common import LATEST

    return value if value == LATEST else _check_run_id(ctx, param, value)


def register(cli: click.Group) -> None:
    @cli.command()
    @click.argument("spec", type=click.Path(dir_okay=False))
    @click.option("-p", "--param", "params", multiple=True, metavar="K=V", help="set a parameter")
    @click.option("--store", "store_url", help=STORE_HELP)
    @click.option("--workers", type=click.IntRange(1, 256), help="local worker processes (default: CPU count)")
    @click.option("--run-id", callback=_check_run_id, help="run id (default: <name>-<utc time>-<random>)")
    @click.option("--lease-ttl", type=click.FloatRange(1, 3600), default=30.0, show_default=True,
                  help="step lease TTL in seconds; heartbeat every third of it")
    @click.option("--report", type=click.Path(dir_okay=False), help="where to write the HTML report")
    @click.option("--no-report", is_flag=True, help="do not render the HTML report")
    @click.option("--keep-workdirs", is_flag=True, help=KEEP_HELP)
    @click.option("--signing-key", type=click.Path(dir_okay=False), help=SIGNING_HELP)
    @secret_options
    @json_option
    def run(spec: str, params: tuple[str, ...], store_url: str | None, workers: int | None, run_id: str | None,
            lease_ttl: float, report: str | None, no_report: bool, keep_workdirs: bool, signing_key: str | None,
            secret_files: tuple[str, ...], secret_stdin: str | None, as_json: bool) -> None:
        """Submit SPEC and run it on a local worker pool, with live progress. Exit 1 if the run
        does not succeed; exit 0 leaving it waiting when only an approval can move it on (it
        prints the approve command; `resume` after the decision)."""
        from dagcraft.orchestrator import submit

        # a bad spec stops here: exit 2, nothing written
        wf = compile_with_secrets(spec, params, secret_files, secret_stdin)
        opts = _pool_opts(workers, lease_ttl, _secret_env(wf), keep_workdirs, signing_key)  # so does a bad key
        store, url = _store(store_url, coordinate=True)
        rid = submit(store, wf, run_id=run_id, spec_dir=str(Path(spec).resolve().parent))
        click.echo(f"run {rid} submitted ({len(wf.steps)} steps) to {url}", err=as_json)
        _drive(as_json, store, url, rid, opts, report, no_report)

    @cli.command("submit")
    @click.argument("spec", type=click.Path(dir_okay=False))
    @click.option("-p", "--param", "params", multiple=True, metavar="K=V", help="set a parameter")
    @click.option("--store", "store_url", help=STORE_HELP)
    @click.option("--run-id", callback=_check_run_id, help="run id (default: <name>-<utc time>-<random>)")
    @secret_options
    @json_option
    def submit_cmd(spec: str, params: tuple[str, ...], store_url: str | None, run_id: str | None,
                   secret_files: tuple[str, ...], secret_stdin: str | None, as_json: bool) -> None:
        """Submit SPEC without running it; prints the run id. Workers pick it up (secret params
        never reach the store: give them to the workers)."""
        from dagcraft.orchestrator import submit

        wf = compile_with_secrets(spec, params, secret_files, secret_stdin)
        store, url = _store(store_url, coordinate=True)
        rid = submit(store, wf, run_id=run_id, spec_dir=str(Path(spec).resolve().parent))
        if as_json:
            echo_json({"run_id": rid, "name": wf.name, "steps": len(wf.steps), "store": url})
        else:
            click.echo(rid)

    @cli.command()
    @click.option("--store", "store_url", help=STORE_HELP)
    @click.option("--run", "run_id", callback=_worker_run,
                  help="serve only this run, or @latest (default: every run in the store)")
    @click.option("--concurrency", type=click.IntRange(1, 256), default=1, show_default=True,
                  help="steps this worker runs at once")
    @click.option("--exit-when-idle", is_flag=True, help="exit when the served runs have finished")
    @click.option("--lease-ttl", type=click.FloatRange(1, 3600), default=30.0, show_default=True,
                  help="step lease TTL in seconds; heartbeat every third of it")
    @click.option("--poll-max", type=click.FloatRange(0.01, 60), default=1.0, show_default=True,
                  help="longest wait between journal polls when idle")
    @click.option("--echo", is_flag=True, help="stream step output to this terminal")
    @click.option("--quiet", is_flag=True, help="do not log claims and results to stderr")
    @click.option("--keep-workdirs", is_flag=True, help=KEEP_HELP)
    @click.option("--signing-key", type=click.Path(dir_okay=False), help=SIGNING_HELP)
    @secret_options
    def worker(store_url: str | None, run_id: str | None, concurrency: int, exit_when_idle: bool,
               lease_ttl: float, poll_max: float, echo: bool, quiet: bool, keep_workdirs: bool,
               signing_key: str | None, secret_files: tuple[str, ...], secret_stdin: str | None) -> None:
        """Claim and run ready steps. SIGTERM drains; SIGINT hands running steps back."""
        from dagcraft.orchestrator.view import secret_env
        from dagcraft.orchestrator.worker import ServeOptions, serve

        def log(msg: str) -> None:
            click.echo(f"[{time.strftime('%H:%M:%S')}] {msg}", err=True)

        def announce(worker_id: str, url: str, rid: str | None) -> None:
            click.echo(f"worker {worker_id} on {url}" + (f" (run {rid})" if rid else ""), err=True)

        opts = ServeOptions(run_id=run_id, concurrency=concurrency, exit_when_idle=exit_when_idle,
                            lease_ttl=lease_ttl, poll_max=poll_max, echo=echo, keep_workdirs=keep_workdirs,
                            signing_key=signing_key)
        sys.exit(serve(store_url, opts,
                       env=secret_env(read_secret_options(secret_files, secret_stdin)), resolve_run=resolve_run,
                       log=None if quiet else log, announce=None if quiet else announce))

    @cli.command()
    @click.argument("run_id", metavar="RUN")
    @click.option("--store", "store_url", help=STORE_HELP)
    @json_option
    @click.option("--watch", is_flag=True,
                  help="refresh every second until the run finishes (in place on a terminal)")
    def status(run_id: str, store_url: str | None, as_json: bool, watch: bool) -> None:
        """Show RUN's status and its steps. Exit 1 if the run failed."""
        from dagcraft.orchestrator import run_status
        from dagcraft.orchestrator.ops import status_result

        store, _ = _store(store_url, create=False)
        run_id = parse_address(run_id, store, step="forbidden").run

        if watch and not as_json:
            from dagcraft.cli.watch import watch as watch_status  # rich: only to watch

            st = watch_status(lambda: run_status(store, run_id), _print_status)
        else:
            while True:
                res = status_result(store, run_id)
                st = res.fields
                if as_json:
                    click.echo(res.to_json())  # a sealed run's rows as its summary holds them
                else:
                    _print_status(res.as_dict())
                if not watch or st["status"] in ("succeeded", "failed", "cancelled", "rolled_back",
                                                 "budget_exceeded"):
                    break
                time.sleep(1.0)
                click.echo("")
        if st["status"] == "budget_exceeded":
            sys.exit(EXIT_BUDGET)
        if st["status"] in ("failed", "cancelled", "rolled_back"):
            sys.exit(1)

    @cli.command()
    @click.option("--store", "store_url", help=STORE_HELP)
    @click.option("--status", "status_filter", type=RunStatusChoice(), help="only runs with this status")
    @json_option
    def runs(store_url: str | None, status_filter: str | None, as_json: bool) -> None:
        """List runs, newest first."""
        from dagcraft.orchestrator import list_runs

        store, url = _store(store_url, create=False)
        items = list_runs(store, status_filter)
        if as_json:
            click.echo(json.dumps(items, indent=2, default=str))
            return
        if not items:
            click.echo(f"no {status_filter + ' ' if status_filter else ''}runs in {url}")
            return
        for r in items:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["submitted_at"])) if r["submitted_at"] else "-"
            tail = f"{r['name'] or ''}" + (f"  ({r['corrupt']})" if r.get("corrupt") else "")
            tail += f"  stalled: {r['stalled']}" if r.get("stalled") else ""
            click.echo(f"{r['run_id']:<48} {r['status']:<12} {when}  {tail}")

    @cli.command()
    @click.argument("address", nargs=-1, required=True, metavar="RUN/STEP[/ATTEMPT]")
    @click.option("--store", "store_url", help=STORE_HELP)
    @click.option("--attempt", type=click.IntRange(1), help="attempt number (default: latest)")
    @click.option("--stream", type=click.Choice(["stdout", "stderr"]),
                  help="which log (default: stdout; of a failed attempt whose stdout is empty, stderr)")
    @click.option("--follow", "-f", is_flag=True,
                  help="wait for the attempt to start, stream it until it ends; exit 0 if it succeeded, else 1")
    def logs(address: tuple[str, ...], store_url: str | None, attempt: int | None, stream: str | None,
             follow: bool) -> None:
        """Print a step's output log. The step is RUN/STEP[/ATTEMPT] (or RUN STEP [ATTEMPT]);
        without an attempt, its latest."""
        from dagcraft.orchestrator.ops import follow_log, read_log, read_log_or_stderr

        store, _ = _store(store_url, create=False)
        addr = parse_address(address, store, step="required", attempt=True)
        if addr.attempt is not None and attempt is not None and addr.attempt != attempt:
            raise InvalidInput(f"{addr.label()} and --attempt {attempt} name different attempts")
        run_id, step, attempt = addr.run, addr.step or "", addr.attempt or attempt
        out = sys.stdout.buffer
        if follow:
            def write(chunk: bytes) -> None:
                out.write(chunk)
                out.flush()

            ended = follow_log(store, run_id, step, write, attempt, stream or "stdout", on_wait=lambda: click.echo(
                f"dagcraft: waiting for {run_id}/{step} to start", err=True))
            if ended != "succeeded":
                click.echo(f"dagcraft: {run_id}/{step}: {ended}", err=True)
                sys.exit(1)
            return
        if stream is None:
            data, note = read_log_or_stderr(store, run_id, step, attempt)
            if note:
                click.echo(f"dagcraft: {note}", err=True)
        else:
            data = read_log(store, run_id, step, attempt, stream)
        out.write(data)
        out.flush()

    workers_opt = click.option("--workers", type=click.IntRange(1, 256),
                               help="local worker processes (default: CPU count)")
    ttl_opt = click.option("--lease-ttl", type=click.FloatRange(1, 3600), default=30.0, show_default=True,
                           help="step lease TTL in seconds; heartbeat every third of it")
    no_report_opt = click.option("--no-report", is_flag=True, help="do not render the HTML report")

    @cli.command()
    @click.argument("run_id", metavar="RUN")
    @click.option("--store", "store_url", help=STORE_HELP)
    @workers_opt
    @click.option("--retry-failed", is_flag=True, help="also re-run failed steps (and those skipped because of them)")
    @ttl_opt
    @click.option("--report", type=click.Path(dir_okay=False), help="where to write the HTML report")
    @no_report_opt
    @click.option("--signing-key", type=click.Path(dir_okay=False), help=SIGNING_HELP)
    @click.option("--budget", "budget_raises", multiple=True, metavar="KEY=VALUE",
                  help="raise a budget limit: usd, tokens, agent.NAME.usd|tokens, step.ID.usd|tokens (repeatable)")
    @secret_options
    @json_option
    def resume(run_id: str, store_url: str | None, workers: int | None, retry_failed: bool, lease_ttl: float,
               report: str | None, no_report: bool, signing_key: str | None, budget_raises: tuple[str, ...],
               secret_files: tuple[str, ...], secret_stdin: str | None, as_json: bool) -> None:
        """Continue the interrupted run RUN; succeeded steps never run again. A run stopped on
        a budget continues with the limits raised by --budget."""
        from dagcraft.orchestrator import prepare_resume
        from dagcraft.tracing.seal import load_signer

        load_signer(signing_key)  # a bad key: exit 2, nothing reopened
        store, url = _store(store_url, create=False, coordinate=True)  # acts on an existing run
        run_id = parse_address(run_id, store, step="forbidden").run
        status = prepare_resume(store, run_id, retry_failed=retry_failed, budget_raises=budget_raises)
        if status in ("succeeded",) or (status in ("failed", "rolled_back") and not retry_failed):
            click.echo(f"run {run_id} already {status}" + ("" if status == "succeeded" else
                                                           "; use --retry-failed to re-run failed steps"),
                       err=as_json)
            if as_json:
                _print_result(store, run_id)
            if status != "succeeded":
                sys.exit(1)
            return
        opts = _resume_opts(store, run_id, workers, lease_ttl, secret_files, secret_stdin, signing_key)
        click.echo(f"resuming run {run_id}", err=as_json)
        _drive(as_json, store, url, run_id, opts, report, no_report)

    @cli.command()
    @click.argument("address", metavar="RUN[/STEP]")
    @click.option("--from", "from_step", help="step to re-run, with everything downstream (or give RUN/STEP)")
    @click.option("--store", "store_url", help=STORE_HELP)
    @workers_opt
    @ttl_opt
    @click.option("--detach", is_flag=True, help="only reset; let running workers pick it up")
    @no_report_opt
    @secret_options
    @json_option
    def retry(address: str, from_step: str | None, store_url: str | None, workers: int | None, lease_ttl: float,
              detach: bool, no_report: bool, secret_files: tuple[str, ...], secret_stdin: str | None,
              as_json: bool) -> None:
        """Re-run a step and everything downstream (earlier attempts are kept). RUN[/STEP]
        names the step as RUN/STEP, or RUN with --from STEP."""
        from dagcraft.orchestrator import retry_from

        store, url = _store(store_url, create=False, coordinate=True)  # acts on an existing run
        addr = parse_address(address, store)
        if addr.step and from_step and addr.step != from_step:
            raise InvalidInput(f"{addr.label()} and --from {from_step} name different steps")
        step = addr.step or from_step
        if not step:
            raise InvalidInput(f"retry {address}: name the step as RUN/STEP or with --from STEP")
        run_id = addr.run
        # checked before the reset: a missing secret leaves the run as it was
        opts = None if detach else _resume_opts(store, run_id, workers, lease_ttl, secret_files, secret_stdin)
        reset = retry_from(store, run_id, step)
        if as_json and opts is None:
            echo_json({"run_id": run_id, "reset": reset})
            return
        click.echo(f"reset {len(reset)} step(s): {', '.join(reset)}", err=as_json)
        if opts is not None:
            _drive(as_json, store, url, run_id, opts, None, no_report, extra={"reset": reset})

    @cli.command()
    @click.argument("run_id", metavar="RUN")
    @click.option("--store", "store_url", help=STORE_HELP)
    @json_option
    def cancel(run_id: str, store_url: str | None, as_json: bool) -> None:
        """Cancel RUN: running steps are signalled, nothing new starts."""
        from dagcraft.orchestrator import cancel as cancel_run

        store, _ = _store(store_url, create=False)  # acts on an existing run
        run_id = parse_address(run_id, store, step="forbidden").run
        status = str(cancel_run(store, run_id))
        if as_json:
            echo_json({"run_id": run_id, "status": status})
        else:
            click.echo(f"run {run_id}: {status}")

    @cli.command()
    @click.option("--store", "store_url", help=STORE_HELP)
    @json_option
    def workers(store_url: str | None, as_json: bool) -> None:
        """List registered workers: live or gone, host, pid, runs served, steps running."""
        from dagcraft.orchestrator.registry import describe_workers

        store, url = _store(store_url, create=False)
        items = describe_workers(store)
        if as_json:
            click.echo(json.dumps(items, indent=2, sort_keys=True))
            return
        if not items:
            click.echo(f"no workers registered in {url}")
        for w in items:
            runs = ", ".join(w["runs"]) if w["runs"] else ("every run" if w["only_run"] is None else w["only_run"])
            steps = ", ".join(w["steps"]) or "-"
            click.echo(f"{w['state']:<5} {w['host']:<24} pid {w['pid']:<8} beat {w['beat_age_s']:>6.1f}s ago  "
                       f"runs: {runs}  steps: {steps}")

    @cli.command()
    @click.argument("run_id", metavar="RUN")
    @click.option("--store", "store_url", help=STORE_HELP)
    @workers_opt
    @ttl_opt
    @click.option("--detach", is_flag=True, help="only request it; let running workers do it")
    @secret_options
    @json_option
    def rollback(run_id: str, store_url: str | None, workers: int | None, lease_ttl: float, detach: bool,
                 secret_files: tuple[str, ...], secret_stdin: str | None, as_json: bool) -> None:
        """Run the compensations of RUN's succeeded steps, in reverse order (RUN finished)."""
        from dagcraft.orchestrator import request_rollback

        store, url = _store(store_url, create=False, coordinate=True)  # acts on an existing run
        run_id = parse_address(run_id, store, step="forbidden").run
        opts = None if detach else _resume_opts(store, run_id, workers, lease_ttl, secret_files, secret_stdin)
        status = str(request_rollback(store, run_id))
        if as_json and (opts is None or status != "rolling_back"):
            echo_json({"run_id": run_id, "status": status})
            return
        click.echo(f"run {run_id}: {status}", err=as_json)
        if opts is not None and status == "rolling_back":
            _drive(as_json, store, url, run_id, opts, None, True)


def _resume_env() -> dict[str, str]:
    # secret params are not in the store: a resume passes on whatever this shell provides
    return {k: v for k, v in os.environ.items() if k.startswith("DAGCRAFT_PARAM_")}


def _secs(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}s"


def _iterations(lp: dict[str, Any]) -> str:
    """A loop in words: how far it got and what its ``until`` said last."""
    until = "" if lp["until"] is None else f", until {str(lp['until']).lower()}"
    return f"iteration {lp['iterations']} of max {lp['max_iterations']}{until}"


def _children(s: dict[str, Any]) -> str:
    cc = s["children_counts"]
    n = sum(cc.values())
    rest = ", ".join(f"{v} {k}" for k, v in sorted(cc.items()) if k != "succeeded")
    return f"{cc.get('succeeded', 0)} of {n} succeeded" + (f" ({rest})" if rest else "") + \
        f" in {_secs(s['duration_s'])}"


def _failure_lines(s: dict[str, Any], indent: str = "  ") -> list[str]:
    """A failed step explained: the reason in words, its stderr's last lines, where to see more."""
    lines = [f"{indent}failed: {s['step']} (attempt {s['attempt']}): {printable(s['reason'] or '')}"]
    if s.get("stderr_tail"):
        lines.append(f"{indent}  stderr (last lines):")
        lines += [f"{indent}  | {printable(ln)}" for ln in s["stderr_tail"].splitlines()]
    if s.get("more"):
        lines.append(f"{indent}  more: {s['more']}")
    return lines


def _print_status(st: dict[str, Any]) -> None:
    click.echo(f"run {st['run_id']} ({st['name']}): {st['status']} in {_secs(st['duration_s'])}"
               + (f" — {printable(st['reason'])}" if st["reason"] else ""))
    if st.get("stalled"):
        click.echo(f"  stalled: {st['stalled']} serves this run (start one: dagcraft worker --run {st['run_id']})")
    for s in st["steps"]:
        indent = "    " if s.get("parent") else "  "
        extra = []
        if s["attempt"]:
            extra.append(f"attempt {s['attempt']}")
        if s.get("loop"):
            extra.append(_iterations(s["loop"]))
        elif s.get("children_counts"):
            extra.append(_children(s))
        if s.get("iteration"):
            extra.append(f"iteration {s['iteration']}")
        if s["cached_from"]:
            extra.append(f"cached from {s['cached_from']}")
        if s["reason"] and s["status"] not in ("succeeded",):
            extra.append(printable(s["reason"]))
        dur = _secs(s["duration_s"]) if s["duration_s"] is not None else ""
        worker = (s["worker"] or "")[-24:]
        click.echo(f"{indent}{s['step']:<40} {s['status']:<12} {dur:>7} {worker:<24} {'; '.join(extra)}".rstrip())
    for line in _spend_lines(st.get("budget")):
        click.echo(line)
    failed = [s for s in st["steps"] if s["status"] == "failed" and not s.get("children")]
    if failed:
        click.echo("")
    for s in failed:
        for line in _failure_lines(s):
            click.echo(line)


def _spend_lines(b: dict[str, Any] | None) -> list[str]:
    """Spend against the limits (``status``'s ``budget``): the run, then per agent and step."""
    if not b or not (b["attempts"] or any(b["run"][k] is not None for k in ("limit_usd", "limit_tokens"))):
        return []

    def fmt(row: dict[str, Any]) -> str:
        usd = f"${row['usd']:.4f}" + (f" of ${row['limit_usd']:.4f}" if row["limit_usd"] is not None else "")
        tok = f"{row['tokens']:,} tokens" + (f" of {int(row['limit_tokens']):,}" if row["limit_tokens"] is not None
                                              else "")
        return f"{usd}, {tok}"

    lines = ["", f"spend: {fmt(b['run'])}"]
    lines += [f"  agent {name:<34} {fmt(row)}" for name, row in b["agents"].items()]
    lines += [f"  step  {name:<34} {fmt(row)}" for name, row in b["steps"].items()]
    return lines


__all__ = ["Failed", "register"]
