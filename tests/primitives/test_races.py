"""Races with real processes: exactly one winner per name, locally and on a serialized moto server."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_CHILD = r"""
import json, sys
from dagcraft.errors import Conflict
from dagcraft.primitives import open_store, lease
url, holder, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = open_store(url)
store.get("warmup")                 # open connections / import everything before the start
print("ready", flush=True)
sys.stdin.readline()                # start gun: all processes race from here
won = []
for i in range(n):
    try:
        lease.acquire(store, f"claims/name-{i}", holder, 600)
        won.append(i)
    except Conflict:
        pass
print(json.dumps(won), flush=True)
"""

PROCS = 8
NAMES = 200


def race(url: str) -> dict[int, list[str]]:
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, url, f"w{p}", str(NAMES)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for p in range(PROCS)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:  # release them all at once
        p.stdin.write("go\n")
        p.stdin.flush()
    winners: dict[int, list[str]] = {i: [] for i in range(NAMES)}
    for idx, p in enumerate(procs):
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0
        for i in json.loads(out.strip().splitlines()[-1]):
            winners[i].append(f"w{idx}")
    return winners


def _check(winners, store):
    from dagcraft.primitives import lease

    doubles = {i: w for i, w in winners.items() if len(w) != 1}
    assert not doubles, f"names without exactly one winner: {doubles}"
    for i, w in winners.items():
        rec, _ = lease.read(store, f"claims/name-{i}")
        assert rec.holder == w[0] and rec.token == 1


@pytest.mark.timeout(300)
def test_race_local(local_store):
    _check(race(local_store.url), local_store)


@pytest.mark.timeout(300)
def test_race_serialized_moto_server(s3_server_store):
    _check(race(s3_server_store.url), s3_server_store)


@pytest.mark.realserver
@pytest.mark.timeout(300)
def test_race_real_server(real_s3_store):
    _check(race(real_s3_store.url), real_s3_store)
