"""Benchmark of the coordination layer. Prints numbers; asserts nothing.

    python bench/bench_primitives.py [--n 2000] [--cold 10] [--no-s3]

1. Cold CLI start: ``dagcraft agent memory get`` on a local store (subprocess wall time), and whether
   boto3 was imported (``python -X importtime``).
2. Local-store claim+commit in-process: lease.acquire + fenced commit of a result + release,
   median/p90 per operation, with and without fsync.
3. S3 ops against a moto server (lock-serialized, in a subprocess): requests per operation
   (from ``store.stats``) and latency.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from dagcraft.primitives import LocalStore, lease, memory  # noqa: E402


def ms(xs: list[float]) -> str:
    xs = sorted(xs)
    return (f"median {statistics.median(xs) * 1000:.3f} ms, p90 {xs[int(len(xs) * 0.9)] * 1000:.3f} ms, "
            f"min {xs[0] * 1000:.3f} ms")


def cold_start(n: int) -> None:
    d = tempfile.mkdtemp()
    env = {**os.environ, "DAGCRAFT_STORE": str(Path(d) / "st")}
    memory.set(LocalStore(Path(d) / "st"), "shared", "k", "v", writer="bench")
    exe = [sys.executable, "-m", "dagcraft.cli.main", "agent", "memory", "get", "k"]
    subprocess.run(exe, env=env, capture_output=True)  # warm the page cache
    times = []
    for _ in range(n):
        t = time.perf_counter()
        p = subprocess.run(exe, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - t)
        assert p.stdout == "v\n", p
    p = subprocess.run([sys.executable, "-X", "importtime", *exe[1:]], env=env, capture_output=True, text=True)
    boto = [ln for ln in p.stderr.splitlines() if "boto" in ln]
    total = [ln for ln in p.stderr.splitlines()
             if ln.startswith("import time:") and ln.split("|")[1].strip().isdigit()]
    top = max(total, key=lambda ln: int(ln.split("|")[1])) if total else ""
    all_imports = sum(int(ln.split("|")[0].split(":")[1]) for ln in total) / 1000
    print(f"cold `dagcraft agent memory get` (local, {n} runs): {ms(times)}; all imports {all_imports:.1f} ms")
    print(f"  boto3/botocore imported: {'YES' if boto else 'no'}; largest import: {top.split('|')[-1].strip()} "
          f"{int(top.split('|')[1]) / 1000:.1f} ms cumulative" if top else "")


def claim_commit(n: int, fsync: bool) -> None:
    s = LocalStore(tempfile.mkdtemp(), fsync=fsync)
    acq, com, rel, total = [], [], [], []
    for i in range(n):
        t0 = time.perf_counter()
        le = lease.acquire(s, f"claims/step-{i}", "bench", 60)
        t1 = time.perf_counter()
        le = lease.renew(s, le, 60)  # the holder's fenced write (a commit is one such CAS)
        t2 = time.perf_counter()
        lease.release(s, le)
        t3 = time.perf_counter()
        acq.append(t1 - t0)
        com.append(t2 - t1)
        rel.append(t3 - t2)
        total.append(t2 - t0)
    print(f"local claim+commit (fsync={'on' if fsync else 'off'}, {n} ops): {ms(total)}")
    print(f"  acquire {ms(acq)}\n  commit  {ms(com)}\n  release {ms(rel)}")


def s3_ops(n: int) -> None:
    from conftest import moto_server, new_server_bucket  # type: ignore

    from dagcraft.primitives import artifacts, mailbox
    from dagcraft.primitives.s3 import S3Store

    gen = moto_server.__wrapped__()  # the fixture's generator, outside pytest
    endpoint = next(gen)
    try:
        s = S3Store(new_server_bucket(endpoint), "bench", endpoint_url=endpoint)
        s.get("warmup")
        f = Path(tempfile.mkdtemp()) / "a.bin"
        f.write_bytes(os.urandom(64 << 10))
        box: dict = {}
        cases = [
            ("lease.acquire (new)", lambda i: box.__setitem__(i, lease.acquire(s, f"c/{i}", "b", 60))),
            ("lease.renew", lambda i: box.__setitem__(i, lease.renew(s, box[i], 60))),
            ("lease.release", lambda i: lease.release(s, box[i])),
            ("lease.acquire (takeover)", lambda i: lease.acquire(s, f"c/{i}", "b2", 60)),
            ("memory.set", lambda i: memory.set(s, "shared", f"k{i % 10}", i, writer="b")),
            ("memory.get", lambda i: memory.get(s, "shared", f"k{i % 10}")),
            ("mailbox.send", lambda i: mailbox.send(s, "shared", sender="a", to="bob", body=i)),
            ("artifacts.put (64 KiB, exists)", lambda i: artifacts.put(s, f, scope="shared", name="a.bin", uploader="b")),
        ]
        print(f"S3 (moto server, serialized, {endpoint}), {n} ops each:")
        for name, fn in cases:
            times = []
            s.stats.clear()
            for i in range(n):
                t = time.perf_counter()
                fn(i)
                times.append(time.perf_counter() - t)
            per = {k: round(v / n, 2) for k, v in sorted(s.stats.items()) if v}
            print(f"  {name:32s} requests/op {json.dumps(per):40s} {ms(times)}")
    finally:
        next(gen, None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--cold", type=int, default=10)
    ap.add_argument("--s3-n", type=int, default=100)
    ap.add_argument("--no-s3", action="store_true")
    a = ap.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    cold_start(a.cold)
    claim_commit(a.n, fsync=True)
    claim_commit(a.n, fsync=False)
    if not a.no_s3:
        s3_ops(a.s3_n)


if __name__ == "__main__":
    main()
