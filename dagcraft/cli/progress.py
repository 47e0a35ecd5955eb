"""Live progress for ``dagcraft run``: a rich table on a TTY, plain lines otherwise."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from dagcraft.cli.common import console as plain_console
from dagcraft.cli.common import printable

STYLE = {"succeeded": "green", "failed": "bold red", "running": "cyan", "retrying": "yellow",
         "skipped": "dim", "cancelled": "magenta", "pending": "white", "expanded": "cyan",
         "rolling_back": "yellow", "rolled_back": "magenta"}
TERMINAL = {"succeeded", "failed", "skipped", "cancelled", "rolled_back"}


def _dur(st: Any, now: float) -> str:
    if not st.started_at:
        return ""
    end = st.finished_at or now
    return f"{max(0.0, end - st.started_at):.1f}s"


class Progress:
    def __init__(self, console: Console | None = None) -> None:
        self.console = console or plain_console()  # wraps only on a terminal
        self.tty = self.console.is_terminal
        self.live: Live | None = None
        self.seen: dict[str, tuple[str, int]] = {}
        self.t0 = time.time()

    def __enter__(self) -> Progress:
        if self.tty:
            self.live = Live(console=self.console, refresh_per_second=8, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def update(self, view: Any) -> None:
        if self.live is not None:
            self.live.update(self._render(view))
            return
        for sid in view.all_ids():
            st = view.state(sid)
            key = (st.status, st.attempt)
            if self.seen.get(sid) != key:
                self.seen[sid] = key
                if st.status == "pending" and st.attempt == 0:
                    continue
                extra = f" attempt {st.attempt}" if st.attempt else ""
                why = f" ({printable(st.reason)})" if st.reason and st.status not in ("running", "succeeded") else ""
                self.console.print(f"[{time.strftime('%H:%M:%S')}] {sid}: {st.status}{extra}{why}",
                                   highlight=False, markup=False)

    def _render(self, view: Any) -> Group:
        now = view.store.now()
        table = Table(expand=False, show_edge=False, header_style="bold")
        for col in ("step", "status", "attempt", "worker", "duration"):
            table.add_column(col)
        ids = view.all_ids()
        for sid in ids[:40]:
            st = view.state(sid)
            # Text, not markup: step ids like review[reviewer=security] look like rich tags
            table.add_row(Text(sid), Text(st.status, style=STYLE.get(st.status, "")), str(st.attempt or ""),
                          Text((st.worker or (st.history[-1].worker if st.history else None) or "")[-24:]), _dur(st, now))
        if len(ids) > 40:
            table.add_row(Text(f"… {len(ids) - 40} more"), "", "", "", "")
        counts = view.counts()
        done = sum(v for k, v in counts.items() if k in TERMINAL)
        summary = "  ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        head = Text(f"run {view.run_id}  [{view.control.status}]  {time.time() - self.t0:.1f}s", style="bold")
        return Group(head, table, ProgressBar(total=max(1, len(ids)), completed=done, width=60), Text(summary))
