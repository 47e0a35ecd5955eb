"""dagcraft: workflow orchestrator for multi-agent AI pipelines.

The CLI is a thin layer over these packages; everything a command does is callable here.
"""

from dagcraft.errors import (
    Conflict,
    DagcraftError,
    Failed,
    Fenced,
    InvalidInput,
    NotFound,
    SpecError,
    StoreRefused,
    StoreUnavailable,
    TimedOut,
)

__version__ = "0.1.0"

__all__ = [
    "Conflict",
    "DagcraftError",
    "Failed",
    "Fenced",
    "InvalidInput",
    "NotFound",
    "SpecError",
    "StoreRefused",
    "StoreUnavailable",
    "TimedOut",
    "__version__",
]
