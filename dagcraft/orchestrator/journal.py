"""The run journal: append-only change notifications that workers read incrementally.

Every step-state or control change is followed by one journal entry whose key alone says what
changed (``<ulid>~<step>``), so a reader needs one LIST per poll plus one GET per changed
record: the cost of finding ready work follows what changed, never the size of the DAG.

Guarantees: entries are immutable and never deleted while the run lives. Entry ids are ULIDs
from the writer's clock, so a slow writer can land an entry that sorts before one a reader
already passed; the reader therefore walks a look-back window (default 30 s of ULID time),
a page per sweep, and de-duplicates. A writer that crashes between its state CAS and its journal PUT leaves a
change without notification; readers catch it with the periodic full resync.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from dagcraft.errors import DagcraftError
from dagcraft.orchestrator import layout
from dagcraft.primitives.store import LIST_PAGE, Store
from dagcraft.primitives.ulid import new_ulid, ulid_floor, ulid_time_ms


def append(store: Store, run_id: str, subject: str, rev: int | None = None, status: str | None = None) -> str:
    """Append a notification that ``subject`` (a step id or ``@control``) changed — for a
    step, to version ``rev`` with ``status``."""
    key = layout.journal_entry(run_id, new_ulid(), subject, rev, status)
    store.put(key, b"", if_none_match=True)
    return key


log = logging.getLogger(__name__)


def index_run(store: Store, run_id: str) -> None:
    """Announce a run to the workers serving every run (a submit, or a resume that reopens
    it): a new ``runs-index/`` entry, then a rewrite of the ``runs-wake`` marker that idle
    workers watch with one GET instead of listing the index (see ``worker.py``). The marker is
    best effort: a worker that misses it still finds the entry at its next full listing."""
    store.put(layout.runs_index_entry(new_ulid(), run_id), b"", if_none_match=True)
    try:
        store.put(layout.RUNS_WAKE, new_ulid().encode())
    except DagcraftError as exc:
        log.warning("workers not woken for run %s (they find it at their next listing): %s", run_id, exc)


class KeyFeed:
    """New keys under a prefix of ``<ulid>…`` names, read incrementally: each ``poll``
    returns the keys not returned before (at least once; never missed within the window).

    Most polls list only past the newest key seen (cost: what is new). An entry lands after
    its writer took its ULID, so a writer slower than another (descheduled, a slow PUT) can
    land a key that sorts before one a reader already passed: every ``settle_every_s`` a poll
    lists from ``settle_s`` ago instead, so such a key is found within that (it waited for the
    next full sweep: a finished run was sealed up to ``sweep_s`` late).

    Every ``sweep_s`` a poll also lists one page (``page`` keys) of the look-back window,
    walking it from its oldest key to its newest and then starting over, so an entry written
    by a host whose clock is behind by more than ``settle_s`` is still found: within
    ``sweep_s`` while the window holds fewer than ``page`` keys, within ``sweep_s`` per page
    of it beyond. A sweep costs one LIST and holds one page whatever the window's size (the
    whole window re-listed every sweep cost a worker one LIST per 1,000 keys every 2 s: per
    step, that grew with the pool's size). An entry that a walk longer than the look-back
    does not reach in time is found by the readers' full resync instead."""

    def __init__(self, store: Store, prefix: str, lookback_s: float = 30.0, sweep_s: float = 2.0,
                 settle_s: float = 1.0, settle_every_s: float = 0.25, page: int = LIST_PAGE) -> None:
        self.store = store
        self.prefix = prefix
        self.lookback_ms = int(lookback_s * 1000)
        self.sweep_s = sweep_s
        self.settle_ms = int(settle_s * 1000)
        self.settle_every_s = settle_every_s
        self.page = max(1, page)
        # the ULIDs of the keys seen in the window (an entry's ULID alone names it: a third of
        # the key's bytes), pruned beyond the window
        self._seen: set[str] = set()
        # the same ULIDs in the order first seen (about time order): pruning pops the old end,
        # so its cost follows what leaves the window, not the window's size; a ULID's order is
        # its time's, so it alone says when it leaves
        self._order: deque[str] = deque()
        self._high_ms: int | None = None
        self._high_key: str | None = None
        self._walk: str | None = None  # where the sweep's next page starts (None: the floor)
        self._last_sweep = 0.0
        self._last_settle = 0.0

    def _ulid(self, key: str) -> str | None:
        """The entry id of ``key`` (the ULID its name starts with), None if it is not an entry."""
        name = key[len(self.prefix):]
        uid = name.split("~", 1)[0]
        try:
            ulid_time_ms(uid)
        except ValueError:
            return None
        return uid if len(uid) == 26 else name

    def poll(self) -> list[str]:
        new: list[str] = []
        if self._high_ms is None or self._high_key is None:
            self._take(self.store.list(self.prefix), new)  # the first poll: from the start
            self._prune()
            return new
        now = time.monotonic()
        start_after = self._high_key
        if now - self._last_sweep >= self.sweep_s:
            self._last_sweep = self._last_settle = now  # a sweep stands for the settle
            floor = self.prefix + ulid_floor(self._high_ms - self.lookback_ms)
            begin = self._walk if self._walk is not None and self._walk > floor else floor
            page = self.store.list(self.prefix, start_after=begin, limit=self.page)
            self._walk = page[-1] if len(page) >= self.page else None
            self._take(page, new)
            if self._walk is None:
                self._prune()  # the page ran to the newest key: nothing after it to list
                return new
        elif now - self._last_settle >= self.settle_every_s:
            self._last_settle = now
            # by this reader's clock, not the newest key's: a writer whose clock is ahead sets
            # the newest key, and a window measured from it hid every other writer's entries
            start_after = min(self._high_key, self.prefix + ulid_floor(int(time.time() * 1000) - self.settle_ms))
        self._take(self.store.list(self.prefix, start_after=start_after), new)
        self._prune()
        return new

    def _take(self, listed: list[str], new: list[str]) -> None:
        """Add the keys of a listing not seen before to ``new``, and move the cursor."""
        seen = self._seen
        p = len(self.prefix)
        last: str | None = None
        for key in listed:
            if key[p:p + 26] in seen and key[p + 26:p + 27] in ("~", ""):
                last = key  # the common case, most of a settle or sweep: seen, and validated then
                continue
            uid = self._ulid(key)
            if uid is None:
                continue  # not an entry we wrote
            last = key
            if uid not in seen:
                self._remember(uid)
                new.append(key)
        # the newest entry listed moves the cursor, seen before or not (this process's own,
        # marked seen): else a lone worker, whose every entry is its own, re-listed the whole
        # journal each poll. Keys list in order, and a key's order is its ULID time's.
        if last is not None:
            ms = ulid_time_ms(last[len(self.prefix):])
            if self._high_ms is None or ms > self._high_ms:
                self._high_ms = ms
            if self._high_key is None or last > self._high_key:
                self._high_key = last

    def _prune(self) -> None:
        if self._high_ms is None:
            return
        floor = ulid_floor(self._high_ms - self.lookback_ms - 1000)
        order, seen = self._order, self._seen
        # an entry first seen late (a slow clock) but old waits behind newer ones: kept a
        # little longer, which only costs memory until they leave the window too
        while order and order[0] < floor:
            seen.discard(order.popleft())

    def _remember(self, uid: str) -> None:
        self._seen.add(uid)
        self._order.append(uid)

    def mark_seen(self, key: str) -> None:
        """A key this process wrote itself (its change is already applied locally)."""
        uid = self._ulid(key)
        if uid is not None and uid not in self._seen:
            self._remember(uid)


class JournalReader:
    """Reads a run's journal incrementally: each ``poll`` returns the subjects that changed
    since the previous poll, as (subject, rev, status), one per subject: the highest rev seen
    (an entry without a rev wins, since it asks for a full read)."""

    def __init__(self, store: Store, run_id: str, lookback_s: float = 30.0, sweep_s: float = 2.0) -> None:
        self.feed = KeyFeed(store, layout.journal_prefix(run_id), lookback_s, sweep_s)
        self.run_id = run_id

    def mark_seen(self, key: str) -> None:
        self.feed.mark_seen(key)

    def poll(self) -> list[tuple[str, int | None, str | None]]:
        changed: dict[str, tuple[str, int | None, str | None]] = {}
        for key in self.feed.poll():
            _, subject, rev, status = layout.parse_journal_key(key)
            prev = changed.get(subject)
            if prev is None or prev[1] is None or rev is None or rev >= prev[1]:
                changed[subject] = (subject, None if (prev is not None and prev[1] is None) else rev, status)
        return list(changed.values())
