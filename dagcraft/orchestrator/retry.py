"""Retry decisions: which failures retry, and when (exponential backoff with full jitter)."""

from __future__ import annotations

import random
import re
from pathlib import Path

#: a step whose worker vanished is retried this many times regardless of its retry limit:
#: the step itself did not fail, its worker did (crash, kill -9, reboot).
LOST_WORKER_RETRIES = 3


def backoff_delay(policy: object, failures: int, rng: random.Random | None = None) -> float:
    """Delay before the next attempt after ``failures`` failed attempts (1-based):
    ``min(max_backoff, backoff * 2**(failures-1))`` scaled by a jitter in [0.5, 1.0] so that
    many steps failing together (a rate limit) do not retry in lock-step."""
    base = float(getattr(policy, "backoff_s", 1.0))
    cap = float(getattr(policy, "max_backoff_s", 60.0))
    delay = min(cap, base * (2 ** max(failures - 1, 0)))
    return float(delay * (rng or random).uniform(0.5, 1.0))


def _log_matches(paths: list[Path], patterns: list[re.Pattern[str]]) -> bool:
    for path in paths:
        if not path.exists():
            continue
        with path.open("rb") as fh:  # line by line: logs can be large
            for raw in fh:
                line = raw.decode("utf-8", "replace")
                if any(p.search(line) for p in patterns):
                    return True
    return False


def should_retry(policy: object, failures: int, exit_code: int | None, logs: list[Path], timed_out: bool) -> bool:
    """True when attempt number ``failures`` may be retried: under the limit, and matching
    ``retry_on`` (exit codes or log patterns) when one is given — so a rate limit retries
    and a real failure does not."""
    limit = int(getattr(policy, "limit", 0))
    if failures > limit:
        return False
    codes = list(getattr(policy, "retry_on_exit_codes", []) or [])
    pats = list(getattr(policy, "retry_on_patterns", []) or [])
    if not codes and not pats:
        return True
    if exit_code is not None and exit_code in codes:
        return True
    if pats:
        compiled = [re.compile(p, re.IGNORECASE) for p in pats]
        if _log_matches(logs, compiled):
            return True
    return False
