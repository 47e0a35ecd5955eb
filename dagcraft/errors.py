"""Typed errors, and the one place they map to exit codes.

Every error a user can cause is a subclass of :class:`DagcraftError` carrying a one-line
message; the CLI prints that line and exits with :attr:`exit_code` — never a traceback.
"""

from __future__ import annotations


class DagcraftError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code: int = 1


class Failed(DagcraftError):
    """A run or step failed (exit 1)."""

    exit_code = 1


class InvalidInput(DagcraftError):
    """Invalid usage or input: bad key, id, flag value (exit 2). Nothing was written."""

    exit_code = 2


class SpecError(InvalidInput):
    """A workflow spec is invalid. The message names file:line:col and the field path."""

    exit_code = 2


class Conflict(DagcraftError):
    """A conditional write lost: claimed by another, version mismatch, fenced (exit 3)."""

    exit_code = 3


class Superseded(Conflict):
    """A compare-and-swap lost: the record moved on. ``current`` is its (bytes, etag) as read
    right after, or None when it is gone (exit 3)."""

    def __init__(self, message: str, current: tuple[bytes, str] | None = None) -> None:
        super().__init__(message)
        self.current = current


class Fenced(Conflict):
    """A holder whose lease was taken over tried to commit (exit 3)."""


class NotFound(DagcraftError):
    """A key, run, step, artifact or message does not exist (exit 4)."""

    exit_code = 4


class StoreUnavailable(DagcraftError):
    """The store is unreachable or misconfigured (exit 5). Never includes a secret."""

    exit_code = 5


class StoreRefused(StoreUnavailable):
    """The store answered and refuses this process for good — a read-only filesystem,
    permission denied — so waiting for it to come back cannot help: writes that ride out an
    outage (:class:`~dagcraft.primitives.persist.Persistence`) give up at once (exit 5)."""


class IntegrityError(DagcraftError):
    """Stored content does not match its digest (exit 1)."""

    exit_code = 1


class CorruptRecord(IntegrityError, ValueError):
    """A record in the store cannot be parsed (not JSON, or not the record it should be).

    Exit 1, not 5: the store answered, and retrying will not help; only this record (and so
    its run) is affected — workers stop serving that run and keep serving every other one.
    ``key`` names the record. A ``ValueError`` too, so parsers that already treat an
    unreadable record as absent keep doing so."""

    def __init__(self, key: str, detail: str, store: str | None = None) -> None:
        where = f" in {store}" if store else ""
        super().__init__(f"corrupt record {key}{where}: {detail}")
        self.key = key
        self.detail = detail


class BudgetExceeded(DagcraftError):
    """A budget limit was reached; the run is resumable with a raised limit (exit 6)."""

    exit_code = 6


class TimedOut(DagcraftError):
    """A wait or a step timed out (exit 124)."""

    exit_code = 124


class Interrupted(DagcraftError):
    """Interrupted by the user; the run is left resumable (exit 130)."""

    exit_code = 130


EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONFLICT = 3
EXIT_NOT_FOUND = 4
EXIT_STORE = 5
EXIT_BUDGET = 6
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130


def exit_code_for(exc: BaseException) -> int:
    """The exit code for any exception: typed errors map by class, Ctrl-C to 130, else 1."""
    if isinstance(exc, DagcraftError):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_FAILED
