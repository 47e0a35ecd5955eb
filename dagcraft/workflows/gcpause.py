"""The cyclic garbage collector paused around bulk work (loading, compiling, submitting or
reading a whole run). Its own module so that readers of a run (``status``) get it without
the YAML loader."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["paused_gc"]


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Run the block with the cyclic garbage collector off (as it was again after; nests).
    For building or reading a whole run at once (load, compile, submit, status of 10,000
    steps): the data is acyclic, yet its ~10^6 live objects make each automatic full
    collection walk all of them, over half the CPU of a 10,000-step submit. Reference
    counting still frees everything; a cycle made inside waits for the next full collection.
    Guarantee: leaving the outermost block owes the collector nothing: what the block
    allocated is handed to the oldest generation without a walk (else the first allocation
    after it runs a young collection over all of it: ~0.1 s per block at 10,000 steps)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            # freeze + unfreeze: every tracked object into the oldest generation and the
            # young count reset, both O(1) list splices (no traversal)
            gc.freeze()
            gc.unfreeze()
            gc.enable()
