#!/usr/bin/env python3
"""A fake coding-agent CLI for offline examples and tests (stdlib only).

Usage: fake_agent.py -p PROMPT [--output-format stream-json|text] [--model NAME]

Behaves like ``claude -p``: reads the prompt, "thinks", writes files into the current
directory, and prints Claude Code-style stream-json lines (``system`` init with session_id and
model, ``assistant`` messages with ``tool_use``, ``user`` messages with ``tool_result``, a final
``result`` with usage tokens and ``total_cost_usd``). What it does is driven by the prompt:

- every file name mentioned in a sentence that says write/save/create (``Write the plan to
  plan.md``) is written, with a short body derived from the prompt;
- a prompt mentioning "subtask" gets a plan: subtasks are the ``;``-separated parts of the text
  after ``for:`` (three generic ones if there is only one part), listed in the written files and
  output as ``subtasks``;
- a prompt mentioning "review" outputs ``verdict`` and ``comments``: ``changes_requested`` (with
  the changes it asks for) when the prompt says ``round 1`` (a loop's first review round, e.g.
  ``Review round ${{ loop.iteration }}``), else ``approve`` (``LGTM``); so a review/fix loop
  approves on its second round;
- a prompt that carries a failing check's output fed back (a line with ``FAIL`` in it, e.g.
  from ``${{ attempt.previous.check.output }}``) gets the line ``status: fixed`` in every file
  it writes; without one it writes ``status: draft``. So a step whose ``check:`` requires
  ``status: fixed`` fails its check once, then passes with the feedback in hand.

Outputs (``summary``, ``session_id``, plus the above) are written as one JSON object to the
file named by ``$DAGCRAFT_OUTPUT`` when that is set.

Modes (``$FAKE_AGENT_MODE``): ``ok`` (default); ``fail`` (error result, exit 1); ``hang`` (sleep
until killed); ``flaky`` (on attempt 1, i.e. ``$DAGCRAFT_ATTEMPT`` unset or ``1``: "rate limit"
on stderr and exit 75; later attempts succeed); ``ratelimit`` (always exit 75, "rate limit").
``$FAKE_AGENT_DELAY`` seconds of simulated work (default 0.02).
``spend`` keeps spending until killed: an assistant message with usage
(``$FAKE_AGENT_TOKENS_IN`` / ``$FAKE_AGENT_TOKENS_OUT`` tokens, default 1000 / 500) every
``$FAKE_AGENT_TICK`` seconds (default 0.1), and no cost (the agent's ``prices`` give one);
with ``$FAKE_AGENT_ROUNDS`` set it succeeds after that many messages (a result without cost);
with ``$FAKE_AGENT_SPEND_LOG`` set, its pid first and then one line per message
(``<CLOCK_MONOTONIC time> <tokens so far>``) are appended there, so a test can tell when a
limit was crossed and when the process died.
With ``--output-format json`` the output is Codex-style (``codex exec --json``: thread, turn
and item events, usage tokens in ``turn.completed``, no cost).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
import uuid

MODEL = "fake-sonnet-1"
_FILE_RE = re.compile(r"(?<![\w/.-])([A-Za-z0-9_][A-Za-z0-9_./-]*\.(?:md|txt|py|json|yaml|yml|csv|toml))\b")
_WRITE_WORDS = re.compile(r"\b(write|save|create|put)\b", re.I)


def emit(obj: dict, fmt: str) -> None:
    if fmt == "stream-json":
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def safe_relpath(name: str) -> bool:
    return not name.startswith("/") and ".." not in name.split("/")


def files_to_write(prompt: str) -> list[str]:
    out: list[str] = []
    for sentence in re.split(r"(?<=[.!?])\s+|\n", prompt):
        if _WRITE_WORDS.search(sentence):
            for name in _FILE_RE.findall(sentence):
                if safe_relpath(name) and name not in out:
                    out.append(name)
    return out


def plan_subtasks(prompt: str) -> list[str]:
    m = re.search(r"for:\s*(.+?)(?:\.\s|\.$|\n|$)", prompt, re.S)
    topic = (m.group(1) if m else prompt).strip()
    parts = [p.strip() for p in topic.split(";") if p.strip()]
    if len(parts) > 1:
        return parts
    return [f"{topic}: core change", f"{topic}: tests", f"{topic}: docs"]


def usage(prompt: str, text: str) -> dict:
    return {
        "input_tokens": 40 + len(prompt) // 4,
        "output_tokens": 20 + len(text) // 4,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def spend_forever(session_id: str, model: str, fmt: str) -> int:
    tin = int(os.environ.get("FAKE_AGENT_TOKENS_IN", "1000"))
    tout = int(os.environ.get("FAKE_AGENT_TOKENS_OUT", "500"))
    tick = float(os.environ.get("FAKE_AGENT_TICK", "0.1"))
    log_path = os.environ.get("FAKE_AGENT_SPEND_LOG")
    if log_path:
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(f"pid {os.getpid()}\n")
    rounds = int(os.environ.get("FAKE_AGENT_ROUNDS", "0") or 0)
    n = 0
    while not rounds or n < rounds:  # until a budget (or a timeout, or cancel) kills our process group
        n += 1
        u = {"input_tokens": tin, "output_tokens": tout}
        if fmt == "json":
            line = {"type": "turn.completed", "usage": u}
        else:
            line = {"type": "assistant", "session_id": session_id, "message": {
                "id": f"msg_spend{n:06d}", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": f"thinking, round {n}"}], "stop_reason": None, "usage": u}}
        if log_path:  # logged before it is printed: the log's time is never after the crossing
            with open(log_path, "a", encoding="utf-8") as fh:
                fh.write(f"{time.monotonic():.6f} {n * (tin + tout)}\n")
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()
        time.sleep(tick)
    if fmt != "json":
        emit({"type": "result", "subtype": "success", "is_error": False, "session_id": session_id,
              "num_turns": n, "result": f"spent {n} rounds"}, fmt)
    out_file = os.environ.get("DAGCRAFT_OUTPUT")
    if out_file:
        with open(out_file, "w", encoding="utf-8") as fh:
            json.dump({"summary": f"spent {n} rounds", "session_id": session_id}, fh)
    return 0


def codex_style(prompt: str, session_id: str) -> int:
    """``codex exec --json``-shaped events: tokens per turn, never a cost."""
    text = f"Done: {prompt[:80]}"
    u = usage(prompt, text)
    for line in ({"type": "thread.started", "thread_id": session_id}, {"type": "turn.started"},
                 {"type": "item.completed", "item": {"id": "item_0", "type": "agent_message", "text": text}},
                 {"type": "turn.completed", "usage": {"input_tokens": u["input_tokens"], "cached_input_tokens": 0,
                                                      "output_tokens": u["output_tokens"]}}):
        sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()
    out_file = os.environ.get("DAGCRAFT_OUTPUT")
    if out_file:
        with open(out_file, "w", encoding="utf-8") as fh:
            json.dump({"summary": text, "session_id": session_id}, fh)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fake_agent", description="Fake coding agent for dagcraft examples.")
    ap.add_argument("-p", "--print", dest="prompt", required=True, help="the prompt")
    ap.add_argument("--output-format", default="text", choices=["text", "json", "stream-json"])
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    fmt, prompt = args.output_format, args.prompt
    mode = os.environ.get("FAKE_AGENT_MODE", "ok") or "ok"
    attempt = os.environ.get("DAGCRAFT_ATTEMPT", "1") or "1"
    session_id = str(uuid.UUID(hashlib.sha256(f"{prompt}|{attempt}|{os.getpid()}".encode()).hexdigest()[:32]))
    started = time.monotonic()
    cwd = os.getcwd()

    emit({"type": "system", "subtype": "init", "session_id": session_id, "model": args.model, "cwd": cwd,
          "tools": ["Read", "Write", "Bash"], "permissionMode": "default"}, fmt)

    if mode == "spend":
        return spend_forever(session_id, args.model, fmt)
    if fmt == "json":
        return codex_style(prompt, session_id)
    if mode == "hang":
        while True:  # until the orchestrator's timeout or cancel kills our process group
            time.sleep(3600)
    if mode == "ratelimit" or (mode == "flaky" and attempt == "1"):
        sys.stderr.write("API error: rate limit exceeded (429), please retry later\n")
        return 75
    if mode == "fail":
        text = "I could not complete the task: the build is broken."
        emit({"type": "result", "subtype": "error_during_execution", "is_error": True, "session_id": session_id,
              "duration_ms": int((time.monotonic() - started) * 1000), "num_turns": 1, "result": text,
              "total_cost_usd": 0.0004, "usage": usage(prompt, text)}, fmt)
        sys.stderr.write("fake_agent: task failed (FAKE_AGENT_MODE=fail)\n")
        return 1

    time.sleep(float(os.environ.get("FAKE_AGENT_DELAY", "0.02")))
    outputs: dict = {}
    low = prompt.lower()
    subtasks = plan_subtasks(prompt) if "subtask" in low else None
    if subtasks is not None:
        outputs["subtasks"] = subtasks
    if "review" in low:
        first_round = re.search(r"\bround 1\b", low) is not None
        outputs["verdict"] = "changes_requested" if first_round else "approve"
        outputs["comments"] = "add a test for the error path" if first_round else "LGTM"

    turn = 0
    for name in files_to_write(prompt):
        turn += 1
        body = f"# {name}\n\nWritten by fake_agent ({args.model}) for the task:\n\n> {prompt}\n"
        body += "\nstatus: fixed\n" if "FAIL" in prompt else "\nstatus: draft\n"
        if subtasks is not None:
            body += "\n## Subtasks\n\n" + "".join(f"- {s}\n" for s in subtasks)
        if "verdict" in outputs:
            body += f"\nVerdict: {outputs['verdict']}\n"
        tool_id = f"toolu_{turn:02d}{session_id[:8]}"
        emit({"type": "assistant", "session_id": session_id, "message": {
            "id": f"msg_{turn:02d}{session_id[:8]}", "type": "message", "role": "assistant", "model": args.model,
            "content": [{"type": "text", "text": f"I'll write {name}."},
                        {"type": "tool_use", "id": tool_id, "name": "Write",
                         "input": {"file_path": os.path.join(cwd, name), "content": body}}],
            "stop_reason": "tool_use", "usage": usage(prompt, body)}}, fmt)
        os.makedirs(os.path.dirname(name) or ".", exist_ok=True)
        with open(name, "w", encoding="utf-8") as fh:
            fh.write(body)
        emit({"type": "user", "session_id": session_id, "message": {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": tool_id, "content": f"File created successfully at: {name}"}]}}, fmt)

    text = f"Done: {prompt[:80]}"
    if subtasks is not None:
        text += f" ({len(subtasks)} subtasks)"
    outputs["summary"] = text
    outputs["session_id"] = session_id
    emit({"type": "assistant", "session_id": session_id, "message": {
        "id": f"msg_final{session_id[:8]}", "type": "message", "role": "assistant", "model": args.model,
        "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "usage": usage(prompt, text)}}, fmt)
    out_file = os.environ.get("DAGCRAFT_OUTPUT")
    if out_file:
        with open(out_file, "w", encoding="utf-8") as fh:
            json.dump(outputs, fh)
    u = usage(prompt, text)
    cost = round((u["input_tokens"] * 3 + u["output_tokens"] * 15) / 1_000_000, 6)
    result = {"type": "result", "subtype": "success", "is_error": False, "session_id": session_id,
              "duration_ms": int((time.monotonic() - started) * 1000), "num_turns": turn + 1, "result": text,
              "total_cost_usd": cost, "usage": u}
    if fmt == "stream-json":
        emit(result, fmt)
    elif fmt == "json":
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
