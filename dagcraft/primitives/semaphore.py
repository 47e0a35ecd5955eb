"""Semaphore: at most ``slots`` concurrent holders across all hosts, each slot a lease.

Slot ``i`` is the lease at ``<key_prefix>/<i>``; acquiring the semaphore is acquiring any free
slot (tried in a random order, so contenders spread out). Inherits the lease guarantees: at
most one holder per slot at any store time, expiry after ``ttl`` of a crashed holder, fencing
tokens per slot. Requests: try_acquire = 1 GET per slot tried + 1 PUT for the slot won.
"""

from __future__ import annotations

import random
import time

from dagcraft.errors import Conflict, InvalidInput, TimedOut
from dagcraft.primitives import lease as leases
from dagcraft.primitives.keys import validate_key
from dagcraft.primitives.lease import Lease
from dagcraft.primitives.store import Store


class Semaphore:
    def __init__(self, store: Store, key_prefix: str, slots: int, ttl: float) -> None:
        if slots < 1:
            raise InvalidInput(f"semaphore slots must be >= 1, got {slots}")
        self.store = store
        self.key_prefix = validate_key(key_prefix.rstrip("/"))
        self.slots = slots
        self.ttl = ttl

    def try_acquire(self, holder: str) -> Lease | None:
        order = list(range(self.slots))
        random.shuffle(order)
        for i in order:
            try:
                return leases.acquire(self.store, f"{self.key_prefix}/{i}", holder, self.ttl)
            except Conflict:
                continue
        return None

    def acquire(self, holder: str, timeout: float | None = None, *, max_interval: float = 2.0) -> Lease:
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = 0.05
        while True:
            got = self.try_acquire(holder)
            if got is not None:
                return got
            if deadline is not None and time.monotonic() >= deadline:
                raise TimedOut(f"semaphore {self.key_prefix}: no free slot of {self.slots} in {timeout}s")
            wait = random.uniform(0, interval)
            if deadline is not None:
                wait = min(wait, max(deadline - time.monotonic(), 0))
            time.sleep(wait)
            interval = min(interval * 2, max_interval)

    def renew(self, lease: Lease) -> Lease:
        return leases.renew(self.store, lease, self.ttl)

    def release(self, lease: Lease) -> None:
        leases.release(self.store, lease)

    def holders(self) -> list[str]:
        now = self.store.now()
        out = []
        for i in range(self.slots):
            cur = leases.read(self.store, f"{self.key_prefix}/{i}")
            if cur and cur[0].live(now):
                out.append(cur[0].holder)
        return out
