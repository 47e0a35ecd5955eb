"""Store requests per executed step must stay flat as the DAG grows (10 → 100 → 1,000).

Counts are deterministic for a given schedule: one in-process worker executing steps inline
(no concurrency), so every request is attributable. Submission is counted separately.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from dagcraft.orchestrator import run_status
from dagcraft.primitives.local import LocalStore
from tests.orchestrator.helpers import drive_inline, submit_spec, write_spec


def layered_spec(n: int) -> str:
    lines = ["name: counts", "steps:"]
    for i in range(n):
        lines.append(f"  - id: s{i}")
        if i >= 5:
            lines.append(f"    needs: [s{i - 5}]")
        lines.append('    run: ["true"]')
    return "\n".join(lines) + "\n"


def measure(tmp_path: Path, n: int) -> tuple[Counter, Counter]:
    store = LocalStore(tmp_path / f"store{n}", fsync=False)
    spec = write_spec(tmp_path, layered_spec(n), name=f"p{n}.yaml")
    before = Counter(store.stats)
    rid = submit_spec(store, spec)
    submitted = Counter(store.stats)
    submitted.subtract(before)
    drive_inline(store, rid, tmp_path, concurrency=1, inline=True, status=False)
    ran = Counter(store.stats)
    ran.subtract(submitted)
    ran.subtract(before)
    assert run_status(store, rid)["status"] == "succeeded"
    return +submitted, +ran


def test_requests_per_step_are_flat(tmp_path, capsys):
    per_step = {}
    for n in (10, 100, 1000):
        submitted, ran = measure(tmp_path, n)
        per_step[n] = sum(ran.values()) / n
        with capsys.disabled():
            print(f"\n{n:>5} steps: submit {sum(submitted.values()) / n:.2f} req/step; "
                  f"run {per_step[n]:.2f} req/step {dict(sorted(ran.items()))}")
        # submission writes one state per step plus a constant
        assert sum(submitted.values()) <= n + 5
    # flat: the 1,000-step DAG costs no more per step than the 10-step one (plus fixed costs
    # amortised), and never more than a fixed budget
    assert per_step[1000] <= per_step[10] * 1.05
    assert per_step[1000] <= 8, per_step
