"""The run journal: append-only change notifications that workers read incrementally.

Every step-state or control change is followed by one journal entry whose key alone says what
changed (``<ulid>~<step>``), so a reader needs one LIST per poll plus one GET per changed
record: the cost of finding ready work follows what changed, never the size of the DAG.

Guarantees: entries are immutable and never deleted while the run lives. Entry ids are ULIDs
from the writer's clock, so a slow writer can land an entry that sorts before one a reader
already passed; the reader therefore re-lists a look-back window (default 30 s of ULID time)
and de-duplicates. A writer that crashes between its state CAS and its journal PUT leaves a
change without notification; readers catch it with the periodic full resync.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from dagcraft.orchestrator import layout
from dagcraft.primitives.store import Store
from dagcraft.primitives.ulid import new_ulid, ulid_floor, ulid_time_ms


def append(store: Store, run_id: str, subject: str, rev: int | None = None, status: str | None = None) -> str:
    """Append a notification that ``subject`` (a step id or ``@control``) changed — for a
    step, to version ``rev`` with ``status``."""
    key = layout.journal_entry(run_id, new_ulid(), subject, rev, status)
    store.put(key, b"", if_none_match=True)
    return key


class JournalReader:
    """Reads a run's journal incrementally: each ``poll`` returns the subjects that changed
    since the previous poll (at least once; possibly again, never missed within the window)."""

    def __init__(self, store: Store, run_id: str, lookback_s: float = 30.0, sweep_s: float = 2.0) -> None:
        self.store = store
        self.run_id = run_id
        self.prefix = layout.journal_prefix(run_id)
        self.lookback_ms = int(lookback_s * 1000)
        self.sweep_s = sweep_s
        self._seen: dict[str, int] = {}  # key -> ulid ms, pruned beyond the window
        self._high_ms: int | None = None
        self._high_key: str | None = None
        self._last_sweep = 0.0

    def poll(self) -> list[tuple[str, int | None, str | None]]:
        """Most polls list only past the newest key seen (cost: what is new); every
        ``sweep_s`` a poll re-lists the whole look-back window to catch late landers."""
        start_after = None
        if self._high_ms is not None:
            now = time.monotonic()
            if now - self._last_sweep >= self.sweep_s:
                self._last_sweep = now
                start_after = self.prefix + ulid_floor(self._high_ms - self.lookback_ms)
            else:
                start_after = self._high_key
        keys = self.store.list(self.prefix, start_after=start_after)
        return self._take(keys)

    def mark_seen(self, key: str) -> None:
        """A key this process wrote itself (its change is already applied locally)."""
        ulid = layout.parse_journal_key(key)[0]
        try:
            self._seen[key] = ulid_time_ms(ulid)
        except ValueError:
            pass

    def _take(self, keys: Iterable[str]) -> list[tuple[str, int | None, str | None]]:
        """New entries as (subject, rev, status), one per subject: the highest rev seen (an
        entry without a rev wins, since it asks for a full read)."""
        changed: dict[str, tuple[str, int | None, str | None]] = {}
        for key in keys:
            if key in self._seen:
                continue
            ulid, subject, rev, status = layout.parse_journal_key(key)
            try:
                ms = ulid_time_ms(ulid)
            except ValueError:
                continue  # not a journal entry we wrote
            self._seen[key] = ms
            if self._high_ms is None or ms > self._high_ms:
                self._high_ms = ms
            if self._high_key is None or key > self._high_key:
                self._high_key = key
            prev = changed.get(subject)
            if prev is None or prev[1] is None or rev is None or rev >= prev[1]:
                changed[subject] = (subject, None if (prev is not None and prev[1] is None) else rev, status)
        if self._high_ms is not None and len(self._seen) > 256:
            floor = self._high_ms - self.lookback_ms - 1000
            self._seen = {k: v for k, v in self._seen.items() if v >= floor}
        return list(changed.values())
