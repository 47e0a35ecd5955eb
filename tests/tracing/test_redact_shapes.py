"""Issue 9.3/9.5: every common credential shape is redacted; ordinary text is left alone.

Sample tokens are assembled from pieces so that no secret scanner mistakes this file for a leak;
they are well-formed but fake.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dagcraft.tracing import REDACTED, Redactor
from dagcraft.tracing.redact import _LITERALS, _PATTERNS, LineRedactor

A = "abcdefghijklmnopqrstuvwxyz0123456789ABCD"  # 40 alnum characters to cut tokens from

SHAPES: dict[str, str] = {
    "aws_access_key_id": "AKIA" + "IOSFODNN7EXAMPLE",
    "aws_sts_key_id": "ASIA" + "Y34FZKBOKMUTVV7A",
    "aws_secret_key_ini": "aws_secret_access_key = " + "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "aws_secret_key_json": '"SecretAccessKey": "' + "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY" + '"',
    "aws_secret_key_env": "AWS_SECRET_ACCESS_KEY=" + "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "github_ghp": "ghp_" + A[:36],
    "github_gho": "gho_" + A[:36],
    "github_pat": "github_pat_" + "11ABCDEFG0" + A[:12] + "_" + A[:47],
    "slack_xoxb": "xoxb-" + "1234567890-1234567890123-" + A[:24],
    "slack_xoxp": "xoxp-" + "1234567890-1234567890-1234567890123-" + A[:32],
    "slack_xoxa": "xoxa-2-" + "1234567890-" + A[:30],
    "slack_xapp": "xapp-1-" + "A0123456789-1234567890123-" + A[:40],
    "slack_webhook": "https://hooks.slack.com/services/" + "T00000000/B00000000/" + "XXXXXXXXXXXXXXXXXXXXXXXX",
    "stripe_sk_live": "sk_live_" + A[:24],
    "stripe_rk_live": "rk_live_" + A[:24],
    "stripe_sk_test": "sk_test_" + A[:24],
    "stripe_whsec": "whsec_" + A[:32],
    "bearer": "Authorization: Bearer " + A[:30],
    "google_api_key": "AIza" + "SyA-" + A[:31],
    "openai_legacy": "sk-" + A[:20] + "T3BlbkFJ" + A[:20],
    "openai_project": "sk-proj-" + A[:40] + "_" + A[:20],
    "anthropic": "sk-ant-api03-" + A[:40] + "-" + A[:20] + "AA",
    "jwt": "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9" + ".eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ"
           + ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
    "pem_rsa": "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA" + A + "\n" + A + "==\n-----END RSA PRIVATE KEY-----",
    "pem_ec": "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEI" + A + "\n-----END EC PRIVATE KEY-----",
    "pem_openssh": "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA" + A
                   + "\n-----END OPENSSH PRIVATE KEY-----",
    "pem_plain": "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC" + A + "\n-----END PRIVATE KEY-----",
}


# the part of each sample that must not survive (a recognisable chunk of its secret part)
def _secret_part(name: str, sample: str) -> str:
    if name.startswith("aws_secret"):
        return "wJalrXUtnFEMI"
    if name.startswith("pem"):
        return A
    return sample


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shape_is_redacted_in_text_bytes_and_lines(name):
    sample = SHAPES[name]
    secret = _secret_part(name, sample)
    text = f"before {sample} after"
    r = Redactor()
    out = r.redact_text(text)
    assert secret not in out, out
    assert REDACTED in out and r.count >= 1
    assert out.startswith("before ") and (out.endswith(" after") or name.startswith("pem"))
    assert secret.encode() not in r.redact_bytes(text.encode())
    # logs: line by line, as traced_exec redacts them
    lr = LineRedactor(Redactor())
    logged = b"".join(lr.feed(line) for line in text.encode().splitlines(keepends=True))
    assert secret.encode() not in logged
    # deep structures (outputs, cache entries): values and keys
    deep = Redactor().redact({"v": [sample], sample: 1})
    assert secret not in repr(deep)


def test_unterminated_pem_block_is_redacted_to_the_end():
    r = Redactor()
    out = r.redact_text("key:\n-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA" + A)
    assert out == "key:\n" + REDACTED


ORDINARY = [
    "the task succeeded in 3.2s; 14 files changed",
    "git commit 5161f78c0ffee1234567890abcdef1234567890ab",  # 40 hex: not an AWS secret key
    "uuid 123e4567-e89b-12d3-a456-426614174000",
    "sk-learn is not scikit-learn; risk_live_mode=on; task_test_ok",
    "xoxo hugs; xapp is an app; AIza is short",
    "eyJ alone, or eyJabc.def (no payload)",
    "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
    "-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----",
    "https://hooks.example.com/services/T0/B0/x",
    "AKIA is a prefix; ghp_short; github_pat_short; sk_live_ (empty)",
    "base64 dGhpcyBpcyBqdXN0IHNvbWUgdGV4dCB0aGF0IGlzIG5vdCBhIHNlY3JldA==",
]


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_text_is_left_alone(text):
    r = Redactor()
    assert r.redact_text(text) == text and r.count == 0
    assert r.redact_bytes(text.encode()) == text.encode()


@pytest.mark.parametrize("i", range(len(_PATTERNS)))
def test_every_match_of_a_shape_holds_one_of_its_literals(i):
    """The literal prefilter skips a pattern on text holding none of its literals: sound only
    if every string the pattern can match holds one (generated from the pattern itself)."""
    pattern, _ = _PATTERNS[i]

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.from_regex(pattern, fullmatch=True))
    def check(s: str) -> None:
        m = re.search(pattern, s)
        assert m is not None
        assert any(lit in m.group(0).lower() for lit in _LITERALS[i]), (pattern, m.group(0))

    check()
