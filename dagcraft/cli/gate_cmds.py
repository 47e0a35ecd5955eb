"""``dagcraft approvals``, ``approve RUN STEP``, ``reject RUN STEP``: approval gates."""

from __future__ import annotations

import time

import click

from dagcraft.cli.common import echo_json, json_option, parse_address
from dagcraft.cli.run_cmds import STORE_HELP, _store


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def register(cli: click.Group) -> None:
    """Add this module's commands to the root group."""

    @cli.command()
    @click.option("--store", "store_url", help=STORE_HELP)
    @json_option
    def approvals(store_url: str | None, as_json: bool) -> None:
        """List the approval gates waiting for a decision, across runs."""
        from dagcraft.orchestrator.approval import waiting

        store, _ = _store(store_url, create=False)
        items = waiting(store)
        if as_json:
            echo_json(items)
            return
        if not items:
            click.echo("no approval gates waiting")
        for w in items:
            due = f", {w['on_timeout']} at {_when(w['deadline'])}" if w["deadline"] is not None else ""
            click.echo(f"{w['run_id']}/{w['step']}: {w['prompt'] or '(no prompt)'} (since "
                       f"{_when(w['requested_at'])}{due})\n  {w['approve']}  |  {w['reject']}")

    def _decide_cmd(name: str, approve: bool) -> None:
        @cli.command(name, help=f"{name.capitalize()} the waiting approval gate RUN/STEP (RUN STEP), exactly "
                     "once: a gate already decided is exit 3.")
        @click.argument("address", nargs=-1, required=True, metavar="RUN STEP")
        @click.option("--comment", help="why (recorded with the decision)")
        @click.option("--as", "as_name", help="who decides (default: user@host)")
        @click.option("--store", "store_url", help=STORE_HELP)
        @json_option
        def command(address: tuple[str, ...], comment: str | None, as_name: str | None, store_url: str | None,
                    as_json: bool) -> None:
            from dagcraft.orchestrator.approval import decide

            store, _ = _store(store_url, create=False)
            addr = parse_address(address, store, step="required")
            assert addr.step is not None
            got = decide(store, addr.run, addr.step, approve, by=as_name, comment=comment)
            if as_json:
                echo_json(got)
            else:
                click.echo(f"{addr.run}/{addr.step}: {got['decision']} by {got['decided_by']} (step {got['status']})")

    _decide_cmd("approve", True)
    _decide_cmd("reject", False)
