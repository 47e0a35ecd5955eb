"""``dagcraft status --watch``: the run's status redrawn in place on a TTY (rich Live), the
plain block reprinted every interval otherwise (logs and pipes keep a readable history)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from dagcraft.cli.progress import STYLE

FINISHED = ("succeeded", "failed", "cancelled", "rolled_back", "budget_exceeded")


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


def render(st: dict[str, Any], max_rows: int = 60) -> Group:
    """The status block as a rich renderable: a header and a table of steps (step, status,
    attempt, worker, duration, reason)."""
    head = Text(f"run {st['run_id']} ({st['name']}): ", style="bold")
    head.append(str(st["status"]), style=STYLE.get(str(st["status"]), "bold"))
    if st.get("reason"):
        head.append(f" — {st['reason']}")
    if st.get("stalled"):
        head.append(f"  stalled: {st['stalled']}", style="bold yellow")
    table = Table(expand=False, show_edge=False, header_style="bold")
    for col in ("step", "status", "attempt", "worker", "duration", "reason"):
        table.add_column(col)
    rows = st["steps"]
    for s in rows[:max_rows]:
        # Text, not markup: step ids like review[reviewer=security] look like rich tags
        reason = "" if s["status"] == "succeeded" else (s.get("reason") or "")
        table.add_row(Text(("  " if s.get("parent") else "") + s["step"]),
                      Text(s["status"], style=STYLE.get(s["status"], "")), str(s["attempt"] or ""),
                      Text((s.get("worker") or "")[-32:]), _dur(s.get("duration_s")), Text(reason[:80]))
    if len(rows) > max_rows:
        table.add_row(Text(f"… {len(rows) - max_rows} more"), "", "", "", "", "")
    counts = Text("  ".join(f"{k}: {v}" for k, v in sorted(st["counts"].items())), style="dim")
    return Group(head, table, counts)


def watch(fetch: Callable[[], dict[str, Any]], plain: Callable[[dict[str, Any]], None],
          console: Console | None = None, interval: float = 1.0) -> dict[str, Any]:
    """Show ``fetch()`` every ``interval`` until the run has finished; returns the last status.
    On a TTY the block is updated in place; otherwise ``plain`` prints it, a blank line apart."""
    console = console or Console()
    st = fetch()
    if not console.is_terminal:
        while True:
            plain(st)
            if st["status"] in FINISHED:
                return st
            time.sleep(interval)
            console.file.write("\n")
            st = fetch()
    with Live(render(st), console=console, auto_refresh=False) as live:
        while st["status"] not in FINISHED:
            time.sleep(interval)
            st = fetch()
            live.update(render(st), refresh=True)
    return st
