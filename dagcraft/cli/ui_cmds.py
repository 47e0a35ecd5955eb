"""``dagcraft ui``: serve the live web UI of a store on this machine."""

from __future__ import annotations

import click

from dagcraft.cli.run_cmds import STORE_HELP, _store


def register(cli: click.Group) -> None:
    @cli.command("ui")
    @click.option("--store", "store_url", help=STORE_HELP)
    @click.option("--host", default="127.0.0.1", show_default=True,
                  help="address to listen on (another than loopback exposes the UI to the network)")
    @click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True,
                  help="port to listen on (0: any free port)")
    @click.option("--workers", type=click.IntRange(1, 256), default=2, show_default=True,
                  help="worker processes started for a run resumed or retried from the UI")
    def ui(store_url: str | None, host: str, port: int, workers: int) -> None:
        """Serve a live web UI of the store's runs: status, DAG, timeline, logs, traces,
        artifacts; cancel, retry and resume. Stop with Ctrl-C."""
        from dagcraft.orchestrator import PoolOptions
        from dagcraft.ui import UiOptions, serve

        store, url = _store(store_url)
        store.list("runs-index/", limit=1)  # an unreachable store stops here (exit 5), before serving
        opts = UiOptions(store_url=url, host=host, port=port, pool=PoolOptions(workers=workers))
        serve(store, opts, on_ready=lambda link: click.echo(f"dagcraft ui: {link} (store {url}); Ctrl-C stops",
                                                            err=False))
