"""Store requests per executed step, and what they cost on AWS list prices. Asserts nothing.

    python bench/bench_requests.py [--steps 500 10000] [--workers 4] [--concurrency 25] [--step-s 1] [--no-docs]

Runs ``--steps`` no-op steps (layers of 100, each step needing one of the layer before) with
``--workers`` real workers through the request-count harness of
``tests/orchestrator/request_sim.py`` (real worker, view, scheduler, supervisor and
transition code on a real local store that counts every request; simulated time and step
execution), and prints per step: GET, PUT, LIST, DELETE, the total, and $ per 1,000 steps
(GET $0.0004/1k, PUT and LIST $0.005/1k). A real attempt also uploads its trace: about one
PUT per step more (``test_real_attempts_cost_what_the_harness_counts_plus_their_uploads``).
Then the cost of 100 idle workers over a simulated hour, per worker and day.

Unless ``--no-docs``, the table replaces what stands between the ``bench-requests`` markers
in ``docs/store.md``; results also go to ``bench/results/requests.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.orchestrator.request_sim import Clock, Pool, SimStore, measure  # noqa: E402

PRICE = {"get": 0.0004 / 1000, "head": 0.0004 / 1000, "put": 0.005 / 1000, "list": 0.005 / 1000, "delete": 0.0}
BEGIN, END = "<!-- bench-requests:begin -->", "<!-- bench-requests:end -->"


def dollars(per: dict[str, float]) -> float:
    return sum(PRICE.get(op, 0.0) * v for op, v in per.items())


def idle_cost(tmp: Path, n: int = 100, hour: float = 3600.0) -> dict[str, float]:
    clock = Clock()
    store = SimStore(tmp / "idle", clock)
    pool = Pool(store, tmp / "idle-w", n)
    pool.run_until(lambda: clock.t >= 600.0)
    before = Counter(store.stats)
    pool.run_until(lambda: clock.t >= 600.0 + hour)
    got = Counter(store.stats)
    got.subtract(before)
    per_worker_day = {op: v * 24 / n for op, v in got.items() if v}
    return {**per_worker_day, "usd": dollars(per_worker_day)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[500, 10000])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=25, help="attempts per worker (default 25: 100 in flight)")
    ap.add_argument("--step-s", type=float, default=1.0)
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    rows = []
    # tmpfs when there is one: the counts are the same, the local store's fsyncs are not
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(dir=shm) as d:
        for n in args.steps:
            m = measure(Path(d), n, args.workers, step_s=args.step_s, concurrency=args.concurrency)
            per = m.breakdown()
            rows.append({"steps": n, "workers": args.workers, "simulated_s": round(m.simulated_s),
                         **{k: round(v, 2) for k, v in per.items()}, "total": round(m.per_step, 2),
                         "usd_per_1000_steps": round(dollars(per) * 1000, 4)})
            print(json.dumps(rows[-1]), flush=True)
        idle = idle_cost(Path(d))
        print(json.dumps({"idle_worker_per_day": {k: round(v, 4) for k, v in idle.items()}}), flush=True)
    lines = [BEGIN, "",
             f"`python bench/bench_requests.py` ({args.workers} workers x {args.concurrency} slots, no-op steps of "
             f"{args.step_s} s simulated, layers of 100; engine requests, without the ~1 PUT per attempt of its "
             "trace upload):", "",
             "| steps | simulated run | GET/step | PUT/step | LIST/step | DELETE/step | requests/step | $ per 1,000 steps |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['steps']:,} | {r['simulated_s']:,} s | {r['get']:.2f} | {r['put']:.2f} | {r['list']:.2f} | "
                     f"{r['delete']:.2f} | {r['total']:.2f} | ${r['usd_per_1000_steps']:.4f} |")
    lines += ["", f"One idle worker per day: {idle.get('get', 0):,.0f} GET, {idle.get('put', 0):,.0f} PUT, "
              f"{idle.get('list', 0):,.0f} LIST: ${idle['usd']:.4f} (100 idle workers: ${idle['usd'] * 100:.2f} a day).",
              "", END]
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "requests.json").write_text(json.dumps({"rows": rows, "idle_worker_per_day": idle}, indent=2) + "\n")
    if not args.no_docs:
        doc = ROOT / "docs" / "store.md"
        text = doc.read_text()
        block = "\n".join(lines)
        if BEGIN in text and END in text:
            text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
        doc.write_text(text)
        print(f"wrote {doc}")
    print("\n".join(lines[2:-2]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
