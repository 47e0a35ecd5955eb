"""Policy check over a trace: permission denies left unresolved, and sensitive capabilities
used without a recorded allow.

Rules (each violation names the event's line/seq):
1. **Unresolved deny**: a ``permission.decision`` with decision ``deny`` for which no later
   ``allow`` for the same subject was recorded (subject = ``tool_use_id`` if present, else tool +
   command/input).
2. **Sensitive capability without allow**: a ``tool.call`` whose command text (``command``,
   ``input.command``, ``argv``) contains a sensitive pattern (whitespace-normalised substring,
   e.g. ``git push``) needs an earlier ``permission.decision`` ``allow`` for the same
   ``tool_use_id``, the same command, or naming the pattern in ``capability``.
Decisions are compared case-insensitively; ``approve``/``allowed`` count as allow,
``block``/``denied`` as deny.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel

from dagcraft.tracing.event import TraceEvent

DEFAULT_SENSITIVE = ("git push", "rm -rf", "git reset --hard", "npm publish", "terraform apply",
                     "kubectl delete", "drop table")
_ALLOW = {"allow", "allowed", "approve", "approved", "accept", "yes"}
_DENY = {"deny", "denied", "block", "blocked", "reject", "rejected", "no"}


class Violation(BaseModel):
    rule: str            # "unresolved_deny" | "sensitive_without_allow"
    seq: int
    event_id: str
    message: str
    source: str | None = None


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip().lower()


def command_text(p: dict[str, Any]) -> str:
    parts = []
    if isinstance(p.get("command"), str):
        parts.append(p["command"])
    inp = p.get("input") or p.get("tool_input")
    if isinstance(inp, dict):
        for k in ("command", "cmd", "script"):
            if isinstance(inp.get(k), str):
                parts.append(inp[k])
    if isinstance(p.get("argv"), list):
        parts.append(" ".join(str(a) for a in p["argv"]))
    return _norm(" \n ".join(dict.fromkeys(parts)))  # dedupe: hooks carry command twice


def _subject(p: dict[str, Any]) -> str:
    if p.get("tool_use_id"):
        return f"id:{p['tool_use_id']}"
    inp = p.get("input") or p.get("tool_input")
    return f"{p.get('tool') or ''}:{command_text(p) or json.dumps(inp, sort_keys=True, default=str)}"


def _decision(p: dict[str, Any]) -> str:
    d = str(p.get("decision") or p.get("behavior") or "").lower()
    return "allow" if d in _ALLOW else "deny" if d in _DENY else d


def check(events: Iterable[TraceEvent], sensitive: Iterable[str] = DEFAULT_SENSITIVE, *,
          source: str | None = None) -> list[Violation]:
    """All policy violations in one trace, in event order."""
    pats = [_norm(s) for s in sensitive if s and s.strip()]
    out: list[Violation] = []
    denies: dict[str, TraceEvent] = {}
    allowed_subjects: set[str] = set()
    allowed_commands: set[str] = set()
    allowed_caps: set[str] = set()
    for ev in events:
        p = ev.payload
        if ev.kind == "permission.decision":
            subj = _subject(p)
            d = _decision(p)
            if d == "deny":
                denies[subj] = ev
            elif d == "allow":
                denies.pop(subj, None)
                allowed_subjects.add(subj)
                if command_text(p):
                    allowed_commands.add(command_text(p))
                if p.get("capability"):
                    allowed_caps.add(_norm(str(p["capability"])))
        elif ev.kind == "tool.call":
            text = command_text(p)
            if not text:
                continue
            for pat in pats:
                if pat in text and not (_subject(p) in allowed_subjects or text in allowed_commands
                                        or pat in allowed_caps):
                    out.append(Violation(rule="sensitive_without_allow", seq=ev.seq, event_id=ev.event_id,
                                         source=source,
                                         message=f"seq {ev.seq}: sensitive '{pat}' used without a recorded allow: "
                                                 f"{text[:200]}"))
                    break
    for subj, ev in denies.items():
        out.append(Violation(rule="unresolved_deny", seq=ev.seq, event_id=ev.event_id, source=source,
                             message=f"seq {ev.seq}: permission denied and never resolved: "
                                     f"{ev.payload.get('tool') or ''} {command_text(ev.payload) or subj}".strip()))
    out.sort(key=lambda v: v.seq)
    return out
