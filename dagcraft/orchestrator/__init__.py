"""dagcraft.orchestrator: runs compiled workflows on the store.

Submit, workers, the local pool, the supervisor, retries, rollback, resume — see
``docs/operations.md`` and ``docs/store.md`` for the run layout and guarantees.

The names below are imported on first use (PEP 562), so that ``status`` or ``submit`` loads
only the modules it runs, not the worker, the pool and everything they import;
``from dagcraft.orchestrator import submit`` works as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dagcraft._lazy import lazy_names

if TYPE_CHECKING:
    from dagcraft.orchestrator.attempt import WorkerConfig
    from dagcraft.orchestrator.ops import (
        cancel,
        list_runs,
        prepare_resume,
        read_log,
        request_rollback,
        retry_from,
        run_status,
    )
    from dagcraft.orchestrator.pool import PoolOptions, drive
    from dagcraft.orchestrator.report import report_view, resolve_traces, write_report
    from dagcraft.orchestrator.submission import identity, submit
    from dagcraft.orchestrator.worker import Worker

#: public name -> the module that defines it
_HOME = {
    "WorkerConfig": "attempt",
    "cancel": "ops",
    "list_runs": "ops",
    "prepare_resume": "ops",
    "read_log": "ops",
    "request_rollback": "ops",
    "retry_from": "ops",
    "run_status": "ops",
    "PoolOptions": "pool",
    "drive": "pool",
    "report_view": "report",
    "resolve_traces": "report",
    "write_report": "report",
    "identity": "submission",
    "submit": "submission",
    "Worker": "worker",
}

__all__ = [
    "PoolOptions",
    "Worker",
    "WorkerConfig",
    "cancel",
    "drive",
    "identity",
    "list_runs",
    "prepare_resume",
    "read_log",
    "report_view",
    "request_rollback",
    "resolve_traces",
    "retry_from",
    "run_status",
    "submit",
    "write_report",
]


__getattr__, __dir__ = lazy_names(__name__, _HOME)
