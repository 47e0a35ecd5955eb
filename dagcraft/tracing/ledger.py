"""Ledger: a catalog of the trace files under a directory (recursively).

The ledger is a cache, never the source of truth: ``.dagcraft-ledger.json`` in the directory
maps each trace's relative path to a summary, keyed by (size, mtime_ns) so only new or changed
files are re-read; delete it (or pass ``rebuild=True``) and it is rebuilt from the traces. It is
written atomically (temp file + rename); if the directory is read-only the catalog is still
returned, just not saved. A file is a trace when it ends in ``.jsonl`` and its first line parses
as a trace event.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import json
import os
import re
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from dagcraft.errors import InvalidInput, NotFound
from dagcraft.tracing.event import parse_line
from dagcraft.tracing.reader import iter_trace, verify
from dagcraft.tracing.summary import summarize

INDEX_NAME = ".dagcraft-ledger.json"
INDEX_VERSION = 1


class LedgerEntry(BaseModel):
    path: str
    size: int
    mtime_ns: int
    run_id: str | None = None
    step: str | None = None
    attempt: int | None = None
    status: str = "unknown"
    integrity: str = "unknown"      # a reader.TraceStatus value (ok, unchained, torn tail, invalid …)
    started_ms: int | None = None
    finished_ms: int | None = None
    events: int = 0
    model_calls: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float | None = None
    tool_calls: int = 0
    failures: int = 0
    errors: int = 0
    problem: str | None = None


def _is_trace(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            first = f.readline(1 << 20)
        parse_line(first.rstrip(b"\n"))
        return True
    except (OSError, ValueError):
        return False


def _entry(root: Path, path: Path, st: os.stat_result) -> LedgerEntry:
    e = LedgerEntry(path=str(path.relative_to(root)), size=st.st_size, mtime_ns=st.st_mtime_ns)
    try:
        evs = list(iter_trace(path))
    except Exception as exc:  # an unreadable trace is catalogued with its problem, not fatal
        e.problem = str(exc)
        e.integrity = "invalid"  # TraceStatus.INVALID
        return e
    s = summarize(evs)
    for k in ("status", "started_ms", "finished_ms", "events", "model_calls", "tokens_in", "tokens_out",
              "cost_usd", "tool_calls", "failures", "errors"):
        setattr(e, k, s[k])
    e.run_id = s["run_id"] if isinstance(s["run_id"], str) else None
    for ev in evs[:10]:
        if ev.kind in ("run.started", "step.claimed"):
            if isinstance(ev.payload.get("step"), str):
                e.step = e.step or ev.payload["step"]
            if isinstance(ev.payload.get("attempt"), int):
                e.attempt = e.attempt or ev.payload["attempt"]
    rep = verify(path, allow_open=True)
    e.integrity = str(rep.status)
    if rep.problems:
        e.problem = rep.problems[0]
    return e


def build_ledger(root: Path | str, *, rebuild: bool = False, save: bool = True) -> list[LedgerEntry]:
    """Catalog every trace under ``root``; reuses unchanged entries from the saved index."""
    root = Path(root)
    if not root.is_dir():
        raise NotFound(f"ledger directory not found: {root}")
    index = root / INDEX_NAME
    old: dict[str, LedgerEntry] = {}
    if index.exists() and not rebuild:
        try:
            data = json.loads(index.read_text())
            if data.get("version") == INDEX_VERSION:
                old = {k: LedgerEntry(**v) for k, v in data.get("entries", {}).items()}
        except (ValueError, TypeError, OSError):
            old = {}  # a damaged cache is simply rebuilt
    entries: dict[str, LedgerEntry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") or d == ".dagcraft")
        for fn in sorted(filenames):
            if not fn.endswith(".jsonl"):
                continue
            p = Path(dirpath) / fn
            try:
                st = p.stat()
            except OSError:
                continue
            rel = str(p.relative_to(root))
            prev = old.get(rel)
            if prev is not None and prev.size == st.st_size and prev.mtime_ns == st.st_mtime_ns:
                entries[rel] = prev
            elif _is_trace(p):
                entries[rel] = _entry(root, p, st)
    if save:
        try:
            fd, tmp = tempfile.mkstemp(prefix=".ledger-", dir=root)
            with os.fdopen(fd, "w") as f:
                json.dump({"version": INDEX_VERSION, "built_ms": int(time.time() * 1000),
                           "entries": {k: v.model_dump() for k, v in entries.items()}}, f)
            os.replace(tmp, index)
        except OSError:
            pass  # read-only directory: the catalog is still correct, just not cached
    return sorted(entries.values(), key=lambda e: (e.started_ms or 0, e.path))


_REL = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")


def parse_since(value: str, now_ms: int | None = None) -> int:
    """``2h``/``30m``/``7d``/``1w`` ago, an ISO date/datetime (UTC if no zone), or epoch ms."""
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    v = value.strip()
    m = _REL.match(v)
    if m:
        mult = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
        return now_ms - int(float(m.group(1)) * mult * 1000)
    if v.isdigit():
        return int(v)
    try:
        d = _dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(f"--since {value!r}: use e.g. 2h, 7d, 2025-01-31, 2025-01-31T12:00 or epoch ms") from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=_dt.timezone.utc)
    return int(d.timestamp() * 1000)


def _contains(path: Path, needle: str) -> bool:
    n = needle.lower().encode("utf-8")
    # JSON lines escape non-ASCII; search the escaped form too
    n2 = json.dumps(needle.lower())[1:-1].encode("ascii")
    with path.open("rb") as f:
        for line in f:
            low = line.lower()
            if n in low or n2 in low:
                return True
    return False


def filter_entries(entries: Iterable[LedgerEntry], root: Path | str, *, status: str | None = None,
                   since_ms: int | None = None, step: str | None = None, text: str | None = None) -> list[LedgerEntry]:
    """Entries matching all given filters (status exact, step exact or glob, text substring)."""
    out = []
    for e in entries:
        if status and e.status != status:
            continue
        if since_ms is not None and (e.started_ms or 0) < since_ms:
            continue
        if step and not (e.step == step or (e.step and fnmatch.fnmatchcase(e.step, step))):
            continue
        if text and not _contains(Path(root) / e.path, text):
            continue
        out.append(e)
    return out


def entry_dict(e: LedgerEntry) -> dict[str, Any]:
    return e.model_dump()
