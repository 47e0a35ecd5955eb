"""Spill: bytes kept in an anonymous temp file read back exactly; nothing left on disk."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from dagcraft.orchestrator.spill import Spill


def test_bytes_read_back_exactly_from_threads_and_no_file_is_left(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    spill = Spill()
    assert spill._file is None  # made on the first add, not before
    got: dict[bytes, int | bytes] = {}
    lock = threading.Lock()

    def add(k: int) -> None:
        for i in range(200):
            data = f"{k}:{i}|".encode() + b"\x00\xff" * (i % 7)
            h = spill.add(data)
            with lock:
                got[data] = h

    threads = [threading.Thread(target=add, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 800 and all(isinstance(h, int) for h in got.values())
    for data, h in got.items():
        assert spill.get(h) == data
    assert spill.add(b"") != b"" and spill.get(spill.add(b"")) == b""
    assert os.listdir(tmp_path) == []  # unlinked at creation: nothing to clean up after kill -9
    assert spill._file is not None
    st = os.fstat(spill._file.fileno())
    assert st.st_nlink == 0 and st.st_mode & 0o077 == 0  # no name, and this user's alone
    spill.close()
    assert spill._file is None


def test_a_spill_that_cannot_write_keeps_the_bytes(monkeypatch: pytest.MonkeyPatch):
    spill = Spill()
    kept = spill.add(b"kept")

    def full_disk(*_a: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full_disk)
    h = spill.add(b"record")
    assert h == b"record" and spill.get(h) == b"record"  # nothing lost, only the saving
    assert spill.get(kept) == b"kept"  # and what was spilled before still reads back
