"""Agent-output adapters: turn an agent CLI's JSON-lines stdout into trace events.

An adapter is fed complete stdout lines (bytes, no newline) as they arrive and returns
``(kind, payload)`` pairs to append. It never raises on agent output: a line that is not JSON
becomes an ``x.agent.unparsed`` event (valid JSON of a type the adapter does not know is
ignored: agent CLIs add event types often). After the stream ends, :attr:`session_id`,
:attr:`result_text` and :attr:`usage` hold what was learned.

Conventions for the events produced:
- ``model.call``: agent, model, tokens_in, tokens_out (+ cache fields when given), cost_usd
  only when the agent reports a per-call cost;
- ``tool.call`` / ``tool.result``: the agent's own tool use (tool, tool_use_id, input /
  success, output_preview);
- ``x.agent.init`` (session id, model), ``x.agent.result`` (final result, ``cost_usd`` = the
  agent-reported total), ``error`` for agent-reported errors.
Summaries add up ``cost_usd`` over all events, so each adapter reports a cost exactly once.
"""

from __future__ import annotations

import json
from typing import Any

from dagcraft.errors import InvalidInput

PREVIEW = 4096
Emitted = list[tuple[str, dict[str, Any]]]


def preview(value: Any, limit: int = PREVIEW) -> str:
    """A bounded text rendering of any JSON-ish value."""
    s = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    if len(s) > limit:
        return s[: limit - 40] + f"… [{len(s) - limit + 40} chars omitted]"
    return s


class Adapter:
    """Base adapter: ``generic`` (no parsing)."""

    name = "generic"

    def __init__(self) -> None:
        self.session_id: str | None = None
        self.result_text: str | None = None
        self.model: str | None = None
        self.usage: dict[str, Any] = {"tokens_in": 0, "tokens_out": 0, "cost_usd": None, "model_calls": 0}
        self.lines = 0
        self.unparsed = 0

    def feed(self, line: bytes) -> Emitted:
        self.lines += 1
        return []

    def feed_overlong(self, nbytes: int, head: bytes) -> Emitted:
        """A line over the stream's bound was cut; it cannot be parsed."""
        self.lines += 1
        return []

    def finish(self) -> Emitted:
        return []


class _JsonAdapter(Adapter):
    def feed(self, line: bytes) -> Emitted:
        self.lines += 1
        if not line.strip():
            return []
        try:
            obj = json.loads(line)
        except ValueError as exc:
            return [self._unparsed(line, f"not JSON: {exc}")]
        if not isinstance(obj, dict):
            return [self._unparsed(line, "not a JSON object")]
        try:
            return self.handle(obj)
        except Exception as exc:  # an odd-shaped event must never crash the exec
            return [self._unparsed(line, f"unexpected shape: {type(exc).__name__}: {exc}")]

    def feed_overlong(self, nbytes: int, head: bytes) -> Emitted:
        self.lines += 1
        return [self._unparsed(head, f"line of {nbytes} bytes exceeds the line bound; not parsed")]

    def _unparsed(self, line: bytes, reason: str) -> tuple[str, dict[str, Any]]:
        self.unparsed += 1
        return ("x.agent.unparsed", {"agent": self.name, "line_no": self.lines, "reason": reason,
                                     "preview": preview(line[:1024].decode("utf-8", "replace"), 1024)})

    def _count(self, tin: Any, tout: Any) -> None:
        self.usage["tokens_in"] += int(tin or 0)
        self.usage["tokens_out"] += int(tout or 0)
        self.usage["model_calls"] += 1

    def handle(self, obj: dict[str, Any]) -> Emitted:
        raise NotImplementedError


class ClaudeAdapter(_JsonAdapter):
    """Claude Code ``-p --output-format stream-json [--verbose]``.

    Claude Code repeats one assistant message (same ``message.id``, same ``usage``) once per
    content block; a ``model.call`` is emitted once per message id so tokens are not counted
    twice, and every ``tool_use`` block becomes a ``tool.call``.
    """

    name = "claude"

    def __init__(self) -> None:
        super().__init__()
        self._seen_msgs: set[str] = set()
        self._tool_names: dict[str, str] = {}

    def handle(self, obj: dict[str, Any]) -> Emitted:
        t = obj.get("type")
        out: Emitted = []
        if obj.get("session_id"):
            self.session_id = obj["session_id"]
        if t == "system":
            if obj.get("subtype") == "init":
                self.model = obj.get("model") or self.model
                out.append(("x.agent.init", {"agent": "claude", "session_id": obj.get("session_id"),
                                             "model": obj.get("model"), "cwd": obj.get("cwd"),
                                             "tools": len(obj.get("tools") or []),
                                             "permission_mode": obj.get("permissionMode")}))
        elif t == "assistant":
            msg = obj.get("message") or {}
            mid = msg.get("id")
            model = msg.get("model") or self.model
            content = msg.get("content") or []
            if mid is None or mid not in self._seen_msgs:
                if mid is not None:
                    self._seen_msgs.add(mid)
                usage = msg.get("usage") or {}
                self._count(usage.get("input_tokens"), usage.get("output_tokens"))
                text = "".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
                p = {"agent": "claude", "model": model, "message_id": mid,
                     "tokens_in": int(usage.get("input_tokens") or 0),
                     "tokens_out": int(usage.get("output_tokens") or 0),
                     "cache_read_tokens": int(usage.get("cache_read_input_tokens") or 0),
                     "cache_creation_tokens": int(usage.get("cache_creation_input_tokens") or 0),
                     "stop_reason": msg.get("stop_reason")}
                if text:
                    p["text_preview"] = preview(text)
                out.append(("model.call", p))
            for b in content:
                if isinstance(b, dict) and b.get("type") == "tool_use":
                    self._tool_names[b.get("id", "")] = b.get("name", "?")
                    out.append(("tool.call", {"agent": "claude", "tool": b.get("name"),
                                              "tool_use_id": b.get("id"), "input": b.get("input")}))
        elif t == "user":
            msg = obj.get("message") or {}
            for b in msg.get("content") or []:
                if isinstance(b, dict) and b.get("type") == "tool_result":
                    tid = b.get("tool_use_id")
                    out.append(("tool.result", {"agent": "claude", "tool": self._tool_names.get(tid or ""),
                                                "tool_use_id": tid, "success": not b.get("is_error", False),
                                                "output_preview": preview(b.get("content"))}))
        elif t == "result":
            self.result_text = obj.get("result") if isinstance(obj.get("result"), str) else self.result_text
            cost = obj.get("total_cost_usd", obj.get("cost_usd"))
            if cost is not None:
                self.usage["cost_usd"] = float(cost)
            usage = obj.get("usage") or {}
            is_error = bool(obj.get("is_error")) or obj.get("subtype") not in (None, "success")
            out.append(("x.agent.result", {"agent": "claude", "subtype": obj.get("subtype"),
                                           "is_error": is_error, "session_id": obj.get("session_id"),
                                           "result_preview": preview(obj.get("result") or ""),
                                           "cost_usd": float(cost) if cost is not None else None,
                                           "num_turns": obj.get("num_turns"),
                                           "duration_ms": obj.get("duration_ms"),
                                           "tokens_in_total": usage.get("input_tokens"),
                                           "tokens_out_total": usage.get("output_tokens")}))
            if is_error:
                out.append(("error", {"agent": "claude", "message": f"agent result {obj.get('subtype')}",
                                      "detail": preview(obj.get("result") or obj.get("errors") or "")}))
        return out


