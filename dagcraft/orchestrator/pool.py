"""A local pool: N worker processes for one run, restarted when they die, with progress.

The pool process itself never runs steps; it watches the run through the journal (like any
worker) and renders progress. Its workers are ordinary ``dagcraft worker`` processes, so a run
started by a pool can be joined by workers on other hosts, and resumed by any of them.

Worker start: where ``os.fork`` exists (Linux; not macOS, where forking a process that has
loaded system frameworks is unsafe) and the pool process has no other thread, each worker is a
fork of the pool process, which has already imported everything a worker needs: a fresh
interpreter would spend ~0.5 s importing it again, per worker. The forked child behaves as
``dagcraft worker --run RUN --exit-when-idle --quiet ...`` does (:func:`_forked_worker`).
Otherwise, or with ``DAGCRAFT_WORKER_START=exec``, each worker is a new ``python -m
dagcraft.cli.main worker`` process. Both kinds are driven through the same handle (the part
of ``subprocess.Popen`` the pool uses).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from dagcraft.errors import EXIT_FAILED, DagcraftError, Interrupted, exit_code_for
from dagcraft.orchestrator import ops
from dagcraft.orchestrator.model import RUN_FINISHED, RunStatus
from dagcraft.orchestrator.view import LocalView
from dagcraft.primitives.local import LocalStore
from dagcraft.primitives.store import Store

log = logging.getLogger(__name__)

MAX_RESTARTS = 20
#: ``exec`` starts every local worker as a new interpreter, never as a fork
WORKER_START_ENV = "DAGCRAFT_WORKER_START"


@dataclass
class PoolOptions:
    workers: int = field(default_factory=lambda: os.cpu_count() or 2)
    concurrency: int = 1
    lease_ttl: float = 30.0
    #: the workers' longest idle wait, so how late they see other workers' changes and the
    #: run's end at worst; None: by store (:func:`default_poll_max`)
    poll_max: float | None = None
    echo: bool = False
    env: dict[str, str] = field(default_factory=dict)
    keep_workdirs: bool = False
    #: path of the Ed25519 key the workers sign run seals with (passed as a path, never as
    #: the key itself; $DAGCRAFT_SIGNING_KEY is inherited through the environment instead)
    signing_key: str | None = None


#: a poll of the local store is a directory read; on S3 it is a billed LIST
LOCAL_POLL_MAX_S = 0.1
S3_POLL_MAX_S = 0.5


def default_poll_max(store: Store) -> float:
    return LOCAL_POLL_MAX_S if isinstance(store, LocalStore) else S3_POLL_MAX_S


def _poll_max(opts: PoolOptions) -> float:
    return opts.poll_max if opts.poll_max is not None else S3_POLL_MAX_S  # Pool resolves it by store


def worker_argv(store_url: str, run_id: str, opts: PoolOptions) -> list[str]:
    return [sys.executable, "-m", "dagcraft.cli.main", "worker", "--store", store_url, "--run", run_id,
            "--exit-when-idle", "--concurrency", str(opts.concurrency), "--lease-ttl", str(opts.lease_ttl),
            "--poll-max", str(_poll_max(opts)), "--quiet",
            *(["--keep-workdirs"] if opts.keep_workdirs else []),
            *(["--signing-key", opts.signing_key] if opts.signing_key else [])]


class WorkerProcess(Protocol):
    """The part of ``subprocess.Popen`` the pool uses: a Popen, or a :class:`ForkedWorker`."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...

    def terminate(self) -> None: ...


