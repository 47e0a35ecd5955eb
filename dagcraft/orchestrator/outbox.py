"""The outbox: uploads that must land eventually but decide nothing (attempt logs and traces).

An upload is tried at once; when the store is unavailable it is kept (the local file stays in
the attempt's scratch directory) and retried by the worker's loop with exponential backoff
until it lands. Uploads are plain overwrites of keys only their attempt writes, so a retry
is harmless. Guarantee: while the worker lives, every queued upload is retried until it
lands; on a clean exit the worker tries the queue once more and logs what is left.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dagcraft.errors import DagcraftError, StoreUnavailable
from dagcraft.primitives.store import Store

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    key: str
    path: Path
    tries: int = 0
    next_at: float = 0.0


class Outbox:
    def __init__(self, store: Store, *, first_wait_s: float = 0.5, max_wait_s: float = 10.0) -> None:
        self.store = store
        self.first_wait_s = first_wait_s
        self.max_wait_s = max_wait_s
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def upload(self, key: str, path: Path) -> bool:
        """Upload ``path`` to ``key`` now; on a store outage queue it. True when it landed."""
        item = _Pending(key, path)
        if self._try(item):
            return True
        with self._lock:
            self._pending[key] = item
        return False

    def flush(self, *, force: bool = False) -> int:
        """Retry the queued uploads that are due (all of them with ``force``); returns how
        many are still queued."""
        now = time.monotonic()
        with self._lock:
            due = [p for p in self._pending.values() if force or p.next_at <= now]
        for item in due:
            if self._try(item):
                with self._lock:
                    if self._pending.get(item.key) is item:
                        del self._pending[item.key]
        return len(self)

    def _try(self, item: _Pending) -> bool:
        try:
            self.store.put_file(item.key, item.path)
            return True
        except StoreUnavailable as exc:
            item.tries += 1
            item.next_at = time.monotonic() + min(self.max_wait_s, self.first_wait_s * 2 ** min(item.tries, 10))
            if item.tries in (1, 10) or item.tries % 100 == 0:
                log.warning("upload of %s failed (try %d), will retry: %s", item.key, item.tries, exc)
            return False
        except (DagcraftError, OSError) as exc:
            log.error("upload of %s abandoned: %s", item.key, exc)
            return True  # the file is gone or the key invalid: retrying cannot help