class CodexAdapter(_JsonAdapter):
    """OpenAI Codex CLI ``codex exec --json`` (thread/turn/item events)."""

    name = "codex"

    def __init__(self) -> None:
        super().__init__()
        self._started: set[str | None] = set()  # items without an id share the None slot

    @staticmethod
    def _tool(item: dict[str, Any]) -> str:
        it = item.get("type")
        if it == "command_execution":
            return "shell"
        if it == "mcp_tool_call":
            return f"mcp:{item.get('server', '?')}/{item.get('tool', '?')}"
        return str(it)

    def _call(self, item: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        p: dict[str, Any] = {"agent": "codex", "tool": self._tool(item), "tool_use_id": item.get("id")}
        if item.get("type") == "command_execution":
            p["command"] = item.get("command")
        elif item.get("type") == "file_change":
            p["input"] = {"changes": item.get("changes")}
        elif item.get("type") == "mcp_tool_call":
            p["input"] = item.get("arguments")
        return ("tool.call", p)

    def handle(self, obj: dict[str, Any]) -> Emitted:
        t = obj.get("type")
        out: Emitted = []
        if t == "thread.started":
            self.session_id = obj.get("thread_id") or self.session_id
            out.append(("x.agent.init", {"agent": "codex", "session_id": self.session_id}))
        elif t in ("item.started", "item.updated", "item.completed"):
            item = obj.get("item") or {}
            it = item.get("type")
            iid = item.get("id")
            if it in ("command_execution", "file_change", "mcp_tool_call", "web_search"):
                if iid not in self._started:
                    self._started.add(iid)
                    out.append(self._call(item))
                if t == "item.completed":
                    status = item.get("status")
                    code = item.get("exit_code")
                    success = status in (None, "completed") and (code in (None, 0))
                    p: dict[str, Any] = {"agent": "codex", "tool": self._tool(item), "tool_use_id": iid,
                                         "success": success, "status": status}
                    if it == "command_execution":
                        p.update(command=item.get("command"), exit_code=code,
                                 output_preview=preview(item.get("aggregated_output") or ""))
                    elif it == "mcp_tool_call":
                        p["output_preview"] = preview(item.get("result") or item.get("error") or "")
                    out.append(("tool.result", p))
            elif it == "agent_message" and t == "item.completed":
                self.result_text = item.get("text")
                out.append(("x.agent.message", {"agent": "codex", "text_preview": preview(item.get("text") or "")}))
            elif it == "error" and t == "item.completed":
                out.append(("error", {"agent": "codex", "message": item.get("message")}))
            # reasoning / todo_list items carry no accounting information: not recorded
        elif t == "turn.completed":
            u = obj.get("usage") or {}
            self._count(u.get("input_tokens"), u.get("output_tokens"))
            out.append(("model.call", {"agent": "codex", "model": self.model,
                                       "tokens_in": int(u.get("input_tokens") or 0),
                                       "cached_tokens_in": int(u.get("cached_input_tokens") or 0),
                                       "tokens_out": int(u.get("output_tokens") or 0)}))
        elif t == "turn.failed":
            err = obj.get("error") or {}
            out.append(("error", {"agent": "codex", "message": err.get("message") if isinstance(err, dict) else str(err)}))
        elif t == "error":
            out.append(("error", {"agent": "codex", "message": obj.get("message")}))
        return out


ADAPTERS: dict[str, type[Adapter]] = {"generic": Adapter, "claude": ClaudeAdapter, "codex": CodexAdapter}


def get_adapter(name: str) -> Adapter:
    """A fresh adapter instance by name (``generic``, ``claude``, ``codex``)."""
    try:
        return ADAPTERS[name]()
    except KeyError:
        raise InvalidInput(f"unknown adapter {name!r} (choose from {', '.join(sorted(ADAPTERS))})") from None
