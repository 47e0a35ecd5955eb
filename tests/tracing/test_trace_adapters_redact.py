from __future__ import annotations

import pytest
from _tracehelp import DATA

from dagcraft.tracing import REDACTED, Redactor, get_adapter
from dagcraft.tracing.redact import LineRedactor


def feed_all(name, fname):
    ad = get_adapter(name)
    out = []
    for line in (DATA / fname).read_bytes().split(b"\n"):
        out.extend(ad.feed(line))
    out.extend(ad.finish())
    return ad, out


def test_claude_stream():
    ad, out = feed_all("claude", "claude_stream.jsonl")
    kinds = [k for k, _ in out]
    assert kinds == ["x.agent.init", "model.call", "tool.call", "tool.result", "model.call", "tool.call",
                     "tool.result", "x.agent.unparsed", "model.call", "x.agent.result"]
    assert ad.session_id == "5b1c2d3e-0000-4a1b-9c8d-111122223333"
    assert ad.result_text == "Added --json to status; tests pass."
    calls = [p for k, p in out if k == "model.call"]
    # msg_01AAA appears twice (one line per content block) but is counted once
    assert [c["tokens_in"] for c in calls] == [1520, 310, 420]
    assert sum(c["tokens_out"] for c in calls) == 153 == ad.usage["tokens_out"]
    assert calls[0]["model"] == "claude-sonnet-4-5-20250929" and calls[1]["cache_creation_tokens"] == 900
    tools = [p for k, p in out if k == "tool.call"]
    assert [t["tool"] for t in tools] == ["Grep", "Bash"] and tools[1]["input"]["command"].startswith("pytest")
    results = [p for k, p in out if k == "tool.result"]
    assert [r["success"] for r in results] == [True, False] and results[1]["tool"] == "Bash"
    final = out[-1][1]
    assert final["cost_usd"] == pytest.approx(0.04213) and final["num_turns"] == 4
    unparsed = out[7][1]
    assert unparsed["line_no"] == 7 and "not JSON" in unparsed["reason"]


def test_claude_error_result():
    ad = get_adapter("claude")
    out = ad.feed(b'{"type":"result","subtype":"error_max_turns","is_error":true,"session_id":"s","total_cost_usd":0.1}')
    assert [k for k, _ in out] == ["x.agent.result", "error"] and ad.session_id == "s"


def test_codex_stream():
    ad, out = feed_all("codex", "codex_stream.jsonl")
    kinds = [k for k, _ in out]
    assert kinds == ["x.agent.init", "tool.call", "tool.result", "tool.call", "tool.result", "tool.call",
                     "tool.result", "x.agent.message", "model.call", "error", "x.agent.unparsed"]
    assert ad.session_id == "0199a213-81c0-7800-8aa1-bbab2a035a53"
    assert ad.result_text == "Added a --json flag to `status`."
    res = [p for k, p in out if k == "tool.result"]
    assert [r["success"] for r in res] == [True, False, True]
    assert res[1]["exit_code"] == 1 and "1 failed" in res[1]["output_preview"]
    assert res[2]["tool"] == "file_change"
    mc = [p for k, p in out if k == "model.call"][0]
    assert (mc["tokens_in"], mc["cached_tokens_in"], mc["tokens_out"]) == (24763, 24448, 122)


@pytest.mark.parametrize("name", ["claude", "codex"])
@pytest.mark.parametrize("line", [b"\xff\xfe garbage", b"[1,2]", b'{"type":"assistant","message":"nope"}',
                                  b'{"type":"item.completed","item":null}', b"null", b"{"])
def test_adapters_never_crash(name, line):
    ad = get_adapter(name)
    for k, _p in ad.feed(line):
        assert k.startswith("x.") or k in ("model.call", "tool.call", "tool.result", "error")


def test_generic_adapter_parses_nothing():
    ad = get_adapter("generic")
    assert ad.feed(b'{"type":"result","result":"x"}') == [] and ad.result_text is None


SHAPES = {
    "aws_key_id": ("id=AKIAIOSFODNN7EXAMPLE ok", "AKIAIOSFODNN7EXAMPLE"),
    "aws_sts_id": ("ASIAY34FZKBOKMUTVV7A", "ASIAY34FZKBOKMUTVV7A"),
    "aws_secret": ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    "aws_secret_env": ('AWS_SECRET_ACCESS_KEY="wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"', "wJalrXUtnFEMI"),
    "bearer": ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig", "eyJhbGciOiJIUzI1NiJ9"),
    "openai": ("key sk-proj-abcdefghijklmnopqrstuvwx1234", "sk-proj-abcdefghijklmnopqrstuvwx1234"),
    "anthropic": ("ANTHROPIC_API_KEY=sk-ant-api03-AbCdEfGhIjKlMnOpQrStUv_wx-yz", "sk-ant-api03"),
    "github": ("ghp_1234567890abcdefghijklmnopqrstuvwxyzAB", "ghp_1234567890abcdefghij"),
    "github_pat": ("github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz", "github_pat_11ABCDEFG"),
    "pem": ("x\n-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk\nAAAA\n-----END OPENSSH PRIVATE KEY-----\ny",
            "b3BlbnNzaC1rZXk"),
    "registered": ("password is Tr0ub4dor&3 !", "Tr0ub4dor&3"),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_redaction_shapes(shape):
    text, secret = SHAPES[shape]
    r = Redactor(["Tr0ub4dor&3"])
    out = r.redact_text(text)
    assert secret not in out and REDACTED in out and r.count >= 1
    # bytes path (logs) too
    assert secret.encode() not in r.redact_bytes(text.encode())


def test_redaction_leaves_ordinary_text_and_is_deep():
    r = Redactor(["s3cr3t-value"])
    text = "sk- is a prefix; AKIA short; Bearer x; ghp_short; the task succeeded"
    assert r.redact_text(text) == text and r.count == 0
    obj = r.redact({"a": ["s3cr3t-value", {"s3cr3t-value": 1}], "b": ("x", 3), "n": None})
    assert obj == {"a": [REDACTED, {REDACTED: 1}], "b": ["x", 3], "n": None} and r.count == 2
    r.add("ab")  # too short to be a real secret: ignored rather than shredding every log
    assert r.redact_text("cab") == "cab"


def test_line_redactor_pem_across_lines():
    lr = LineRedactor(Redactor())
    lines = [b"before\n", b"-----BEGIN PRIVATE KEY-----\n", b"MIIEvQIBADANBg\n", b"-----END PRIVATE KEY-----\n",
             b"after sk-ant-abcdefghijklmnopqrstuvwxyz\n"]
    out = b"".join(lr.feed(x) for x in lines)
    assert out == b"before\n[redacted]\nafter [redacted]\n" and lr.r.count == 2
