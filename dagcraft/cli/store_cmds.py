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
        """Prove the store at URL enforces conditional writes (exit 0) or name what it does not (exit 5)."""
        from dagcraft.primitives.check import check_store
        from dagcraft.primitives.url import open_store

        store = open_store(url)
        problems = check_store(store)
        if as_json:
            click.echo(json.dumps({"store": store.url, "ok": not problems, "not_enforced": problems}))
        if problems:
            raise StoreUnavailable(f"store {store.url} does not enforce: {'; '.join(problems)}")
        if not as_json:
            click.echo(f"ok: {store.url} enforces If-None-Match and If-Match conditional writes")