class ForkedWorker:
    """A worker forked from this process, with Popen's semantics: ``returncode`` is None while
    it runs, then its exit code, or ``-N`` when signal N killed it; ``wait(timeout)`` raises
    ``subprocess.TimeoutExpired``; signals to a reaped child are not sent (its pid may have
    been reused)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def _reap(self, flags: int) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, flags)
            except ChildProcessError:  # reaped elsewhere: its status is lost (as Popen: 0)
                self.returncode = 0
                return 0
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def poll(self) -> int | None:
        return self._reap(os.WNOHANG)

    def wait(self, timeout: float | None = None) -> int:
        if timeout is None:
            code = self._reap(0)
            assert code is not None
            return code
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while (code := self.poll()) is None:  # no blocking waitpid with a timeout: Popen polls too
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(f"worker pid {self.pid}", timeout)
            delay = min(delay * 2, left, 0.05)
            time.sleep(delay)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


def fork_unsafe_reason() -> str | None:
    """Why workers must be exec'd rather than forked from this process now, or None when a
    fork is safe: no ``os.fork`` or macOS, ``$DAGCRAFT_WORKER_START=exec``, or another thread
    running (a lock it holds would stay locked forever in the child)."""
    if os.environ.get(WORKER_START_ENV, "").strip().lower() == "exec":
        return f"${WORKER_START_ENV}=exec"
    if not hasattr(os, "fork") or sys.platform == "darwin":
        return f"no safe os.fork on {sys.platform}"
    if threading.active_count() != 1:
        return f"{threading.active_count()} threads running"
    return None


def _forked_worker(store_url: str, run_id: str, opts: PoolOptions) -> int:
    """In a forked child: become ``dagcraft worker`` with :func:`worker_argv`'s options and
    return its exit code. What the fork inherited that a fresh worker would not have is reset
    here: the parent's Python signal handlers (back to a new interpreter's; ignored signals
    stay ignored, as across exec), stdin (``/dev/null``), the environment (``opts.env``
    applied). The store is opened anew from its URL by :func:`serve`: the parent's store object
    (its boto3 client and connection pool) is never used in the child. Module state is safe to
    inherit: ULIDs reseed at fork (:mod:`dagcraft.primitives.ulid`), the capabilities cache
    describes the server behind a URL (not a process), logging re-creates its locks at fork,
    and the parent's progress display and console are never touched."""
    from dagcraft.orchestrator.worker import ServeOptions, serve

    # the parent's stream objects may be wrappers (rich's live display, redirect_stdout):
    # the worker writes to its own stdout and stderr, as an exec'd worker does
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    signal.set_wakeup_fd(-1)
    for sig in signal.valid_signals():
        try:
            if callable(signal.getsignal(sig)):  # a Python-level handler of the parent
                # as a new interpreter starts: Ctrl-C raises KeyboardInterrupt (exit 130) until
                # the worker installs its own handlers; every other signal its default action
                signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        except (OSError, ValueError):
            continue
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)
    sys.stdin = open(os.devnull)  # noqa: SIM115 - lives as long as the process
    serve_opts = ServeOptions(run_id=run_id, concurrency=opts.concurrency, exit_when_idle=True,
                              lease_ttl=opts.lease_ttl, poll_max=_poll_max(opts), keep_workdirs=opts.keep_workdirs,
                              signing_key=opts.signing_key)
    return serve(store_url, serve_opts, env=opts.env)


def fork_worker(store_url: str, run_id: str, opts: PoolOptions) -> ForkedWorker:
    """Fork a worker (see :func:`_forked_worker`). The child never returns into the caller's
    stack: it ends with ``os._exit`` after flushing stdout and stderr, so no finally block,
    atexit handler or buffered output of the parent runs or is written twice; a typed error
    prints one ``dagcraft: ...`` line and exits with its code, as the ``worker`` command does."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is not None:  # else what the parent buffered would be written by each child too
            stream.flush()
    pid = os.fork()
    if pid:
        return ForkedWorker(pid)
    code = EXIT_FAILED
    try:
        code = _forked_worker(store_url, run_id, opts)
    except SystemExit as exc:
        code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else EXIT_FAILED
    except DagcraftError as exc:
        code = exc.exit_code
        for line in str(exc).splitlines() or [""]:
            print(f"dagcraft: {line}", file=sys.stderr)
    except KeyboardInterrupt as exc:
        code = exit_code_for(exc)
        print("dagcraft: interrupted", file=sys.stderr)
    except BaseException:  # a bug: its traceback, as an exec'd worker would print it
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    raise AssertionError("unreachable")  # pragma: no cover


class Pool:
    def __init__(self, store: Store, store_url: str, run_id: str, opts: PoolOptions) -> None:
        self.store = store
        self.store_url = store_url
        self.run_id = run_id
        self.opts = opts if opts.poll_max is not None else replace(opts, poll_max=default_poll_max(store))
        self.procs: list[WorkerProcess] = []
        self.restarts = 0

    def _spawn(self) -> WorkerProcess:
        why = fork_unsafe_reason()
        if why is None:
            return fork_worker(self.store_url, self.run_id, self.opts)
        log.debug("starting a worker with exec, not fork: %s", why)
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

    def drain(self) -> None:
        """Ask every live worker to exit once its running attempts end (SIGTERM: it claims
        nothing more; its uploads still complete)."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

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
    pool.start()  # first: the workers claim while this process builds its own view
    try:
        view = LocalView(store, run_id, detail=True)
        while True:
            view.refresh()
            if on_update is not None:
                on_update(view)
            finished = view.control.status in RUN_FINISHED
            if finished:
                # workers idle in their poll backoff would notice only at their next poll:
                # told to drain, they exit now (nothing of the run is left to interrupt)
                pool.drain()
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
