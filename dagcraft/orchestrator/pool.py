"""A local pool: N worker processes for one run, restarted when they die, with progress.

The pool process itself never runs steps; it watches the run through the journal (like any
worker) and renders progress. Its workers are ordinary ``dagcraft worker`` processes, so a run
started by a pool can be joined by workers on other hosts, and resumed by any of them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dagcraft.errors import EXIT_FAILED, DagcraftError, Interrupted
from dagcraft.orchestrator import ops
from dagcraft.orchestrator.model import RUN_FINISHED, RunStatus
from dagcraft.orchestrator.view import LocalView
from dagcraft.primitives.store import Store

MAX_RESTARTS = 20


@dataclass
class PoolOptions:
    workers: int = field(default_factory=lambda: os.cpu_count() or 2)
    concurrency: int = 1
    lease_ttl: float = 30.0
    poll_max: float = 0.5
    echo: bool = False
    env: dict[str, str] = field(default_factory=dict)
    keep_workdirs: bool = False
    #: path of the Ed25519 key the workers sign run seals with (passed as a path, never as
    #: the key itself; $DAGCRAFT_SIGNING_KEY is inherited through the environment instead)
    signing_key: str | None = None


def worker_argv(store_url: str, run_id: str, opts: PoolOptions) -> list[str]:
    return [sys.executable, "-m", "dagcraft.cli.main", "worker", "--store", store_url, "--run", run_id,
            "--exit-when-idle", "--concurrency", str(opts.concurrency), "--lease-ttl", str(opts.lease_ttl),
            "--poll-max", str(opts.poll_max), "--quiet",
            *(["--keep-workdirs"] if opts.keep_workdirs else []),
            *(["--signing-key", opts.signing_key] if opts.signing_key else [])]


class Pool:
    def __init__(self, store: Store, store_url: str, run_id: str, opts: PoolOptions) -> None:
        self.store = store
        self.store_url = store_url
        self.run_id = run_id
        self.opts = opts
        self.procs: list[subprocess.Popen[bytes]] = []
        self.restarts = 0

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env.update(self.opts.env)
        return subprocess.Popen(worker_argv(self.store_url, self.run_id, self.opts), env=env,
                                stdin=subprocess.DEVNULL)

    def start(self) -> None:
        self.procs = [self._spawn() for _ in range(max(1, self.opts.workers))]

    def check(self, run_finished: bool) -> None:
        """Restart workers that died while the run still needs them."""
        for i, p in enumerate(self.procs):
            if p.poll() is not None and not run_finished and p.returncode == EXIT_FAILED:
                ops.raise_if_corrupt(self.store, self.run_id)  # restarting could never help
            if p.poll() is not None and not run_finished and self.restarts < MAX_RESTARTS:
                self.restarts += 1
                self.procs[i] = self._spawn()

    def stop(self, sig: int = signal.SIGINT, timeout: float = 10.0) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(sig)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def wait_exit(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.terminate()


#: what :func:`drive` returns for a run left waiting for an approval
WAITING = "waiting_approval"


def drive(store: Store, store_url: str, run_id: str, opts: PoolOptions,
          on_update: Callable[[LocalView], None] | None = None, poll_s: float = 0.2) -> str:
    """Run ``run_id`` to completion with a local pool; returns the final run status, or
    :data:`WAITING` when it can go on only after a person decides an approval gate (the
    workers have exited; ``resume`` after the decision continues it).
    Ctrl-C stops the workers (they hand running steps back) and raises Interrupted: the run
    stays resumable."""
    pool = Pool(store, store_url, run_id, opts)
    view = LocalView(store, run_id, detail=True)
    pool.start()
    try:
        while True:
            view.refresh()
            if on_update is not None:
                on_update(view)
            finished = view.control.status in RUN_FINISHED
            if finished:
                break
            if view.control.status == RunStatus.RUNNING and view.blocked_on_approval():
                # only a person can move it on: the workers exit too (exit_when_idle)
                pool.wait_exit()
                return WAITING
            pool.check(finished)
            if all(p.poll() is not None for p in pool.procs) and pool.restarts >= MAX_RESTARTS:
                break
            time.sleep(poll_s)
        pool.wait_exit()
    except KeyboardInterrupt:
        pool.stop(signal.SIGINT)
        raise Interrupted(f"interrupted; resume with: dagcraft resume {run_id}") from None
    except DagcraftError:  # the run turned unreadable or the store failed: never orphan workers
        pool.stop(signal.SIGINT)
        raise
    view.refresh()
    if on_update is not None:
        on_update(view)
    return view.control.status
