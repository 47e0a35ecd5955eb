"""dagcraft.orchestrator: runs compiled workflows on the store.

Submit, workers, the local pool, the supervisor, retries, rollback, resume — see
``docs/operations.md`` and ``docs/store.md`` for the run layout and guarantees.
"""

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
