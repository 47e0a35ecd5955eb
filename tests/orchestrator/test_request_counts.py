"""Store requests per executed step stay flat in run size, run length and pool size; an idle
pool costs next to nothing and still wakes when a run is submitted; a change whose journal
entry was lost (its writer died between the CAS and the journal PUT) is still picked up.

Counts, never timings. The scale tests use the harness of ``request_sim.py``: real workers
(cycle, discovery, backoff, views, scheduler, supervisor, transitions, registration) on the
real local store, with simulated time and simulated step execution.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import pytest

from dagcraft.orchestrator import layout, registry, run_status, submit, worker
from dagcraft.orchestrator.model import load_state
from dagcraft.orchestrator.view import LocalView
from dagcraft.primitives.local import LocalStore
from dagcraft.workflows import compile_workflow
from dagcraft.workflows.spec import Spec
from tests.orchestrator.helpers import drive_inline, submit_spec, write_spec
from tests.orchestrator.request_sim import Clock, Pool, SimStore, layered, measure

#: AWS S3 list prices, $ per request
PRICE = {"get": 0.0004 / 1000, "head": 0.0004 / 1000, "put": 0.005 / 1000, "list": 0.005 / 1000, "delete": 0.0}


def dollars(counts: Counter[str]) -> float:
    return sum(PRICE.get(op, 0.0) * n for op, n in counts.items())


def report(capsys: pytest.CaptureFixture[str], m: object) -> None:
    with capsys.disabled():
        print(f"\n{m.steps:>6} steps x {m.workers:>2} workers: {m.per_step:5.2f} req/step "  # type: ignore[attr-defined]
              f"{ {k: round(v, 2) for k, v in m.breakdown().items() if v} } "  # type: ignore[attr-defined]
              f"over {m.simulated_s:.0f} simulated s")  # type: ignore[attr-defined]


# -- flat cost ---------------------------------------------------------------------------------
#: the run sizes the flat-cost test covers (the 10,000-step point takes about a minute)
SIZES = (10, 100, 1000, 10000)


@pytest.fixture
def fast_path(tmp_path):
    """A directory on tmpfs when there is one (same requests, no disk latency), else tmp_path."""
    if not Path("/dev/shm").is_dir():
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        yield Path(d)


def test_requests_per_step_flat_from_10_to_10000_steps(fast_path, capsys):
    """4 workers x 25 slots over layers of 100 no-op steps of 1 s."""
    per_step = {}
    for n in SIZES:
        m = measure(fast_path, n, 4, step_s=1.0, concurrency=25)
        report(capsys, m)
        per_step[n] = m.per_step
        assert sum(m.submit.values()) <= n + 6  # one state per step plus a constant
    # each worker's fixed costs (registration, discovery, first reads) weigh on 10 steps;
    # from 100 steps on, within 20 % of one constant: the 100-step figure
    for n in SIZES[2:]:
        assert per_step[n] <= per_step[100] * 1.2, per_step
    assert per_step[10] <= per_step[100] * 2.0, per_step


def test_requests_per_step_flat_over_an_hour_long_run(fast_path, capsys):
    """Slow steps (36 s, 2 workers): a 200-step run lasts an hour, its views resync about 60
    times each, and it costs per step what a 20-step run of the same steps costs."""
    short = measure(fast_path, 20, 2, step_s=36.0, width=4)
    long = measure(fast_path, 200, 2, step_s=36.0, width=4)
    report(capsys, short)
    report(capsys, long)
    assert long.simulated_s >= 3600
    assert long.per_step <= short.per_step * 1.2, (short.per_step, long.per_step)
    assert long.ran["get"] / long.steps <= short.ran["get"] / short.steps * 1.2


@pytest.mark.timeout(900)  # 64 views of one run in one process: a minute on an idle machine
def test_requests_per_step_flat_from_1_to_64_workers(fast_path, capsys):
    """No-op steps of 1 s in layers of 64, one slot per worker; each run lasts past the
    journal's 30 s look-back window (at least 320 steps, 64 per worker: a minute of simulated
    time with 16 and 64 workers), so what a full window costs a large pool is counted too."""
    per_step, lists = {}, {}
    for w in (1, 4, 16, 64):
        m = measure(fast_path, max(320, 64 * w), w, step_s=1.0, width=64)
        report(capsys, m)
        per_step[w] = m.per_step
        lists[w] = m.ran["list"] / m.steps
    base = per_step[1]
    for v in per_step.values():
        assert v <= base * 1.2, per_step
    # LISTs are billed per 1,000 keys: a sweep of the whole window cost each worker one per
    # 1,000 keys every 2 s: 3.17 LISTs a step with 64 workers, 2.12 with 16 (now 1.64 and 1.92)
    assert lists[64] <= lists[16] * 1.2, lists


def test_paced_resync_reads_a_bounded_slice(tmp_path):
    """One resync of a 2,000-step view with nothing running costs control plus
    ``resync_batch // 8`` GETs (not one per step), and successive resyncs walk every open
    step round robin."""
    store = LocalStore(tmp_path / "s", fsync=False)
    rid = submit(store, compile_workflow(Spec.model_validate(layered(2000)), {}))
    view = LocalView(store, rid, resync_batch=32)
    seen: set[str] = set()
    for _ in range(2000 // 4):
        before = store.stats["get"]
        picks = view.paced_resync()
        assert store.stats["get"] - before == 5 and len(picks) == 4
        seen.update(picks)
    assert seen == set(view.steps)


# -- the safety net ----------------------------------------------------------------------------
@pytest.mark.parametrize("lost", ["running", "succeeded"])
def test_change_whose_journal_entry_was_lost_is_picked_up(tmp_path, lost):
    """The writer of ``s0``'s ``lost`` transition dies right after its CAS (its journal PUT
    never lands). The other worker still sees the change — through the supervisor's lease
    check of an active step, or the paced resync — and the run finishes with ``s0`` run
    exactly once."""
    clock = Clock()
    store = SimStore(tmp_path / "s", clock)
    rid = submit(store, compile_workflow(Spec.model_validate(layered(30, width=10)), {}))
    store.drop.append(f"~{lost}~s0")
    pool = Pool(store, tmp_path / "w", 2, step_s=1.0)
    pool.kill_on_drop = True

    def done() -> bool:
        live = [w for i, w in enumerate(pool.workers) if i not in pool.dead]
        return all(rid in w.finished_runs and not w.running for w in live)

    pool.run_until(done, limit_s=600.0)
    assert store.dropped and store.dropped[0].endswith(f"~{lost}~s0")
    assert pool.dead, "the writer of the lost entry was killed"
    st = load_state(store.get(layout.step_state(rid, "s0"))[0])
    assert st.status == "succeeded"
    assert st.attempt == (1 if lost == "succeeded" else 2)  # a lost claim is retried once
    assert run_status(store, rid)["status"] == "succeeded"
    # caught within a lease TTL (30 s) plus the supervisor's takeover, or one resync period
    assert clock.t < 200.0, clock.t


# -- idle pools ----------------------------------------------------------------------------------
def test_idle_pool_costs_well_under_a_dollar_a_day_and_wakes_on_submit(tmp_path, capsys):
    n = 100
    clock = Clock()
    store = SimStore(tmp_path / "s", clock)
    pool = Pool(store, tmp_path / "w", n)
    warm = 600.0  # backoff reached its ceiling long before this
    pool.run_until(lambda: clock.t >= warm)
    before = Counter(store.stats)
    hour = 3600.0
    pool.run_until(lambda: clock.t >= warm + hour)
    idle = Counter(store.stats)
    idle.subtract(before)
    per_day = dollars(idle) * 24
    with capsys.disabled():
        print(f"\n{n} idle workers, one hour: {dict(+idle)}; ${per_day:.3f} per day on AWS list prices")
    # per worker and hour: wake checks every WAKE_MAX_S (+-20 %), a full index listing every
    # INDEX_MAX_S, a registration beat every IDLE_BEAT_S
    assert idle["list"] <= n * (hour / worker.INDEX_MAX_S + 1)
    assert idle["get"] <= n * hour / (worker.WAKE_MAX_S * 0.8) + n
    assert idle["put"] <= n * (hour / 300.0 + 1)
    assert per_day < 0.6, per_day

    # a submit wakes every worker at its next check: the first within a fraction of a check
    # interval, all within one; until it serves the run a worker reads the marker once (counted
    # per worker, by key: workers already serving keep reading the run while the others join)
    def marker_gets(i: int) -> int:
        return store.gets_by[(i, layout.RUNS_WAKE)]

    at_submit = [marker_gets(i) for i in range(n)]
    submitted_at = clock.t
    rid = submit(store, compile_workflow(Spec.model_validate(layered(3)), {}))
    to_serve: dict[int, int] = {}

    def all_serving() -> bool:
        for i, w in enumerate(pool.workers):
            if i not in to_serve and (rid in w.drivers or rid in w.finished_runs):
                to_serve[i] = marker_gets(i) - at_submit[i]
        return len(to_serve) == n

    pool.run_until(all_serving, limit_s=clock.t + 60.0)
    assert clock.t - submitted_at <= worker.WAKE_MAX_S * 1.2 + 0.1
    assert set(to_serve.values()) == {1}, to_serve


def test_idle_registration_beats_rarely_and_at_the_serving_rate_once_serving(local_store):
    serving: list[str] = []
    reg = registry.Registration(local_store, "w@h:1", beat_s=0.05, snapshot=lambda: (list(serving), []),
                                idle_beat_s=3600.0)
    reg.start()
    try:
        # idle: the record promises its next beat in an hour, and liveness is judged by that
        assert reg.record.beat_s == 3600.0 and reg.beats == 1
        [(rec, state)] = registry.list_workers(local_store)
        assert rec.beat_s == 3600.0 and state is registry.WorkerState.LIVE
        serving.append("r1")
        reg.beaten.clear()
        reg.nudge()  # what the worker does when it starts serving a run
        assert reg.beaten.wait(10)
        assert reg.record.beat_s == 0.05 and reg.record.runs == ["r1"]
        for _ in range(2):  # back at the serving rate: no waiting an hour
            reg.beaten.clear()
            assert reg.beaten.wait(10)
    finally:
        reg.stop()
    assert local_store.get(reg.key) is None


# -- real attempts ---------------------------------------------------------------------------------
def layered_spec(n: int) -> str:
    lines = ["name: counts", "steps:"]
    for i in range(n):
        lines.append(f"  - id: s{i}")
        if i >= 5:
            lines.append(f"    needs: [s{i - 5}]")
        lines.append('    run: ["true"]')
    return "\n".join(lines) + "\n"


def test_real_attempts_cost_what_the_harness_counts_plus_their_uploads(tmp_path, capsys):
    """The harness leaves out what an attempt itself writes (its trace): a real worker on the
    same DAG costs at most two requests per step more."""
    store = LocalStore(tmp_path / "real", fsync=False)
    rid = submit_spec(store, write_spec(tmp_path, layered_spec(50)))
    before = Counter(store.stats)
    drive_inline(store, rid, tmp_path, concurrency=1, inline=True, status=False)
    ran = Counter(store.stats)
    ran.subtract(before)
    real = sum(ran.values()) / 50
    sim = measure(tmp_path, 50, 1, step_s=0.0).per_step
    with capsys.disabled():
        print(f"\nreal attempts: {real:.2f} req/step {dict(+ran)}; harness {sim:.2f}")
    assert sim <= real <= sim + 2.5
