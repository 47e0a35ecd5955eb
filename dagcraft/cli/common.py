"""What every ``dagcraft`` command shares: how a run or a step is addressed, ``--json``, and
console output that never wraps when it is not a terminal.

Addressing (one rule, here only): a run is ``RUN`` or ``@latest`` (the run most recently
submitted to the store). A step is ``RUN/STEP`` (canonical, the form commands print) or
``RUN STEP`` as two arguments; an attempt is ``RUN/STEP/ATTEMPT`` (or ``RUN STEP ATTEMPT``).
Step ids never contain ``/``, so the two forms cannot be confused.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import click

from dagcraft.errors import InvalidInput

F = TypeVar("F", bound=Callable[..., Any])

LATEST = "@latest"  # never a run id: run ids cannot start with "@"


class Address(NamedTuple):
    """A resolved ``RUN[/STEP[/ATTEMPT]]``: the run id is real (``@latest`` resolved)."""

    run: str
    step: str | None
    attempt: int | None

    def label(self) -> str:
        """The canonical ``RUN/STEP/ATTEMPT`` spelling (as far as it goes)."""
        return "/".join(str(p) for p in (self.run, self.step, self.attempt) if p is not None)


def resolve_run(store: Any, run: str) -> str:
    """``run`` validated as a run id, or ``@latest`` resolved from the store's run index."""
    from dagcraft.primitives.keys import validate_run_id

    if run == LATEST:
        from dagcraft.orchestrator.ops import latest_run_id

        return latest_run_id(store)
    return validate_run_id(run)


def parse_address(parts: tuple[str, ...] | list[str] | str, store: Any, *, step: str = "optional",
                  attempt: bool = False) -> Address:
    """Parse ``RUN``, ``RUN/STEP``, ``RUN STEP``, ``RUN/STEP/ATTEMPT`` … into an Address.

    ``step`` is ``"required"``, ``"optional"`` or ``"forbidden"``; ``attempt`` says whether an
    attempt number may be given. Anything else is InvalidInput (exit 2) naming the address;
    ``@latest`` on a store without runs is NotFound (exit 4). ``store`` is only read for
    ``@latest``."""
    raw = [parts] if isinstance(parts, str) else list(parts)
    given = " ".join(raw)
    segs = [s for p in raw for s in p.split("/")]
    limit = 1 if step == "forbidden" else (3 if attempt else 2)
    if not segs or not segs[0] or len(segs) > limit or any(not s for s in segs):
        want = "RUN" if limit == 1 else ("RUN/STEP[/ATTEMPT]" if attempt else "RUN/STEP")
        if step == "optional":
            want = want.replace("RUN/", "RUN[/") + "]"
        raise InvalidInput(f"invalid address {given!r}: expected {want}")
    if step == "required" and len(segs) < 2:
        raise InvalidInput(f"invalid address {given!r}: name a step as RUN/STEP (or RUN STEP)")
    from dagcraft.primitives.keys import validate_segment

    sid = validate_segment(segs[1], "step id") if len(segs) > 1 else None
    n: int | None = None
    if len(segs) > 2:
        if not segs[2].isdigit() or int(segs[2]) < 1:
            raise InvalidInput(f"invalid address {given!r}: attempt {segs[2]!r} is not a number >= 1")
        n = int(segs[2])
    return Address(resolve_run(store, segs[0]), sid, n)


class RunStatusChoice(click.Choice):  # type: ignore[type-arg]
    """``click.Choice`` over the ``RunStatus`` values (and ``corrupt``, which ``runs`` lists),
    read from the enum when first used: the CLI starts without importing the orchestrator."""

    def __init__(self) -> None:
        super().__init__(())

    @property  # type: ignore[override]
    def choices(self) -> tuple[str, ...]:
        from dagcraft.orchestrator.model import RunStatus
        from dagcraft.orchestrator.ops import CORRUPT

        return (*(s.value for s in RunStatus), CORRUPT)

    @choices.setter
    def choices(self, _value: Any) -> None:
        pass  # fixed by the enum


def json_option(f: F) -> F:
    """``--json``: the command's result as one JSON document on stdout (progress, warnings and
    errors stay on stderr). One definition for every command."""
    return click.option("--json", "as_json", is_flag=True,
                        help="print the result as JSON on stdout (progress and warnings go to stderr)")(f)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with control characters (ESC, BEL, C1 …; not newline or tab) shown as ``\\xNN``:
    what a step printed is hostile, and an escape sequence could retitle the terminal, write
    the clipboard (OSC 52) or clear the screen."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def command_hint(*argv: str) -> str:
    """A command line the user can paste: every word shell-quoted (a store URL's ``?`` and
    ``&`` would otherwise glob and background)."""
    return shlex.join(argv)


def echo_json(obj: Any, *, indent: int | None = 2) -> None:
    click.echo(json.dumps(obj, indent=indent, sort_keys=True, default=str))


def console(*, stderr: bool = True) -> Any:
    """A rich Console that wraps only on a terminal: piped output keeps each line whole, so
    a long step id stays greppable (rich otherwise wraps at 80 columns when not a TTY)."""
    from rich.console import Console

    c = Console(stderr=stderr)
    if not c.is_terminal:
        c = Console(stderr=stderr, soft_wrap=True, width=10_000)
    return c
