"""The outbox: uploads that must land eventually but decide nothing (attempt logs and traces).

An upload is tried at once; when the store is unavailable it is queued — a copy of the file and
a small JSON note in this host's scratch directory (private: 0700) — and retried with exponential backoff by
the worker's loop until it lands. Any later worker on the same host and store picks queued
notes up, so an upload survives its worker's exit or crash as long as the scratch directory
does; the queue owns its copy, so the attempt's own scratch directory can be removed at once.
Uploads are plain overwrites of keys only their attempt writes: a retry is harmless.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dagcraft.errors import DagcraftError, StoreUnavailable
from dagcraft.orchestrator.scratch import private_dir
from dagcraft.primitives.store import Store

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    key: str
    path: Path
    note: Path
    #: the file is handed over (see Store.put_file): our queued copies always are
    consume: bool = False
    tries: int = 0
    next_at: float = 0.0


class Outbox:
    def __init__(self, store: Store, directory: Path, *, first_wait_s: float = 0.5, max_wait_s: float = 10.0) -> None:
        self.store = store
        # one queue per store, shared by the workers of this host
        self.root = directory
        self.dir = directory / hashlib.sha256(store.url.encode()).hexdigest()[:16]
        self.first_wait_s = first_wait_s
        self.max_wait_s = max_wait_s
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._adopt()

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def _adopt(self) -> None:
        """Take over uploads queued by earlier workers of this host."""
        if not self.dir.is_dir():
            return
        for note in sorted(self.dir.glob("*.json")):
            try:
                data = json.loads(note.read_text())
                item = _Pending(str(data["key"]), Path(data["path"]), note, consume=True)
            except (OSError, ValueError, KeyError):
                continue
            with self._lock:
                self._pending.setdefault(item.key, item)

    def upload(self, key: str, path: Path, *, consume: bool = False) -> bool:
        """Upload ``path`` to ``key`` now; on a store outage queue a copy of it (the caller may
        delete ``path`` as soon as this returns). True when it landed. ``consume``: the caller
        will not change ``path`` again (the store may take the file itself, see put_file)."""
        name = hashlib.sha256(key.encode()).hexdigest()[:32]
        note = self.dir / (name + ".json")
        item = _Pending(key, path, note, consume=consume)
        if self._try(item):
            return True
        try:
            private_dir(self.dir, self.root)
            copy = self.dir / (name + ".data")
            shutil.copyfile(path, copy)
            item.path, item.consume = copy, True
            tmp = note.with_suffix(".tmp")
            tmp.write_text(json.dumps({"key": key, "path": str(copy)}))
            tmp.replace(note)  # a note always names a complete copy
        except OSError as exc:
            log.error("cannot queue the upload of %s: %s", key, exc)
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
                item.note.unlink(missing_ok=True)
                if item.path.parent == self.dir:
                    item.path.unlink(missing_ok=True)  # our copy
        return len(self)

    def drain(self, limit_s: float) -> int:
        """Flush until the queue is empty or ``limit_s`` passed (a worker about to exit)."""
        deadline = time.monotonic() + limit_s
        while self.flush(force=True) and time.monotonic() < deadline:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        return len(self)

    def _try(self, item: _Pending) -> bool:
        try:
            self.store.put_file(item.key, item.path, consume=item.consume)
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
