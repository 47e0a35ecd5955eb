"""Map an agent host's hook payload (Claude Code hooks and similar) to one trace event.

Claude Code hook input (JSON on stdin) has ``hook_event_name``, ``session_id`` and per-event
fields. Mapping:
- ``PreToolUse`` → ``tool.call`` (tool, input, tool_use_id, source ``hook``);
- ``PostToolUse`` → ``tool.result`` (success unless the response reports an error);
- ``PermissionRequest`` / any payload carrying a decision (``decision``,
  ``permission_decision``, ``hookSpecificOutput.permissionDecision``) → ``permission.decision``;
- ``Notification`` → ``x.hook.notification``; ``Stop``/``SubagentStop`` → ``x.hook.stop``;
  ``UserPromptSubmit`` → ``x.hook.user_prompt``; anything else → ``x.hook.<name>``;
- a payload with ``error`` → ``error``;
- a payload that already is an event (``{"kind": ..., "payload": {...}}``) is appended as is
  (kind validated: known kinds or ``x.*``).
"""

from __future__ import annotations

import re
from typing import Any

from dagcraft.errors import InvalidInput
from dagcraft.tracing.adapters import preview
from dagcraft.tracing.event import validate_kind


def _snake(name: str) -> str:
    s = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
    return re.sub(r"[^a-z0-9_.-]", "_", s) or "unknown"


def map_hook(data: Any) -> tuple[str, dict[str, Any]]:
    """(kind, payload) for one hook payload. InvalidInput when it is not a JSON object."""
    if not isinstance(data, dict):
        raise InvalidInput("hook payload must be a JSON object")
    if "kind" in data and isinstance(data.get("payload", {}), dict) and "hook_event_name" not in data:
        return validate_kind(data["kind"]), dict(data.get("payload") or {})
    name = str(data.get("hook_event_name") or data.get("event") or "")
    base: dict[str, Any] = {"source": "hook", "hook": name or None}
    for k in ("session_id", "tool_use_id", "cwd"):
        if data.get(k):
            base[k] = data[k]
    tool = data.get("tool_name") or data.get("tool")
    if tool:
        base["tool"] = tool
    tin = data.get("tool_input")
    if isinstance(tin, dict) and isinstance(tin.get("command"), str):
        base["command"] = tin["command"]
    raw_hso = data.get("hookSpecificOutput")
    hso: dict[str, Any] = raw_hso if isinstance(raw_hso, dict) else {}
    decision = data.get("permission_decision") or data.get("decision") or hso.get("permissionDecision")
    if name == "PermissionRequest" or decision is not None:
        p = dict(base, decision=str(decision or "ask"), input=tin)
        reason = data.get("reason") or data.get("permission_decision_reason") or hso.get("permissionDecisionReason")
        if reason:
            p["reason"] = reason
        if data.get("capability"):
            p["capability"] = data["capability"]
        return "permission.decision", p
    if data.get("error") and name not in ("PreToolUse", "PostToolUse"):
        return "error", dict(base, message=preview(data["error"], 2000))
    if name == "PreToolUse":
        return "tool.call", dict(base, input=tin)
    if name == "PostToolUse":
        resp = data.get("tool_response")
        failed = bool(data.get("error")) or (isinstance(resp, dict) and bool(
            resp.get("is_error") or resp.get("error") or resp.get("success") is False or resp.get("interrupted")))
        return "tool.result", dict(base, input=tin, success=not failed, output_preview=preview(resp or data.get("error") or ""))
    if name == "Notification":
        return "x.hook.notification", dict(base, message=data.get("message"))
    if name in ("Stop", "SubagentStop"):
        return "x.hook.stop", dict(base, subagent=name == "SubagentStop")
    if name == "UserPromptSubmit":
        return "x.hook.user_prompt", dict(base, prompt=preview(data.get("prompt") or "", 2000))
    extra = {k: v for k, v in data.items() if k not in ("hook_event_name", "session_id", "transcript_path")}
    return f"x.hook.{_snake(name) if name else 'unknown'}", dict(base, data=extra)
