"""Mailboxes: direct and broadcast messages, at-least-once delivery with explicit ack.

Layout (``scope`` is ``shared`` or ``runs/<run_id>``)::

    <scope>/mail/<recipient>/<ulid>   direct message (immutable, If-None-Match)
    <scope>/broadcast/<ulid>          broadcast message (immutable)
    <scope>/cursors/<reader>          the reader's cursor {"horizon": ulid|null, "acked": [ulid...]}

Guarantees:
- Messages are immutable objects, never deleted on read; ids are ULIDs (sortable by time).
- ``read`` returns every message addressed to the reader (and every broadcast not sent by the
  reader) that it has not acked, oldest first. It does not change anything: a reader that
  crashes after ``read`` and before ``ack`` gets the same messages again (at-least-once).
- ``ack`` records the ids in the cursor (CAS on the cursor; concurrent acks merge). The cursor's
  ``horizon`` (the ``start_after`` of the next listing) only moves past a message once it is
  acked and older than the newest acked message by more than the look-back ``window``, and
  never past an unacked message it has seen. So a message whose id is older than messages
  already acked (a sender with a slow clock or a slow PUT) is still delivered, as long as it
  lands within ``window`` seconds of its id's timestamp.
Requests: send = 1 PUT; read = 1 GET (cursor) + 2 LIST + 1 GET per unacked message; ack = 1 GET
+ 2 LIST + 1 PUT (+ retries under contention).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from dagcraft.errors import Conflict, InvalidInput
from dagcraft.primitives.keys import validate_segment
from dagcraft.primitives.store import Store
from dagcraft.primitives.ulid import new_ulid, ulid_time_ms

BROADCAST = "*"
DEFAULT_WINDOW = 60.0


@dataclass
class Message:
    id: str
    sender: str
    to: str
    body: Any
    ts: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def send(store: Store, scope: str, *, sender: str, to: str, body: Any) -> Message:
    """Send ``body`` (JSON) to ``to`` (a reader name, or ``*`` for everyone)."""
    if to != BROADCAST:
        validate_segment(to, "recipient")
    mid = new_ulid()
    msg = Message(mid, sender, to, body, store.now())
    key = f"{scope}/broadcast/{mid}" if to == BROADCAST else f"{scope}/mail/{to}/{mid}"
    try:
        data = json.dumps(msg.to_dict()).encode()
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"message body is not JSON-serializable: {exc}") from None
    store.put(key, data, if_none_match=True)
    return msg


def _cursor(store: Store, scope: str, reader: str) -> tuple[dict[str, Any], str | None]:
    got = store.get(f"{scope}/cursors/{reader}")
    if got is None:
        return {"horizon": None, "acked": []}, None
    return json.loads(got[0]), got[1]


def _pending_ids(store: Store, scope: str, reader: str, cur: dict[str, Any]) -> list[tuple[str, str]]:
    """(id, key) of unacked messages after the horizon, sorted by id."""
    horizon = cur.get("horizon")
    acked = set(cur.get("acked", []))
    out = []
    for base in (f"{scope}/mail/{reader}/", f"{scope}/broadcast/"):
        sa = base + horizon if horizon else None
        for key in store.list(base, start_after=sa):
            mid = key[len(base):]
            if "/" not in mid and mid not in acked:
                out.append((mid, key))
    out.sort()
    return out


def read(store: Store, scope: str, reader: str, *, limit: int | None = None) -> list[Message]:
    """Unacked messages for ``reader``, oldest first. Changes nothing (read again → same)."""
    validate_segment(reader, "reader")
    cur, _ = _cursor(store, scope, reader)
    msgs = []
    for _mid, key in _pending_ids(store, scope, reader, cur):
        got = store.get(key)
        if got is None:
            continue
        m = Message(**json.loads(got[0]))
        if m.to == BROADCAST and m.sender == reader:
            continue
        msgs.append(m)
        if limit is not None and len(msgs) >= limit:
            break
    return msgs


def ack(store: Store, scope: str, reader: str, ids: list[str], *, window: float = DEFAULT_WINDOW,
        attempts: int = 20) -> None:
    """Mark ``ids`` as processed by ``reader`` (idempotent; concurrent acks merge)."""
    validate_segment(reader, "reader")
    if not ids:
        return
    for mid in ids:
        validate_segment(mid, "message id")
    key = f"{scope}/cursors/{reader}"
    for _ in range(attempts):
        cur, etag = _cursor(store, scope, reader)
        acked = sorted(set(cur.get("acked", [])) | set(ids))
        cur["acked"] = acked
        # Move the horizon to the newest acked id that is older than (newest acked - window)
        # and older than every unacked message we can see.
        pending = [mid for mid, _ in _pending_ids(store, scope, reader, cur)]
        limit_ms = ulid_time_ms(acked[-1]) - int(window * 1000)
        first_unacked = pending[0] if pending else None
        horizon = cur.get("horizon")
        for a in acked:
            if ulid_time_ms(a) > limit_ms or (first_unacked is not None and a > first_unacked):
                break
            horizon = a if horizon is None or a > horizon else horizon
        cur["horizon"] = horizon
        cur["acked"] = [a for a in acked if horizon is None or a > horizon]
        data = json.dumps(cur).encode()
        try:
            if etag is None:
                store.put(key, data, if_none_match=True)
            else:
                store.put(key, data, if_match=etag)
            return
        except Conflict:
            continue
    raise Conflict(f"cursor of {reader}: too much contention")
