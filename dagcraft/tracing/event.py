"""The trace event model: one JSON object per line of a trace file.

Wire format (one line, UTF-8, ASCII-escaped JSON, ``\\n``-terminated)::

    {"version":1,"run_id":"...","event_id":"...","kind":"tool.call","ts_ms":1700000000000,
     "seq":3,"payload":{...},"prev":"<sha256 hex of the previous line's bytes>"}

``prev`` is ``null`` on the first line and the SHA-256 of the exact bytes of the previous line
(without its newline) on every other line, so an edited, removed, inserted or reordered line
breaks the chain. Files written by the older *traceframe* tool have the same fields without
``prev``; they are read everywhere and verify as "valid (unchained)".
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, Field

from dagcraft.errors import InvalidInput
from dagcraft.primitives.ulid import new_ulid

VERSION = 1

#: The traceframe kinds (an agent run) ...
AGENT_KINDS = (
    "run.started",
    "model.call",
    "tool.call",
    "tool.result",
    "permission.decision",
    "error",
    "run.finished",
)
#: ... and dagcraft's own kinds for step attempts.
STEP_KINDS = (
    "step.claimed",
    "step.heartbeat_lost",
    "step.retry",
    "step.fenced",
    "step.timeout",
    "step.cancelled",
    "output.set",
    "artifact.put",
    "rollback.started",
    "rollback.finished",
    # written by TraceWriter itself when it repairs a torn tail left by a crashed writer
    "trace.repaired",
)
KINDS = frozenset(AGENT_KINDS + STEP_KINDS)
#: Kinds from outside (agents, hooks, adapters) live under this prefix instead of being dropped.
EXTENSION_PREFIX = "x."


def validate_kind(kind: str) -> str:
    """Return ``kind`` if it is a known kind or ``x.<something>``; raise InvalidInput otherwise."""
    if not isinstance(kind, str):
        raise InvalidInput(f"event kind must be a string, got {kind!r}")
    if kind in KINDS:
        return kind
    if kind.startswith(EXTENSION_PREFIX) and len(kind) > 2 and len(kind) <= 200 and kind.isprintable() \
            and " " not in kind:
        return kind
    raise InvalidInput(f"unknown event kind {kind!r} (known kinds, or 'x.*' for extensions)")


class TraceEvent(BaseModel):
    """One trace event. ``prev`` is None on the first line and on traceframe (unchained) lines."""

    version: int
    run_id: str
    event_id: str
    kind: str
    ts_ms: int
    seq: int
    payload: dict[str, Any] = Field(default_factory=dict)
    prev: str | None = None


def new_event_id() -> str:
    """A ULID (:func:`dagcraft.primitives.ulid.new_ulid`): unique, and increasing within a
    process, so a trace's events sort by id as they were appended."""
    return new_ulid()


def line_hash(line: bytes) -> str:
    """SHA-256 hex of one line's exact bytes, without the trailing newline."""
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def encode_event(d: dict[str, Any]) -> bytes:
    """Serialize an event dict to its line bytes (no newline). ASCII-escaped, so any payload
    (lone surrogates included) encodes; unknown objects are stringified rather than failing."""
    return json.dumps(d, separators=(",", ":"), ensure_ascii=True, default=str).encode("ascii")


REQUIRED_FIELDS = ("version", "run_id", "event_id", "kind", "ts_ms", "seq", "payload")


def parse_line(line: bytes) -> tuple[TraceEvent, bool]:
    """Parse one line into an event. Returns (event, has_prev_key). Raises ValueError."""
    obj = json.loads(line)
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    missing = [f for f in REQUIRED_FIELDS if f not in obj]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    for f, t in (("version", int), ("ts_ms", int), ("seq", int)):
        if not isinstance(obj[f], t) or isinstance(obj[f], bool):
            raise ValueError(f"field {f} must be an integer")
    for f in ("run_id", "event_id", "kind"):
        if not isinstance(obj[f], str):
            raise ValueError(f"field {f} must be a string")
    if not isinstance(obj["payload"], dict):
        raise ValueError("field payload must be an object")
    prev = obj.get("prev")
    if prev is not None and not isinstance(prev, str):
        raise ValueError("field prev must be a string or null")
    ev = TraceEvent.model_construct(
        version=obj["version"], run_id=obj["run_id"], event_id=obj["event_id"], kind=obj["kind"],
        ts_ms=obj["ts_ms"], seq=obj["seq"], payload=obj["payload"], prev=prev,
    )
    return ev, "prev" in obj
