"""Secret redaction applied before anything is written (events, logs, previews).

Two sources of secrets:
- exact values registered with :meth:`Redactor.add` (params/env marked secret);
- credential-shaped strings: AWS access key ids (``AKIA…``/``ASIA…``) and secret keys where
  named (``aws_secret_access_key = …``, ``"SecretAccessKey": "…"``), ``Bearer …`` tokens,
  OpenAI/Anthropic keys (``sk-…``, ``sk-proj-…``, ``sk-ant-…``), GitHub tokens (``ghp_…``,
  ``gho_…``, ``github_pat_…``), Slack tokens (``xoxb-``, ``xoxp-``, ``xoxa-``, ``xapp-``) and
  webhook URLs, Stripe keys (``sk_live_``, ``rk_live_``, ``sk_test_``, ``whsec_``), Google API
  keys (``AIza…``), JWTs (``eyJ….eyJ….sig``) and PEM private key blocks (RSA, EC, OPENSSH,
  plain; an unterminated block is redacted to the end of the text).

Every match becomes ``[redacted]`` and increments :attr:`Redactor.count`.

Logs are redacted line by line (see :class:`LineRedactor`): a secret is caught as long as it
does not span a newline, except PEM private key blocks, which are tracked across lines. Lines
longer than the stream's line bound are redacted in pieces, so a secret straddling such a cut
could escape; 1 MiB lines are far beyond what credentials sit in.

Registered values shorter than :data:`MIN_SECRET_LEN` characters are ignored: replacing every
occurrence of e.g. ``"1"`` would shred every log, and such a value is not secret-strength.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from typing import Any

REDACTED = "[redacted]"
MIN_SECRET_LEN = 4

# (pattern, group to replace or 0 for the whole match). Order matters: PEM first (a complete
# block, then an unterminated one: everything from BEGIN on, since the key runs to the end).
_PATTERNS: list[tuple[str, int]] = [
    (r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----", 0),
    (r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----[\s\S]*", 0),
    # AWS access key ids; secret keys only where named (a bare 40-char base64 string is too
    # common to guess at: git object ids, digests)
    (r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|ABIA|ACCA)[A-Z0-9]{16}\b", 0),
    (r"(?i)(?:aws_?secret_?(?:access_?)?key|secret_?access_?key)[\"']?\s*[:=]\s*[\"']?([A-Za-z0-9/+=]{30,})", 1),
    (r"(?i)\bBearer\s+([A-Za-z0-9\-._~+/]{8,}=*)", 1),
    # OpenAI (sk-…, sk-proj-…) and Anthropic (sk-ant-…)
    (r"\bsk-(?:ant-|proj-)?[A-Za-z0-9_\-]{16,}", 0),
    (r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{30,}\b", 0),
    (r"\bgithub_pat_[A-Za-z0-9_]{22,}", 0),
    # Slack bot/user/app tokens and incoming-webhook URLs
    (r"\bxox[abposr]-[A-Za-z0-9-]{10,}", 0),
    (r"\bxapp-[A-Za-z0-9-]{10,}", 0),
    (r"https?://hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9/_\-]+", 0),
    # Stripe secret and restricted keys (live and test), webhook signing secrets
    (r"\b(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{10,}", 0),
    (r"\bwhsec_[A-Za-z0-9]{20,}", 0),
    # Google API keys
    (r"\bAIza[0-9A-Za-z_\-]{35}", 0),
    # JWTs: base64url JSON header and payload (both start with '{"' → eyJ), signature
    (r"\beyJ[A-Za-z0-9_\-]{4,}\.eyJ[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]*", 0),
]
_PEM_BEGIN = re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----")
_PEM_END = re.compile(rb"-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----")


#: for each pattern above, literals one of which every match contains (lower case: compared
#: with the lowered text): a pattern runs only on text holding one. Nearly all text holds
#: none, and a substring test is far cheaper than a regex pass (15 of them were most of a
#: traced exec's CPU). test_redact_shapes checks every pattern's own examples against these.
_LITERALS: list[tuple[str, ...]] = [
    ("-----begin ",), ("-----begin ",),
    ("akia", "asia", "agpa", "aida", "aroa", "aipa", "anpa", "anva", "abia", "acca"),
    ("secret",), ("bearer",), ("sk-",), ("ghp_", "gho_", "ghu_", "ghs_", "ghr_"), ("github_pat_",),
    ("xox",), ("xapp-",), ("hooks.slack.com",), ("_live_", "_test_"), ("whsec_",), ("aiza",), ("eyj",),
]
assert len(_LITERALS) == len(_PATTERNS)
_ALL_LITERALS = tuple(sorted({lit for lits in _LITERALS for lit in lits}))
_ALL_LITERALS_B = tuple(lit.encode() for lit in _ALL_LITERALS)


def _holds_any(low: Any, literals: tuple[Any, ...]) -> bool:
    for lit in literals:  # a plain loop: cheaper than any() over a generator
        if lit in low:
            return True
    return False

_CLEAN_MAX_LEN = 200  # strings longer than this are always scanned
_CLEAN_MAX = 4096  # entries in a Redactor's memo of clean strings


# compiled once: a Redactor is made per attempt and per error message
_STR_PATS = [(re.compile(p), g, lits) for (p, g), lits in zip(_PATTERNS, _LITERALS, strict=True)]
_BYTES_PATS = [(re.compile(p.encode()), g, tuple(x.encode() for x in lits))
               for (p, g), lits in zip(_PATTERNS, _LITERALS, strict=True)]


class Redactor:
    """Replaces secrets with ``[redacted]``; thread-safe; :attr:`count` = total replacements."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._secrets: set[str] = set()
        self.count = 0
        self._str_pats, self._bytes_pats = _STR_PATS, _BYTES_PATS
        self._exact_str: re.Pattern[str] | None = None
        self._exact_bytes: re.Pattern[bytes] | None = None
        #: short strings already found clean (event keys, tool names, argv words repeat in
        #: every event: ~14 regex passes each were most of a traced exec's CPU); emptied
        #: whenever a secret is added
        self._clean: dict[str, None] = {}
        for s in secrets:
            self.add(s)

    def add(self, secret: str) -> None:
        """Register an exact secret value (ignored if shorter than MIN_SECRET_LEN)."""
        if not isinstance(secret, str) or len(secret) < MIN_SECRET_LEN:
            return
        with self._lock:
            self._clean = {}
            self._secrets.add(secret)
            ordered = sorted(self._secrets, key=len, reverse=True)  # longest first: no partial leftovers
            self._exact_str = re.compile("|".join(re.escape(s) for s in ordered))
            self._exact_bytes = re.compile(b"|".join(re.escape(s.encode("utf-8", "surrogatepass"))
                                                     for s in ordered))

    @property
    def secrets(self) -> frozenset[str]:
        return frozenset(self._secrets)

    def _bump(self, n: int) -> None:
        if n:
            with self._lock:
                self.count += n

    def redact_text(self, s: str) -> str:
        """Return ``s`` with every secret replaced."""
        clean = self._clean
        if s in clean:
            return s
        orig = s
        n = 0
        if self._exact_str is not None:
            s, k = self._exact_str.subn(REDACTED, s)
            n += k
        low = s.lower()
        for pat, group, lits in (self._str_pats if _holds_any(low, _ALL_LITERALS) else ()):
            if _holds_any(low, lits):
                s, k = _sub(pat, group, s, REDACTED)
                n += k
        self._bump(n)
        if not n and len(orig) <= _CLEAN_MAX_LEN and len(clean) < _CLEAN_MAX:
            clean[orig] = None
        return s

    def redact_bytes(self, b: bytes) -> bytes:
        """Byte-level variant for raw log data (no decoding, so non-UTF-8 bytes survive)."""
        n = 0
        if self._exact_bytes is not None:
            b, k = self._exact_bytes.subn(REDACTED.encode(), b)
            n += k
        low = b.lower()
        for pat, group, lits in (self._bytes_pats if _holds_any(low, _ALL_LITERALS_B) else ()):
            if _holds_any(low, lits):
                b, k = _sub(pat, group, b, REDACTED.encode())
                n += k
        self._bump(n)
        return b

    def redact(self, obj: Any) -> Any:
        """Deep copy of ``obj`` with secrets replaced in every string (dict keys included)."""
        if isinstance(obj, str):
            return self.redact_text(obj)
        if isinstance(obj, dict):
            return {(self.redact_text(k) if isinstance(k, str) else k): self.redact(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self.redact(v) for v in obj]
        if isinstance(obj, bytes):
            return self.redact_bytes(obj)
        return obj


def _sub(pat: re.Pattern[Any], group: int, s: Any, repl: Any) -> tuple[Any, int]:
    if group == 0:
        return pat.subn(repl, s)
    count = 0

    def one(m: re.Match[Any]) -> Any:
        nonlocal count
        count += 1
        whole = m.group(0)
        a, b = m.start(group) - m.start(0), m.end(group) - m.start(0)
        return whole[:a] + repl + whole[b:]

    return pat.sub(one, s), count


class LineRedactor:
    """Stateful per-stream redaction of complete lines (bytes, newline included).

    Single-line shapes are handled by :meth:`Redactor.redact_bytes`; PEM private key blocks span
    lines, so every line from a ``BEGIN … PRIVATE KEY`` line through its ``END`` line is replaced
    by one ``[redacted]`` (counted once). Not thread-safe: one instance per stream.
    """

    def __init__(self, redactor: Redactor) -> None:
        self.r = redactor
        self._in_pem = False

    def feed(self, line: bytes) -> bytes:
        if self._in_pem:
            if _PEM_END.search(line):
                self._in_pem = False
                tail = line[_PEM_END.search(line).end():]  # type: ignore[union-attr]
                # the BEGIN line already emitted "[redacted]\n"; keep only text after END
                return self.r.redact_bytes(tail.lstrip()) if tail.strip() else b""
            return b""
        m = _PEM_BEGIN.search(line)
        if m and not _PEM_END.search(line, m.end()):
            self._in_pem = True
            self.r._bump(1)
            head = self.r.redact_bytes(line[: m.start()])
            return head + REDACTED.encode() + b"\n"
        return self.r.redact_bytes(line)
