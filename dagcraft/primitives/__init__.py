"""dagcraft.primitives: the coordination layer.

A small :class:`Store` protocol (``get``, conditional ``put``, ``list``, ``delete``, ``now``,
``put_file``, ``open_read``) with a local-directory backend (:class:`LocalStore`) and an S3
backend (:class:`~dagcraft.primitives.s3.S3Store`, imported lazily so that boto3 is only
loaded for ``s3://`` stores), and primitives built on it: leases with fencing tokens,
semaphores, versioned memory, mailboxes, content-addressed artifacts and barriers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dagcraft.primitives.local import LocalStore
from dagcraft.primitives.store import Store
from dagcraft.primitives.ulid import new_ulid
from dagcraft.primitives.url import open_store, resolve_store_url, s3_url

if TYPE_CHECKING:
    from dagcraft.primitives.s3 import S3Store

__all__ = ["LocalStore", "S3Store", "Store", "new_ulid", "open_store", "resolve_store_url", "s3_url"]


def __getattr__(name: str) -> Any:
    if name == "S3Store":  # lazy: importing boto3 costs ~150 ms
        from dagcraft.primitives.s3 import S3Store

        return S3Store
    raise AttributeError(name)
