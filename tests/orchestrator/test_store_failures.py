"""Store failures are exit 5 with one line naming the store and the failing operation, never a
traceback; a report that cannot be written after a successful run is a warning (exit 0); a
submit that fails leaves nothing visible; a worker rides out a full disk during a claim.

How the faults are made real:
- read-only store: the store directory is bind-mounted read-only in a private mount namespace
  (``unshare -m``) for the one command under test, since root ignores mode bits; a non-root
  run uses ``chmod -R a-w`` instead. Nothing outside the command's namespace changes.
- ENOSPC for the report: ``--report /dev/full`` (the kernel's always-full device).
- ENOSPC for processes: a small tmpfs mounted in a private mount namespace, really filled.
- ENOSPC/EDQUOT in-process: the store's own commit step raises the OSError the filesystem
  would (``disk_full``), so LocalStore's real error mapping is what is tested.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dagcraft.errors import StoreUnavailable
from dagcraft.orchestrator import WorkerConfig, layout, list_runs, run_status, submit
from dagcraft.orchestrator.worker import Worker
from dagcraft.primitives import open_store
from dagcraft.primitives.local import LocalStore
from dagcraft.workflows import compile_file
from tests.orchestrator.helpers import REPO, cli, submit_spec, write_spec

SPEC = """
    name: ro
    steps:
      - id: a
        run: "echo a"
      - id: b
        needs: [a]
        run: "echo b"
"""


def _can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


def readonly_cli(store_dir: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``dagcraft ARGS`` with ``store_dir`` read-only for that process only."""
    cmd = [sys.executable, "-m", "dagcraft.cli.main", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [store_dir, *store_dir.rglob("*")]}
        for p in modes:
            p.chmod(modes[p] & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        finally:
            for p, m in modes.items():
                p.chmod(m)
    if not _can_unshare():
        pytest.skip("root without mount namespaces: cannot make a read-only store here")
    wrapped = ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(store_dir), *cmd]
    return subprocess.run(wrapped, capture_output=True, text=True, timeout=timeout, env=env)


def _exit5(proc: subprocess.CompletedProcess[str], store_dir: Path, op: str) -> None:
    assert proc.returncode == 5, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("[")]
    assert len(lines) == 1, proc.stderr
    assert str(store_dir) in lines[0] and f": {op} " in lines[0], lines[0]


def test_read_only_store_is_exit_5_naming_store_and_operation(tmp_path):
    store_dir = tmp_path / "store"
    spec = write_spec(tmp_path, SPEC)
    store = LocalStore(store_dir)
    submit_spec(store, spec, run_id="done-1")
    before = sorted(p.relative_to(store_dir) for p in store_dir.rglob("*"))
    _exit5(readonly_cli(store_dir, "run", str(spec), "--store", str(store_dir), "--no-report"), store_dir, "put")
    _exit5(readonly_cli(store_dir, "submit", str(spec), "--store", str(store_dir)), store_dir, "put")
    _exit5(readonly_cli(store_dir, "cancel", "done-1", "--store", str(store_dir)), store_dir, "put")
    # a retry first removes the run's status summary (sealed runs have one), then writes
    _exit5(readonly_cli(store_dir, "retry", "done-1", "--from", "a", "--detach", "--store", str(store_dir)),
           store_dir, "delete")
    _exit5(readonly_cli(store_dir, "store", "check", str(store_dir)), store_dir, "put")
    # reading still works on a read-only store
    ok = readonly_cli(store_dir, "status", "done-1", "--store", str(store_dir))
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.relative_to(store_dir) for p in store_dir.rglob("*")) == before


def test_report_on_a_full_disk_after_a_successful_run_is_a_warning(tmp_path):
    spec = write_spec(tmp_path, SPEC)
    proc = cli("run", str(spec), "--store", str(tmp_path / "store"), "--workers", "1", "--report", "/dev/full")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    warn = [ln for ln in proc.stderr.splitlines() if "warning" in ln]
    assert len(warn) == 1 and "report not written" in warn[0] and "No space left on device" in warn[0]
    assert "succeeded" in proc.stdout


def disk_full(store: LocalStore, key_contains: str, code: int = errno.ENOSPC, count: int | None = None,
              until: float | None = None) -> list[str]:
    """Make the filesystem refuse commits of keys containing ``key_contains`` with ``code``
    (at most ``count`` times, or until ``time.monotonic()`` passes ``until``). Returns the
    keys refused. The temp file is removed first, as the real failure would leave none."""
    real = store._commit
    refused: list[str] = []

    def commit(key: str, path: str, tmp: str, *rest: object) -> str:
        active = (count is None or len(refused) < count) and (until is None or time.monotonic() < until)
        if key_contains in key and active:
            refused.append(key)
            Path(tmp).unlink(missing_ok=True)
            raise OSError(code, os.strerror(code))
        return real(key, path, tmp, *rest)  # type: ignore[arg-type]

    store._commit = commit  # type: ignore[method-assign]
    return refused


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_submit_that_fails_leaves_nothing_visible(tmp_path, code):
    store = LocalStore(tmp_path / "store")
    spec = tmp_path / "big.yaml"
    spec.write_text("name: big\nsteps:\n" + "".join(f"  - id: s{i}\n    run: 'true'\n" for i in range(40)))
    wf = compile_file(spec, {})
    refused = disk_full(store, "/control.json", code)  # after run.json: a half-written submit
    with pytest.raises(StoreUnavailable) as exc:
        submit(store, wf, run_id="half-1")
    assert refused and str(store.root) in str(exc.value) and "put runs/half-1/control.json" in str(exc.value)
    assert os.strerror(code) in str(exc.value)
    assert list_runs(store) == []
    assert store.list("runs/half-1/") == []  # nothing half-written is left
    assert list((tmp_path / "store" / "tmp").iterdir()) == []
    store._commit = LocalStore._commit.__get__(store)  # type: ignore[method-assign]
    assert submit(store, wf, run_id="half-1") == "half-1"  # the id is free again
    assert [r["run_id"] for r in list_runs(store)] == ["half-1"]


