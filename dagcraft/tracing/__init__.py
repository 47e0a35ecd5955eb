"""dagcraft.tracing: append-only, hash-chained per-step traces.

Event model, writer, traced exec, agent-output adapters, read/verify, summary, HTML reports,
ledger, policy check, hook ingest and OTLP export. Never imports orchestrator, workflows or cli.
"""

from dagcraft.tracing.adapters import Adapter, ClaudeAdapter, CodexAdapter, get_adapter
from dagcraft.tracing.event import KINDS, TraceEvent, new_event_id, validate_kind
from dagcraft.tracing.exec import ExecResult, traced_exec
from dagcraft.tracing.reader import RunVerifyReport, TraceStatus, VerifyReport, iter_trace, read_trace, verify
from dagcraft.tracing.redact import REDACTED, Redactor
from dagcraft.tracing.summary import summarize
from dagcraft.tracing.writer import TornTail, TornTailWarning, TraceWriter

__all__ = [
    "KINDS",
    "REDACTED",
    "Adapter",
    "ClaudeAdapter",
    "CodexAdapter",
    "ExecResult",
    "Redactor",
    "RunVerifyReport",
    "TornTail",
    "TornTailWarning",
    "TraceEvent",
    "TraceStatus",
    "TraceWriter",
    "VerifyReport",
    "get_adapter",
    "iter_trace",
    "new_event_id",
    "read_trace",
    "summarize",
    "traced_exec",
    "validate_kind",
    "verify",
]
