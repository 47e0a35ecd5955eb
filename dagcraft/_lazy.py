"""Package names imported on first use (PEP 562), for ``dagcraft.orchestrator`` and
``dagcraft.workflows``: ``from dagcraft.orchestrator import submit`` loads only the module that
defines ``submit``, so a command imports what it uses and nothing else."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(package: str, homes: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``, whose name ``n`` lives in its
    submodule ``homes[n]``. A name, once imported, becomes a plain attribute of the package."""

    def getattr_(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{home}"), name)
        setattr(sys.modules[package], name, value)  # the next lookup is a plain module attribute
        return value

    def dir_() -> list[str]:
        return sorted([*vars(sys.modules[package]), *homes])

    return getattr_, dir_
