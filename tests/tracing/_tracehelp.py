"""Shared helpers for the tracing tests (imported by name; tests dirs have no __init__)."""

from __future__ import annotations

import sys
from pathlib import Path

DATA = Path(__file__).parent / "data"
PY = sys.executable


def make_trace(path: Path, n: int = 5, run_id: str = "run1", finish: bool = True) -> Path:
    from dagcraft.tracing import TraceWriter

    with TraceWriter(path, run_id, fsync=False) as w:
        w.append("run.started", {"name": "t"})
        for i in range(n):
            w.append("tool.call", {"tool": "echo", "i": i})
        if finish:
            w.append("run.finished", {"status": "succeeded"})
    return path
