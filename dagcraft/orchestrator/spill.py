"""Spill: byte strings a process keeps on its local disk instead of in memory.

A worker of a large run keeps per-step data it may need again (a finished step's record, a
status row) but rarely does; held in memory, that grows with the run. A :class:`Spill` keeps
each in one anonymous temp file and hands back a small int to read it with.

Guarantees: the file is created on the first :meth:`Spill.add`, in ``$TMPDIR``, already
unlinked (nothing is left behind, even after ``kill -9``) and readable only by this process's
user; a handle reads back exactly the bytes added until :meth:`Spill.close`; ``add`` and
``get`` are safe from several threads. When the temp file cannot be written (a full disk),
``add`` returns the bytes themselves, so callers lose nothing but the saving. Only what the
store already holds is spilled (records are stored redacted): a spill adds no new copy of a
secret.
"""

from __future__ import annotations

import os
import tempfile
import threading
from typing import IO

#: a handle is (offset << _LEN_BITS) | length
_LEN_BITS = 32
_LEN_MASK = (1 << _LEN_BITS) - 1


class Spill:
    def __init__(self, prefix: str = "dagcraft-spill-") -> None:
        self._prefix = prefix
        self._file: IO[bytes] | None = None
        self._end = 0
        self._lock = threading.Lock()

    def add(self, data: bytes) -> int | bytes:
        """A handle for ``data`` (or ``data`` itself when it cannot be spilled)."""
        if len(data) > _LEN_MASK:
            return data
        with self._lock:
            try:
                if self._file is None:
                    self._file = tempfile.TemporaryFile(prefix=self._prefix)
                fd, at = self._file.fileno(), self._end
                view = memoryview(data)
                while view:
                    view = view[os.pwrite(fd, view, at + len(data) - len(view)):]
            except OSError:
                return data
            self._end += len(data)
        return at << _LEN_BITS | len(data)

    def get(self, handle: int | bytes) -> bytes:
        if isinstance(handle, bytes):
            return handle
        assert self._file is not None, "a handle of another spill"
        at, n = handle >> _LEN_BITS, handle & _LEN_MASK
        return os.pread(self._file.fileno(), n, at)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
                self._end = 0
