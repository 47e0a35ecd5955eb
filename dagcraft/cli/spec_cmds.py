"""``dagcraft validate | graph | schema``: thin wrappers over dagcraft.workflows."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dagcraft.cli.run_cmds import compile_with_secrets, secret_options


def _compile(spec: str, params: tuple[str, ...]):
    from dagcraft.workflows import compile_file, parse_params

    return compile_file(Path(spec), parse_params(list(params)))


def register(cli: click.Group) -> None:
    """Add this module's commands to the root group."""

    @cli.command("validate")
    @click.argument("spec", type=click.Path(dir_okay=False))
    @click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE", help="Set a parameter.")
    @secret_options
    def validate(spec: str, params: tuple[str, ...], secret_files: tuple[str, ...], secret_stdin: str | None) -> None:
        """Check a workflow spec (exit 0 if valid, 2 with file:line:col: field: message if not)."""
        wf = compile_with_secrets(spec, params, secret_files, secret_stdin)
        n_fan = sum(1 for s in wf.steps.values() if s.foreach)
        extra = f", {n_fan} foreach" if n_fan else ""
        click.echo(f"ok: {wf.name}: {len(wf.steps)} steps{extra}, spec hash {wf.spec_hash[:12]}")

    @cli.command("graph")
    @click.argument("spec", type=click.Path(dir_okay=False))
    @click.option("--format", "fmt", type=click.Choice(["text", "mermaid", "dot"]), default="text", show_default=True)
    @click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE", help="Set a parameter.")
    def graph(spec: str, fmt: str, params: tuple[str, ...]) -> None:
        """Draw the compiled step DAG (text layers, Mermaid flowchart or Graphviz DOT)."""
        from dagcraft.workflows.graph_render import render

        click.echo(render(_compile(spec, params), fmt), nl=False)

    @cli.command("schema")
    def schema() -> None:
        """Print the JSON Schema of workflow specs (for editors' YAML plugins)."""
        from dagcraft.workflows.spec import spec_json_schema

        click.echo(json.dumps(spec_json_schema(), indent=2, sort_keys=True))
