"""Chaos: a 150-step run through a fault-injecting proxy (15 % mixed faults, including lost
responses to conditional PUTs) in front of the lock-serialized moto server, with worker
processes killed with SIGKILL mid-run and restarted.

Must hold: the run succeeds; no step is lost; no step is committed twice (exactly one
succeeded attempt in each step's history); side effects run more than once only for steps
whose worker was killed while running them (at most one per kill at concurrency 1); every
committed attempt's trace is present and verified, except one whose worker was killed after
committing but before uploading it.
"""

from __future__ import annotations

import signal
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from dagcraft.orchestrator import run_status
from dagcraft.orchestrator.model import AttemptStatus
from dagcraft.orchestrator.ops import load_states
from dagcraft.orchestrator.report import verify_run
from dagcraft.primitives.s3 import S3Store
from dagcraft.primitives.url import s3_url
from tests.conftest import new_server_bucket
from tests.faults import FaultProxy
from tests.orchestrator.helpers import cli, killpg, spawn_cli, wait_for, write_spec
from tests.orchestrator.test_processes import wide_dag_spec

N = 150
WORKERS = 4


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_chaos_faults_and_kills(moto_server: str, tmp_path: Path) -> None:
    bucket = new_server_bucket(moto_server)
    direct = S3Store(bucket, "chaos", endpoint_url=moto_server)  # to read results without faults
    effects = tmp_path / "effects.txt"
    spec = write_spec(tmp_path, wide_dag_spec(N, effects))
    with FaultProxy(moto_server, seed=7) as proxy:
        url = s3_url(bucket, "chaos", endpoint=proxy.url)
        rid = cli("submit", str(spec), "--store", url, check=True).stdout.strip()
        proxy.configure(drop=0.03, error503=0.05, reset=0.03, lose_response=0.04)
        env = {"TMPDIR": str(tmp_path)}  # one host: workers share the scratch dir (and its outbox)

        def spawn() -> subprocess.Popen[str]:
            return spawn_cli("worker", "--store", url, "--run", rid, "--exit-when-idle", "--poll-max", "0.2",
                             "--lease-ttl", "3", "--quiet", env=env)

        procs = [spawn() for _ in range(WORKERS)]
        killed: list[int] = []
        try:
            for threshold in (N // 4, N // 2):
                wait_for(lambda t=threshold: effects.exists() and len(effects.read_text().split()) >= t,
                         timeout=240, what=f"{threshold} steps done")
                victim = procs.pop(0)
                killpg(victim, signal.SIGKILL)
                victim.wait()
                killed.append(victim.pid)
                procs.append(spawn())
            for p in procs:
                p.wait(timeout=400)
                assert p.returncode == 0, p.stderr.read()
        finally:
            for p in procs:
                killpg(p)
        injected = sum(proxy.injected.values())
    assert injected > 50, f"only {injected} faults injected: the test proves little"
    st = run_status(direct, rid)
    assert st["status"] == "succeeded", st["reason"]
    counts = Counter(effects.read_text().split())
    assert set(counts) == {f"s{i}" for i in range(N)}, "a step was lost"
    duplicates = sum(v - 1 for v in counts.values())
    assert duplicates <= len(killed), f"{duplicates} duplicate side effects with {len(killed)} kills"
    killed_ids = tuple(f":{pid}" for pid in killed)
    for sid, state in load_states(direct, rid).items():
        wins = [h for h in state.history if h.status == AttemptStatus.SUCCEEDED]
        assert len(wins) == 1, f"{sid} committed {len(wins)} times"
    for rep in verify_run(direct, rid):
        step, attempt = rep.path.split("/")[1:3]
        history = {str(h.attempt): h for h in load_states(direct, rid)[step].history}
        by_killed = (history[attempt].worker or "").endswith(killed_ids)
        assert rep.ok or by_killed, rep.message()
    lost = sum(1 for st in load_states(direct, rid).values() for h in st.history if h.status == AttemptStatus.LOST)
    print(f"\nchaos: {N} steps, {injected} faults injected ({dict(proxy.injected)}), {len(killed)} kills, "
          f"{lost} attempts lost, {duplicates} duplicate side effects, 0 double commits")
