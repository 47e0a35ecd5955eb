"""Live progress for ``dagcraft run``: a rich table on a TTY, plain lines otherwise.

The table counts what ``status`` and the final summary count: the submitted steps (a foreach
parent is one step; its children are listed under it and summarised on its row), and shows
the run's one duration (:class:`~dagcraft.orchestrator.model.RunTiming`: first claim to
finish, every session of the run), so the last frame agrees with the summary printed after it.
"""

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
from dagcraft.orchestrator.model import TERMINAL, StepState, run_timing
from dagcraft.orchestrator.statusrows import step_span

STYLE = {"succeeded": "green", "failed": "bold red", "running": "cyan", "retrying": "yellow",
         "skipped": "dim", "cancelled": "magenta", "pending": "white", "expanded": "cyan",
         "rolling_back": "yellow", "rolled_back": "magenta", "budget_exceeded": "red"}
MAX_ROWS = 40


def _dur(start: float | None, end: float | None, now: float) -> str:
    if start is None:
        return ""
    return f"{max(0.0, (end or now) - start):.1f}s"


def _children_text(kids: list[Any]) -> str:
    """``2/5 done`` plus the children's statuses, e.g. ``2/5 done (2 succeeded, 3 running)``."""
    counts: dict[str, int] = {}
    for k in kids:
        counts[str(k.status)] = counts.get(str(k.status), 0) + 1
    done = sum(1 for k in kids if k.status in TERMINAL)
    detail = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    return f"{done}/{len(kids)} done" + (f" ({detail})" if detail else "")


def _peek(view: Any, step_id: str) -> StepState:
    # read-only: view.state() would index an unseen id as pending, which the scheduler reads
    got = view.states.get(step_id)
    return got[0] if got else StepState(step_id=step_id)


def snapshot(view: Any) -> dict[str, Any]:
    """What the table shows, from a :class:`~dagcraft.orchestrator.view.LocalView`: ``rows``
    (submitted steps in order, each foreach parent followed by its children, marked
    ``child``), ``counts`` and ``total``/``done`` of the submitted steps only, and the run's
    ``duration_s`` (None before the first claim) and ``queued_s``."""
    now = view.store.now()
    rows: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    total = done = 0
    for sid in view.all_ids():
        st = view.state(sid)
        if st.parent:
            continue  # listed under its parent below
        kids = [_peek(view, c) for c in st.children]
        total += 1
        done += st.status in TERMINAL
        counts[str(st.status)] = counts.get(str(st.status), 0) + 1
        start, end = step_span(st, kids)
        rows.append({"step": sid, "status": str(st.status), "attempt": st.attempt, "child": False,
                     "worker": st.worker or (st.history[-1].worker if st.history else None),
                     "duration": _dur(start, end, now), "children": _children_text(kids) if kids else ""})
        for k in kids:
            kstart, kend = step_span(k)
            rows.append({"step": k.step_id, "status": str(k.status), "attempt": k.attempt, "child": True,
                         "worker": k.worker or (k.history[-1].worker if k.history else None),
                         "duration": _dur(kstart, kend, now), "children": ""})
    states = [view.state(s) for s in view.all_ids()]
    timing = run_timing(view.record, view.control, states, now)
    return {"rows": rows, "counts": counts, "total": total, "done": done,
            "duration_s": timing.duration_s, "queued_s": timing.queued_s}


class Progress:
    def __init__(self, console: Console | None = None) -> None:
        self.console = console or plain_console()  # wraps only on a terminal
        self.tty = self.console.is_terminal
        self.live: Live | None = None
        self.seen: dict[str, tuple[str, int]] = {}  # printed: (status, attempt)
        self._versions: dict[str, tuple[str, int | None]] = {}  # looked at: (status, rev)
        self._changes = -1  # the view's change counter at the last update

    def __enter__(self) -> Progress:
        if self.tty:
            # redrawn by update() (every poll of the pool), never by a refresh thread: the pool
            # forks its workers only while this process has no other thread
            self.live = Live(console=self.console, auto_refresh=False, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def update(self, view: Any) -> None:
        if self.live is not None:
            self.live.update(self.render(view), refresh=True)
            return
        if view.changes == self._changes:  # nothing new since the last poll: no walk of the run
            return
        self._changes = view.changes
        for sid in view.all_ids():
            # a step's status and rev are held without its record: only a step that changed
            # since the last poll is decoded (a walk of 10,000 records per poll was not cheap)
            version = (view.status(sid), view.states.rev(sid))
            if self._versions.get(sid) == version:
                continue
            self._versions[sid] = version
            st = view.state(sid)
            key = (st.status, st.attempt)
            if self.seen.get(sid) == key:
                continue
            self.seen[sid] = key
            if st.status == "pending" and st.attempt == 0:
                continue
            extra = f" attempt {st.attempt}" if st.attempt else ""
            why = f" ({printable(st.reason)})" if st.reason and st.status not in ("running", "succeeded") else ""
            # one plain line each (not a terminal): rich's rendering of it cost ~1 ms a line,
            # the run's pool process's largest CPU cost, and wrapped long lines at 80 columns
            self.console.file.write(f"[{time.strftime('%H:%M:%S')}] {sid}: {st.status}{extra}{why}\n")
        self.console.file.flush()  # whoever follows the log sees each poll's lines at once

    def render(self, view: Any) -> Group:
        """One frame of the live table (see :func:`snapshot`)."""
        snap = snapshot(view)
        table = Table(expand=False, show_edge=False, header_style="bold")
        for col in ("step", "status", "attempt", "worker", "duration"):
            table.add_column(col)
        rows = snap["rows"]
        for row in rows[:MAX_ROWS]:
            status = Text(row["status"], style=STYLE.get(row["status"], ""))
            if row["children"]:
                status.append(f" {row['children']}", style="dim")
            # Text, not markup: step ids like review[reviewer=security] look like rich tags
            table.add_row(Text(("  " if row["child"] else "") + row["step"]), status, str(row["attempt"] or ""),
                          Text((row["worker"] or "")[-24:]), row["duration"])
        if len(rows) > MAX_ROWS:
            table.add_row(Text(f"… {len(rows) - MAX_ROWS} more"), "", "", "", "")
        summary = "  ".join(f"{k}: {v}" for k, v in sorted(snap["counts"].items()))
        if snap["duration_s"] is None:
            when = "waiting for a worker"
        else:
            when = f"{snap['duration_s']:.1f}s"
        head = Text(f"run {view.run_id}  [{view.control.status}]  {when}", style="bold")
        foot = Table.grid(padding=(0, 2))  # the bar and its counts side by side, on their own line
        foot.add_row(ProgressBar(total=max(1, snap["total"]), completed=snap["done"], width=40),
                     Text(f"{snap['done']} of {snap['total']} steps done  {summary}"))
        return Group(head, table, foot)
