"""``dagcraft trace …``: summary, inspect, verify, render, ledger, ingest, policy-check, exec,
export. Thin: parsing and printing only; the work is in :mod:`dagcraft.tracing`.

TARGET is a trace file; when it is not an existing path it names ``RUN``, ``RUN/STEP`` or
``RUN/STEP/ATTEMPT`` in the store (``--store``, else ``$DAGCRAFT_STORE``, else ``.dagcraft``),
also spelled ``RUN STEP [ATTEMPT]``, with ``@latest`` for RUN (``dagcraft.cli.common``), and is
looked up through ``dagcraft.orchestrator.report`` (imported lazily: CLI start-up stays fast).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from dagcraft.errors import DagcraftError, Failed, InvalidInput, NotFound

STORE_HELP = "Store URL for RUN[/STEP] targets (default $DAGCRAFT_STORE, else .dagcraft)."


def _target_arg(f: Any) -> Any:
    return click.argument("target_parts", nargs=-1, required=True, metavar="TARGET")(f)


def _target(parts: tuple[str, ...], store_url: str | None) -> str:
    """A trace file path as given, or the canonical ``RUN[/STEP[/ATTEMPT]]`` it addresses
    (``@latest`` resolved): the one addressing rule of every command, see cli.common."""
    if len(parts) == 1:
        t = parts[0]
        if _is_file_target(t) or t.endswith(".jsonl") or os.sep in t and t.startswith((".", os.sep)):
            return t
    from dagcraft.cli.common import parse_address

    return parse_address(parts, _store(store_url), attempt=True).label()


def _report():
    try:
        from dagcraft.orchestrator import report
    except ImportError as exc:
        raise NotFound(f"run lookup in a store is not available ({exc}); pass a trace file") from None
    return report


def _store(url: str | None):
    from dagcraft.primitives import open_store

    return open_store(url, create=False)  # read-only: a mistyped path creates nothing


def _is_file_target(target: str) -> bool:
    return Path(target).exists()


@contextlib.contextmanager
def _traces(target: str, store_url: str | None) -> Iterator[list[tuple[str, Path]]]:
    """(label, local path) of each trace TARGET names. A trace file is its own label; traces
    of RUN[/STEP[/ATTEMPT]] (or ``@all``) are downloaded to a temporary directory, removed on
    exit, and labelled ``RUN/STEP/ATTEMPT``."""
    p = Path(target)
    if p.is_dir():
        raise InvalidInput(f"{target} is a directory; pass a trace file (or use `dagcraft trace ledger`)")
    if p.exists():
        yield [(target, p)]
        return
    if target.endswith(".jsonl") or os.sep in target and target.startswith((".", os.sep)):
        raise NotFound(f"trace file not found: {target}")
    report = _report()
    store = _store(store_url)
    with tempfile.TemporaryDirectory(prefix="dagcraft-traces-") as tmp:
        root = Path(tmp)
        dest = root if target == "@all" else root / target.split("/", 1)[0]
        paths = report.resolve_traces(store, target, dest)
        yield [(q.parent.relative_to(root).as_posix(), q) for q in paths]


def _run_view(target: str, store_url: str | None):
    parts = target.split("/")
    view = _report().report_view(_store(store_url), parts[0])
    if len(parts) > 1:
        steps = [s for s in view.steps if s.step_id == parts[1]]
        if not steps:
            raise NotFound(f"run {parts[0]} has no step {parts[1]!r}")
        if len(parts) > 2:
            steps[0].attempts = [a for a in steps[0].attempts if str(a.attempt) == parts[2]]
        view.steps = steps
    return view


def _load(path: Path):
    from dagcraft.tracing import read_trace

    return read_trace(path)


def _dump(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def register(cli: click.Group) -> None:
    """Add the ``trace`` group to the root group."""

    @cli.group("trace")
    def trace() -> None:
        """Audit step traces: summary, inspect, verify, render, ledger, policy, export.

        TARGET is a trace file, or RUN, RUN/STEP or RUN/STEP/ATTEMPT in the store (also spelled
        RUN STEP [ATTEMPT]; RUN may be @latest)."""

    @trace.command("summary")
    @_target_arg
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @click.option("--store", "store_url", default=None, help=STORE_HELP)
    def summary_cmd(target_parts: tuple[str, ...], as_json: bool, store_url: str | None) -> None:
        """Run id, status, events, model calls, tokens, cost, tool calls, failures, errors, duration
        of TARGET's traces, and their total when there are several (a run's attempts; with
        --json {"traces": [...], "total": {...}}). TARGET: see `dagcraft trace --help`."""
        from dagcraft.tracing.summary import fmt_dur, summarize, summarize_total

        results = []
        with _traces(_target(target_parts, store_url), store_url) as traces:
            for label, p in traces:
                s = summarize(_load(p))
                s["path"] = label
                results.append(s)
        total = summarize_total(results) if len(results) > 1 else None
        if as_json:
            _dump(results[0] if total is None else {"traces": results, "total": total})
            return
        for s in results + ([total] if total else []):
            if total is not None:
                click.echo(f"== {s.get('path', 'total')}")
            cost = f"${s['cost_usd']:.4f}" if s["cost_usd"] is not None else "—"
            rows = [("run", s["run_id"])]
            if s is total:
                rows += [("traces", s["traces"]), ("statuses", ", ".join(f"{n} {k}" for k, n in s["statuses"].items()))]
            else:
                rows.append(("status", s["status"]))
            rows += [("events", s["events"]),
                     ("model calls", s["model_calls"]), ("tokens", f"{s['tokens_in']} in / {s['tokens_out']} out"),
                     ("cost", cost), ("tool calls", s["tool_calls"]), ("failures", s["failures"]),
                     ("errors", s["errors"]), ("redactions", s["redactions"]), ("duration", fmt_dur(s["duration_ms"]))]
            for k, v in rows:
                click.echo(f"{k:<12} {v}")

    @trace.command("inspect")
    @_target_arg
    @click.option("--kind", "kinds", multiple=True, help="Only these kinds (repeatable; 'tool' matches tool.*).")
    @click.option("--json", "as_json", is_flag=True, help="Print the events as JSON lines.")
    @click.option("--store", "store_url", default=None, help=STORE_HELP)
    def inspect_cmd(target_parts: tuple[str, ...], kinds: tuple[str, ...], as_json: bool, store_url: str | None) -> None:
        """One aligned line per event of TARGET's traces (see `dagcraft trace --help`)."""
        from dagcraft.tracing.summary import describe, fmt_dur

        def want(k: str) -> bool:
            return not kinds or any(k == x or k.startswith(x.rstrip(".") + ".") for x in kinds)

        with _traces(_target(target_parts, store_url), store_url) as traces:
            loaded = [(label, _load(p)) for label, p in traces]
        for label, evs in loaded:
            if len(loaded) > 1 and not as_json:
                click.echo(f"== {label}")
            t0 = evs[0].ts_ms if evs else 0
            for e in evs:
                if not want(e.kind):
                    continue
                if as_json:
                    click.echo(json.dumps(e.model_dump(), default=str))
                else:
                    desc = describe(e).replace("\n", " ")
                    click.echo(f"{e.seq:>6}  {'+' + fmt_dur(e.ts_ms - t0):>10}  {e.kind:<22} {desc}")

    @trace.command("verify")
    @_target_arg
    @click.option("--allow-open", is_flag=True,
                  help="Accept a trace without run.finished, or a run not finished (still running).")
    @click.option("--public-key", "public_key", type=click.Path(dir_okay=False), default=None,
                  help="Ed25519 public key (PEM): the run's seal must carry a valid signature by it.")
    @click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
    @click.option("--store", "store_url", default=None, help=STORE_HELP)
    def verify_cmd(target_parts: tuple[str, ...], allow_open: bool, public_key: str | None, as_json: bool,
                   store_url: str | None) -> None:
        """Check TARGET: a trace file's hash chain, or a run's traces against the heads their
        commits pinned and the run's seal (and signature, with --public-key). Exit 0 ok, 1 any
        failure (the status says which: see docs/traces.md), 2 bad input, 4 not found."""
        from dagcraft.tracing import verify
        from dagcraft.tracing.seal import load_public_key

        target = _target(target_parts, store_url)
        if _is_file_target(target) or target.endswith(".jsonl"):
            if public_key is not None:
                raise InvalidInput("--public-key checks a run's seal: pass RUN[/STEP[/ATTEMPT]], not a file")
            with _traces(target, store_url) as traces:
                [(label, path)] = traces
                rep = verify(path, allow_open=allow_open)
            rep.path = label
            if as_json:
                _dump(rep.model_dump(mode="json"))
            else:
                click.echo(rep.message())
            ok = rep.ok
        else:
            key = load_public_key(public_key) if public_key is not None else None
            run = _report().verify_sealed(_store(store_url), target, public_key=key, allow_open=allow_open)
            if as_json:
                _dump(run.model_dump(mode="json"))
            else:
                for r in run.traces:
                    click.echo(r.message())
                click.echo(run.seal_message())
            ok = run.ok
        if not ok:
            sys.exit(1)

    @trace.command("keygen")
    @click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
                  help="Private key file to create (mode 0600); the public key goes to OUT.pub.")
    @click.option("--json", "as_json", is_flag=True, help="Print the key id and both paths as JSON.")
    def keygen_cmd(out: Path, as_json: bool) -> None:
        """Create an Ed25519 key pair for signing run seals (`run --signing-key OUT`,
        `trace verify --public-key OUT.pub`)."""
        from dagcraft.tracing.seal import generate_key

        pub = out.with_name(out.name + ".pub")
        kid = generate_key(out, pub)
        if as_json:
            _dump({"key_id": kid, "private": str(out), "public": str(pub)})
            return
        click.echo(f"key {kid}: private {out} (keep it off the store), public {pub}")

    @trace.command("render")
    @_target_arg
    @click.option("--html", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
                  help="Output HTML file.")
    @click.option("--title", default=None, help="Page title (single trace).")
    @click.option("--store", "store_url", default=None, help=STORE_HELP)
    @click.option("--json", "as_json", is_flag=True, help="Print {\"path\": OUT} as JSON.")
    def render_cmd(target_parts: tuple[str, ...], out: Path, title: str | None, store_url: str | None,
                   as_json: bool) -> None:
        """Write a self-contained HTML report of TARGET: a trace file, or RUN[/STEP] in the store."""
        from dagcraft.tracing.render import render_run_html, render_trace_html

        target = _target(target_parts, store_url)
        if _is_file_target(target):
            html = render_trace_html(_load(Path(target)), title=title or Path(target).name)
        else:
            html = render_run_html(_run_view(target, store_url))
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(html, encoding="utf-8")
        except OSError as exc:
            raise InvalidInput(f"cannot write {out}: {exc.strerror}") from None
        _dump({"path": str(out)}) if as_json else click.echo(str(out))

    @trace.command("ledger")
    @click.argument("directory", required=False)
    @click.option("--status", default=None, help="Only traces with this status.")
    @click.option("--since", default=None, help="Only traces started since (2h, 7d, 2025-01-31, epoch ms).")
    @click.option("--step", default=None, help="Only this step (exact or glob).")
    @click.option("--text", default=None, help="Only traces containing this text.")
    @click.option("--rebuild", is_flag=True, help="Ignore the cached index and re-read every trace.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @click.option("--store", "store_url", default=None, help=STORE_HELP)
    @click.option("--all-runs", is_flag=True, help="Catalog every run in the store.")
    def ledger_cmd(directory: str | None, status: str | None, since: str | None, step: str | None,
                   text: str | None, rebuild: bool, as_json: bool, store_url: str | None, all_runs: bool) -> None:
        """Catalog the traces in DIRECTORY (recursively), of a RUN in the store given in its
        place (RUN may be @latest), or of every run in the store (--all-runs)."""
        from dagcraft.tracing.ledger import build_ledger, filter_entries, parse_since
        from dagcraft.tracing.summary import fmt_dur

        since_ms = parse_since(since) if since else None
        target = "@all" if all_runs else (directory or ".")
        if not all_runs and not Path(target).exists():
            target = _target((target,), store_url)
        root = Path(target)
        with contextlib.ExitStack() as stack:
            save = True
            if all_runs or not root.is_dir():
                if root.exists() and not all_runs:
                    raise InvalidInput(f"{target} is a file; the ledger catalogs a directory")
                label, first = stack.enter_context(_traces(target, store_url))[0]
                root = first.parents[len(Path(label).parts)]  # the download directory
                save = False  # a temporary directory: nothing to cache
            entries = filter_entries(build_ledger(root, rebuild=rebuild, save=save), root, status=status,
                                     since_ms=since_ms, step=step, text=text)
        if as_json:
            _dump([e.model_dump() for e in entries])
            return
        if not entries:
            click.echo("no traces match")
            return
        w = max(len(e.path) for e in entries)
        click.echo(f"{'PATH':<{w}}  {'RUN':<26}  {'STEP':<20}  {'STATUS':<10}  {'EVENTS':>6}  {'DURATION':>9}  INTEGRITY")
        for e in entries:
            dur = fmt_dur(e.finished_ms - e.started_ms) if e.finished_ms and e.started_ms else "—"
            click.echo(f"{e.path:<{w}}  {(e.run_id or '—')[:26]:<26}  {(e.step or '—')[:20]:<20}  {e.status[:10]:<10}  "
                       f"{e.events:>6}  {dur:>9}  {e.integrity}")

    @trace.command("policy-check")
    @_target_arg
    @click.option("--sensitive", multiple=True, help="Capability needing a recorded allow (repeatable).")
    @click.option("--no-defaults", is_flag=True, help="Do not include the default sensitive capabilities.")
    @click.option("--json", "as_json", is_flag=True, help="Print violations as JSON.")
    @click.option("--store", "store_url", default=None, help=STORE_HELP)
    def policy_cmd(target_parts: tuple[str, ...], sensitive: tuple[str, ...], no_defaults: bool, as_json: bool,
                   store_url: str | None) -> None:
        """Unresolved permission denies and sensitive capabilities used without an allow in
        TARGET's traces (exit 1). TARGET: see `dagcraft trace --help`."""
        from dagcraft.tracing.policy import DEFAULT_SENSITIVE, check

        caps = list(sensitive) + ([] if no_defaults else list(DEFAULT_SENSITIVE))
        violations = []
        with _traces(_target(target_parts, store_url), store_url) as traces:
            for label, p in traces:
                violations += check(_load(p), caps, source=label)
        if as_json:
            _dump({"ok": not violations, "sensitive": caps, "violations": [v.model_dump() for v in violations]})
        elif violations:
            for v in violations:
                click.echo(f"{v.source}: {v.rule}: {v.message}")
        else:
            click.echo("ok: no policy violations")
        if violations:
            sys.exit(1)

    @trace.command("ingest")
    @click.option("--file", "file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="Trace file to append to (default $DAGCRAFT_TRACE).")
    @click.option("--run-id", default=None, help="Run id for a new trace file (default $DAGCRAFT_RUN_ID).")
    def ingest_cmd(file: Path | None, run_id: str | None) -> None:
        """Append an agent hook payload (JSON on stdin) to the step's trace.

        Failures exit 1, never 2: Claude Code reads exit code 2 from a PreToolUse hook as
        "block this tool call", and a tracing problem must not block the agent.
        """
        try:
            _ingest(file, run_id)
        except DagcraftError as exc:
            raise Failed(f"trace ingest: {exc}") from None

    @trace.command("exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
    @click.option("--file", "file", type=click.Path(dir_okay=False, path_type=Path), required=True,
                  help="Trace file (created, or appended to).")
    @click.option("--run-id", default=None, help="Run id for a new trace (default $DAGCRAFT_RUN_ID or generated).")
    @click.option("--adapter", default="generic", type=click.Choice(["generic", "claude", "codex"]),
                  help="Parse the command's stdout as this agent's JSON stream.")
    @click.option("--timeout", type=float, default=None, help="Seconds before the process group is stopped.")
    @click.option("--grace", type=float, default=5.0, show_default=True, help="Seconds between TERM and KILL.")
    @click.option("--shell", is_flag=True, help="Run CMD as one shell string (sh -c).")
    @click.option("--stdout-log", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="Full stdout log file (default: next to the trace, .stdout.log).")
    @click.option("--stderr-log", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="Full stderr log file (default: next to the trace, .stderr.log).")
    @click.option("--secret-env", multiple=True, help="Redact the value of this environment variable (repeatable).")
    @click.option("--quiet", is_flag=True, help="Do not echo the command's output.")
    @click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
    def exec_cmd(file: Path, run_id: str | None, adapter: str, timeout: float | None, grace: float, shell: bool,
                 stdout_log: Path | None, stderr_log: Path | None, secret_env: tuple[str, ...], quiet: bool,
                 cmd: tuple[str, ...]) -> None:
        """Run CMD under a trace; its exit code is passed through (128+N for signal N)."""
        from dagcraft.tracing import Redactor, TraceWriter, traced_exec

        argv = ["sh", "-c", " ".join(cmd)] if shell else list(cmd)
        if timeout is not None and timeout <= 0:
            raise InvalidInput("--timeout must be positive")
        red = Redactor([os.environ[n] for n in secret_env if os.environ.get(n)])
        new = not file.exists() or file.stat().st_size == 0
        rid = run_id or _existing_run_id(file) or os.environ.get("DAGCRAFT_RUN_ID") or _new_run_id()
        with TraceWriter(file, rid, redactor=red) as w:
            if new:
                w.append("run.started", {"command": argv, "cwd": os.getcwd(), "source": "dagcraft trace exec"})
            base = str(file)[:-6] if str(file).endswith(".jsonl") else str(file)
            res = traced_exec(argv, writer=w, stdout_log=stdout_log or Path(base + ".stdout.log"),
                              stderr_log=stderr_log or Path(base + ".stderr.log"), timeout=timeout,
                              adapter=adapter, echo=not quiet, grace=grace)
            if new:
                w.append("run.finished", {"status": "succeeded" if res.success else "failed",
                                          "exit_code": res.exit_code, "signal": res.signal,
                                          "timed_out": res.timed_out})
        if res.error:
            click.echo(f"dagcraft: {res.error}", err=True)
        sys.exit(res.shell_exit_code)

    @trace.command("export")
    @_target_arg
    @click.option("--otlp-json", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
                  help="Write OpenTelemetry spans (OTLP/JSON) here ('-' for stdout).")
    @click.option("--store", "store_url", default=None, help=STORE_HELP)
    @click.option("--json", "as_json", is_flag=True, help="Print {\"path\": OUT} as JSON (with --otlp-json FILE).")
    def export_cmd(target_parts: tuple[str, ...], out: Path, store_url: str | None, as_json: bool) -> None:
        """Export TARGET as OpenTelemetry spans: run → step → attempt → tool call. TARGET: see
        `dagcraft trace --help`."""
        from dagcraft.tracing.export import export_run_otlp, export_trace_otlp

        target = _target(target_parts, store_url)
        if _is_file_target(target):
            doc = export_trace_otlp(_load(Path(target)))
        else:
            doc = export_run_otlp(_run_view(target, store_url))
        text = json.dumps(doc, indent=1)
        if str(out) == "-":
            click.echo(text)
            return
        try:
            out.write_text(text + "\n")
        except OSError as exc:
            raise InvalidInput(f"cannot write {out}: {exc.strerror}") from None
        _dump({"path": str(out)}) if as_json else click.echo(str(out))


def _existing_run_id(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            first = f.readline(1 << 20)
        rid = json.loads(first).get("run_id")
        return rid if isinstance(rid, str) else None
    except (OSError, ValueError, AttributeError):
        return None


def _new_run_id() -> str:
    from dagcraft.tracing.event import new_event_id

    return "exec-" + new_event_id()


def _ingest(file: Path | None, run_id: str | None) -> None:
    from dagcraft.tracing import TraceWriter
    from dagcraft.tracing.ingest import map_hook

    target = file or (Path(os.environ["DAGCRAFT_TRACE"]) if os.environ.get("DAGCRAFT_TRACE") else None)
    if target is None:
        raise InvalidInput("no trace file: set $DAGCRAFT_TRACE or pass --file")
    raw = sys.stdin.buffer.read(16 << 20)
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise InvalidInput(f"hook payload on stdin is not JSON ({exc})") from None
    kind, payload = map_hook(data)
    new = not target.exists() or target.stat().st_size == 0
    rid = (_existing_run_id(target) or run_id or os.environ.get("DAGCRAFT_RUN_ID")
           or (data.get("session_id") if isinstance(data, dict) else None) or _new_run_id())
    with TraceWriter(target, str(rid)) as w:
        if new:
            w.append("run.started", {"source": "hook ingest"})
        w.append(kind, payload)
