"""``dagcraft store check URL``."""

from __future__ import annotations

import json

import click

from dagcraft.errors import StoreUnavailable


def register(cli: click.Group) -> None:
    """Add this module's commands to the root group."""

    @cli.group("store")
    def store_group() -> None:
        """Inspect and check a store."""

    @store_group.command("check")
    @click.argument("url", required=False)
    @click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON.")
    def check(url: str | None, as_json: bool) -> None:
        """Measure what the store at URL does and record it (exit 0), or name the guarantee it lacks (exit 5)."""
        from dagcraft.primitives.check import adaptations, check_store
        from dagcraft.primitives.url import open_store

        store = open_store(url)
        problems, caps = check_store(store)
        adapted = adaptations(caps)
        if as_json:
            click.echo(json.dumps({"store": store.url, "ok": not problems, "missing": problems,
                                   "adapted": adapted, "capabilities": caps.model_dump()}))
        if problems:
            raise StoreUnavailable(f"store {store.url} lacks {'; '.join(problems)}")
        if not as_json:
            click.echo(f"ok: {store.url} enforces conditional create and compare-and-swap"
                       + (f"; dagcraft {'; '.join(adapted)}" if adapted else ""))
