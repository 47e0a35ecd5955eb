"""``dagcraft validate | graph | schema``: thin wrappers over dagcraft.workflows."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dagcraft.cli.common import echo_json, json_option
from dagcraft.cli.run_cmds import compile_with_secrets, secret_options
from dagcraft.errors import DagcraftError, SpecError


def _compile(spec: str, params: tuple[str, ...]):
    from dagcraft.workflows import compile_file, parse_params

    return compile_file(Path(spec), parse_params(list(params)))


def register(cli: click.Group) -> None:
    """Add this module's commands to the root group."""

    @cli.command("validate")
    @click.argument("spec", type=click.Path(dir_okay=False))
    @click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE", help="Set a parameter.")
    @secret_options
    @json_option
    def validate(spec: str, params: tuple[str, ...], secret_files: tuple[str, ...], secret_stdin: str | None,
                 as_json: bool) -> None:
        """Check the workflow spec SPEC. Exit 0 if valid, 2 if not, with every error found, one
        line each (file:line:col: field: message, in file order); with --json the verdict and
        the list of errors are a JSON object on stdout. Warns (exit still 0) about agent and
        run executables that are not on PATH."""
        from dagcraft.workflows import executable_warnings, load_spec
        from dagcraft.workflows.loader import error_record, spec_errors

        try:
            wf = compile_with_secrets(spec, params, secret_files, secret_stdin)
        except DagcraftError as exc:
            if as_json:
                errors = spec_errors(exc) if isinstance(exc, SpecError) else []
                echo_json({"ok": False, "spec": spec, "error": str(exc),
                           "errors": [error_record(e) for e in errors]})
            raise
        warnings = executable_warnings(load_spec(Path(spec)))
        for w in warnings:
            click.echo(f"dagcraft: warning: {w}", err=True)
        n_fan = sum(1 for s in wf.steps.values() if s.foreach)
        if as_json:
            echo_json({"ok": True, "spec": spec, "name": wf.name, "steps": len(wf.steps), "foreach": n_fan,
                       "spec_hash": wf.spec_hash, "warnings": warnings})
            return
        extra = f", {n_fan} foreach" if n_fan else ""
        click.echo(f"ok: {wf.name}: {len(wf.steps)} steps{extra}, spec hash {wf.spec_hash[:12]}")

    @cli.command("graph")
    @click.argument("spec", type=click.Path(dir_okay=False))
    @click.option("--format", "fmt", type=click.Choice(["text", "mermaid", "dot", "svg"]), default="text",
                  show_default=True, help="Drawing format (svg: a standalone picture, no external resources).")
    @click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE", help="Set a parameter.")
    @json_option
    def graph(spec: str, fmt: str, params: tuple[str, ...], as_json: bool) -> None:
        """Draw SPEC's step DAG (text, Mermaid, DOT or SVG). Text lists layers, Mermaid is a
        flowchart, DOT is for Graphviz, SVG is a picture (layers left to right); --json gives
        nodes and edges (an edge [a, b] means b needs a)."""
        from dagcraft.workflows.graph_render import render

        wf = _compile(spec, params)
        if as_json:
            order = {sid: i for i, sid in enumerate(wf.steps)}
            edges = sorted(([a, b] for a, b in wf.graph().edges), key=lambda e: (order[e[1]], order[e[0]]))
            echo_json({"name": wf.name, "edges": edges, "nodes": [
                {"id": sid, "needs": list(st.needs), "agent": st.agent, "foreach": st.foreach,
                 "finally": st.is_finally, "rollback": st.rollback is not None} for sid, st in wf.steps.items()]})
            return
        click.echo(render(wf, fmt), nl=False)

    @cli.command("schema")
    def schema() -> None:
        """Print the JSON Schema of workflow specs (for editors' YAML plugins)."""
        from dagcraft.workflows.spec import spec_json_schema

        click.echo(json.dumps(spec_json_schema(), indent=2, sort_keys=True))