def test_a_submit_killed_half_way_reads_as_not_found(tmp_path):
    store_url = str(tmp_path / "store")
    store = open_store(store_url)
    spec = write_spec(tmp_path, SPEC)
    submit_spec(store, spec, run_id="full-1")
    store.delete(layout.control("full-1"))  # what a kill -9 before the control write leaves
    for args in (("status", "full-1"), ("resume", "full-1", "--no-report")):
        proc = cli(*args, "--store", store_url)
        assert proc.returncode == 4 and "did not complete" in proc.stderr and "Traceback" not in proc.stderr
    assert [r["run_id"] for r in list_runs(store)] == []


def test_worker_survives_a_full_disk_during_a_claim(tmp_path):
    store = LocalStore(tmp_path / "store")
    spec = write_spec(tmp_path, SPEC)
    rid = submit_spec(store, spec, run_id="claim-1")
    refused = disk_full(store, "/steps/a/state.json", until=time.monotonic() + 2.0)
    cfg = WorkerConfig(store=store, store_url=store.url, worker_id="w-enospc", lease_ttl=30.0,
                       tmp_root=tmp_path / "work", grace=1.0, outage_s=0.3)
    messages: list[str] = []
    code = Worker(cfg, run_id=rid, exit_when_idle=True, poll_min=0.01, poll_max=0.1, log=messages.append).run()
    assert refused, "the fault never fired"
    assert code == 0
    assert run_status(store, rid)["status"] == "succeeded"
    assert any("No space left on device" in m and "cycle interrupted" in m for m in messages), messages


def _in_tmpfs(tmp_path: Path, script: str, size: str = "200k", timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run ``script`` (sh) with a ``size`` tmpfs mounted at ``$T`` in a private mount namespace:
    a real filesystem that really fills up, visible to nothing else. ``$DAG`` runs dagcraft."""
    if not _can_unshare():
        pytest.skip("needs root with mount namespaces for a private tmpfs")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    body = f'mount -t tmpfs -o size={size} tmpfs "$T" || exit 99\n{script}'
    env = {**os.environ, "PYTHONPATH": str(REPO), "T": str(mnt), "DAG": f"{sys.executable} -m dagcraft.cli.main"}
    return subprocess.run(["unshare", "-m", "sh", "-c", body], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=tmp_path)


def test_submit_on_a_full_filesystem_is_exit_5_and_leaves_nothing(tmp_path):
    spec = tmp_path / "big.yaml"
    # a spec snapshot (run.json) larger than the 100 KiB filesystem: submit's first write fails
    spec.write_text("name: big\nsteps:\n" + "".join(f"  - id: s{i}\n    run: 'echo {'x' * 2000}'\n"
                                                     for i in range(60)))
    proc = _in_tmpfs(tmp_path, f"""
        $DAG submit {spec} --store "$T/st" --run-id big-1; echo "submit=$?"
        $DAG runs --store "$T/st" --json; echo "runs=$?"
        echo "files=$(find "$T/st/objects" "$T/st/tmp" -type f | wc -l)"
    """, size="100k")
    out = proc.stdout
    assert "submit=5" in out and "runs=0" in out and "files=0" in out, (out, proc.stderr)
    assert "[]" in out  # nothing listed
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith(f"dagcraft: local store {tmp_path / 'tmpfs' / 'st'}: put runs/big-1/")
    assert err[0].endswith("No space left on device") and "Traceback" not in proc.stderr


def test_worker_rides_out_a_full_filesystem_during_a_claim(tmp_path):
    spec = write_spec(tmp_path, SPEC)
    log = tmp_path / "worker.err"
    proc = _in_tmpfs(tmp_path, f"""
        $DAG submit {spec} --store "$T/st" --run-id c1 >/dev/null || exit 98
        dd if=/dev/zero of="$T/fill" bs=4k count=10000 2>/dev/null   # the disk is now full
        $DAG worker --store "$T/st" --run c1 --exit-when-idle --quiet 2>{log} &
        pid=$!
        i=0   # wait for the worker to hit the full disk (its retry warning), then free space
        while ! grep -q "state.json: No space left" {log}; do i=$((i+1)); [ $i -gt 1200 ] && exit 97; sleep 0.05; done
        rm "$T/fill"
        wait $pid; echo "worker=$?"
        $DAG status c1 --store "$T/st"
    """)
    assert "worker=0" in proc.stdout, (proc.stdout, proc.stderr, log.read_text())
    assert "run c1 (ro): succeeded" in proc.stdout
    err = log.read_text()
    assert "put runs/c1/steps/a/state.json: No space left on device" in err and "Traceback" not in err
