"""The ``dagcraft`` binary. Errors map to exit codes here and only here."""

from __future__ import annotations

import gc
import os
import signal
import sys

import click

from dagcraft.errors import DagcraftError, exit_code_for


class DagcraftGroup(click.Group):
    """A group that turns typed errors into a one-line message and the mapped exit code."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except DagcraftError as exc:
            for line in str(exc).splitlines() or [""]:  # several spec errors: one line each
                click.echo(f"dagcraft: {line}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("dagcraft: interrupted", err=True)
            sys.exit(exit_code_for(KeyboardInterrupt()))


@click.group(cls=DagcraftGroup)
@click.version_option(package_name="dagcraft")
def cli() -> None:
    """dagcraft: run multi-agent pipelines as DAGs on a shared store.

    RUN is a run id, or @latest for the run most recently submitted. A step is RUN/STEP (or
    RUN STEP), an attempt RUN/STEP/ATTEMPT. Every command that prints a result takes --json
    (one JSON document on stdout; progress and warnings go to stderr)."""


def _register() -> None:
    # Each area registers its own commands; a missing area must not break the others.
    from dagcraft.cli import agent_cmds, run_cmds, spec_cmds, store_cmds, trace_cmds

    for mod in (store_cmds, agent_cmds, spec_cmds, trace_cmds, run_cmds):
        mod.register(cli)
    from dagcraft.cli import gate_cmds  # approval gates (issue 10)
    gate_cmds.register(cli)
    from dagcraft.cli import ui_cmds  # the web UI (issue 11)
    ui_cmds.register(cli)


_register()


def main() -> None:
    try:
        cli(prog_name="dagcraft")
    finally:
        # the process is ending: spare the interpreter's exit its full collection over
        # everything still alive (~40 ms after a 10,000-step submit or status)
        gc.freeze()
        # a Ctrl-C while the interpreter shuts down (joining threads) ends it at once, as
        # interrupted, instead of printing a traceback from threading's shutdown
        signal.signal(signal.SIGINT, _exit_interrupted)


def _exit_interrupted(signum: int, frame: object) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(130)


if __name__ == "__main__":
    main()
