"""What a local-store state write costs on the filesystem of DIR: write 500 bytes to a temp file,
fsync it (or not), rename it over one of 50 existing files. Prints wall and CPU per write;
asserts nothing (never part of the test suite).

    python bench/fs_replace.py DIR [--writes 1000]

On ext4 without a journal mounted with ``discard`` (the CI machine), renaming over a file whose
block was written out frees that block and issues a discard to the device; on tmpfs the same
write costs microseconds. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(d: str, n: int, fsync: bool) -> tuple[float, float]:
    """(wall µs, CPU µs) per write."""
    t, c = time.perf_counter(), _cpu()
    for i in range(n):
        tmp = f"{d}/tmp{i}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"x" * 500)
        if fsync:
            os.fsync(fd)
        os.close(fd)
        os.replace(tmp, f"{d}/t{i % 50}")
    return (time.perf_counter() - t) / n * 1e6, (_cpu() - c) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--writes", type=int, default=1000)
    args = ap.parse_args()
    d = tempfile.mkdtemp(dir=args.dir)
    try:
        for i in range(50):
            with open(f"{d}/t{i}", "wb") as f:
                f.write(b"x" * 500)
                f.flush()
                os.fsync(f.fileno())
        for fsync in (True, False):
            wall, cpu = measure(d, args.writes, fsync)
            print(f"{args.dir}: write + {'fsync + ' if fsync else ''}rename over: {wall:.0f} µs wall, {cpu:.0f} µs CPU")
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
