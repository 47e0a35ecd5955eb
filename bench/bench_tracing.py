"""Tracing benchmark: append throughput, verify/read throughput on a 100k-event trace, and
traced-exec overhead against a bare ``subprocess.run(["true"])``.

    /work/venv/bin/python bench/bench_tracing.py [--events 100000] [--exec-runs 50]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from dagcraft.tracing import TraceWriter, read_trace, traced_exec, verify


def bench_append(path: Path, n: int, fsync: bool) -> float:
    with TraceWriter(path, "bench", fsync=fsync) as w:
        t = time.perf_counter()
        w.append("run.started", {"bench": True})
        for i in range(n - 2):
            w.append("tool.call", {"tool": "sh", "command": f"echo {i}", "i": i})
        w.append("run.finished", {"status": "succeeded"})
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--fsync-events", type=int, default=2_000)
    ap.add_argument("--exec-runs", type=int, default=50)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        big = d / "big.jsonl"
        dt = bench_append(big, a.events, fsync=False)
        size = big.stat().st_size
        print(f"append (fsync=False): {a.events} events in {dt:.2f} s = {a.events / dt:,.0f} events/s "
              f"({size / 1e6:.1f} MB)")
        dt = bench_append(d / "fs.jsonl", a.fsync_events, fsync=True)
        print(f"append (fsync=True):  {a.fsync_events} events in {dt:.2f} s = {a.fsync_events / dt:,.0f} events/s")
        t = time.perf_counter()
        rep = verify(big)
        dt = time.perf_counter() - t
        assert rep.ok, rep.problems
        print(f"verify:  {rep.events} events in {dt:.2f} s = {rep.events / dt:,.0f} events/s ({size / 1e6 / dt:.1f} MB/s)")
        t = time.perf_counter()
        evs = read_trace(big)
        dt = time.perf_counter() - t
        print(f"read_trace: {len(evs)} events in {dt:.2f} s = {len(evs) / dt:,.0f} events/s")

        bare, bare_cpu = [], []
        for _ in range(a.exec_runs):
            t, c = time.perf_counter(), time.process_time()
            subprocess.run(["true"], check=True)
            bare.append(time.perf_counter() - t)
            bare_cpu.append(time.process_time() - c)
        traced, traced_cpu = [], []
        # as an attempt writes its trace: not fsynced per event (the store makes it durable
        # when it takes the closed file)
        with TraceWriter(d / "exec.jsonl", "bench", fsync=False) as w:
            w.append("run.started")
            for _ in range(a.exec_runs):
                t, c = time.perf_counter(), time.process_time()
                r = traced_exec(["true"], writer=w, stdout_log=d / "o.log", stderr_log=d / "e.log")
                traced.append(time.perf_counter() - t)
                traced_cpu.append(time.process_time() - c)
                assert r.exit_code == 0
        b, tr = statistics.median(bare) * 1000, statistics.median(traced) * 1000
        bc, tc = statistics.median(bare_cpu) * 1000, statistics.median(traced_cpu) * 1000
        print(f"exec `true` median over {a.exec_runs}: subprocess.run {b:.2f} ms, traced_exec {tr:.2f} ms "
              f"(ratio {tr / b:.1f}x, +{tr - b:.2f} ms per step); CPU of this process "
              f"{bc:.2f} ms vs {tc:.2f} ms")


if __name__ == "__main__":
    main()
