"""The behavioural suite of the Store protocol, run against every backend."""

from __future__ import annotations

import time

import pytest

from dagcraft.errors import Conflict, InvalidInput, NotFound
from dagcraft.primitives import Store


def test_is_a_store(store):
    assert isinstance(store, Store)


def test_get_absent_is_none(store):
    assert store.get("nope/nothing") is None


def test_put_get_roundtrip_and_etag_changes(store):
    e1 = store.put("a/b", b"one")
    assert store.get("a/b") == (b"one", e1)
    e2 = store.put("a/b", b"two")
    assert e2 != e1
    assert store.get("a/b") == (b"two", e2)


def test_if_none_match(store):
    e = store.put("k", b"1", if_none_match=True)
    with pytest.raises(Conflict):
        store.put("k", b"2", if_none_match=True)
    assert store.get("k") == (b"1", e)


def test_if_match(store):
    e1 = store.put("k", b"1")
    e2 = store.put("k", b"2", if_match=e1)
    with pytest.raises(Conflict):
        store.put("k", b"3", if_match=e1)  # stale
    assert store.get("k") == (b"2", e2)
    with pytest.raises(Conflict):
        store.put("absent", b"x", if_match=e2)
    assert store.get("absent") is None


def test_list_order_prefix_start_after_limit(store):
    keys = ["a", "a-b", "a/b", "a/c/d", "a%b/c", "b", "a.x", "ab", "runs/r1/journal/01", "runs/r1/journal/02"]
    for k in keys:
        store.put(k, k.encode())
    assert store.list("") == sorted(keys)
    assert store.list("a/") == ["a/b", "a/c/d"]
    assert store.list("a") == sorted(k for k in keys if k.startswith("a"))
    assert store.list("runs/r1/journal/", start_after="runs/r1/journal/01") == ["runs/r1/journal/02"]
    assert store.list("", start_after="a/b") == [k for k in sorted(keys) if k > "a/b"]
    assert store.list("", limit=3) == sorted(keys)[:3]
    assert store.list("", start_after="a", limit=2) == sorted(keys)[1:3]
    assert store.list("zzz") == []


def test_delete(store):
    store.put("x/y", b"1")
    store.delete("x/y")
    assert store.get("x/y") is None
    assert store.list("x/") == []
    store.delete("x/y")  # idempotent
    store.put("x/y", b"2", if_none_match=True)  # can be created again


def test_put_file_and_open_read(store, tmp_path):
    src = tmp_path / "f.bin"
    src.write_bytes(b"abc" * 1000)
    store.put_file("files/f", src)
    with store.open_read("files/f") as f:
        assert f.read() == b"abc" * 1000
    with pytest.raises(Conflict):
        store.put_file("files/f", src, if_none_match=True)
    with pytest.raises(NotFound):
        store.open_read("files/absent")


@pytest.mark.parametrize("bad", ["", "/abs", "a/../b", "..", "a//b", "a/./b", "a\x00b", "a\nb", "a\\b", "x" * 201])
def test_invalid_keys_rejected(store, bad):
    with pytest.raises(InvalidInput):
        store.put(bad, b"x")
    with pytest.raises(InvalidInput):
        store.get(bad)


def test_now_is_store_clock(store):
    assert abs(store.now() - time.time()) < 5
    a = store.now()
    assert store.now() >= a


def test_stats_count_requests(store):
    store.stats.clear()
    store.put("s/1", b"x")
    store.get("s/1")
    store.get("s/2")
    store.list("s/")
    store.delete("s/1")
    assert {k: v for k, v in store.stats.items() if v} == {"put": 1, "get": 2, "list": 1, "delete": 1}


def test_step_ids_are_valid_segments(store):
    store.put("runs/r/steps/review[reviewer=security]/state.json", b"{}")
    store.put("runs/r/steps/implement[0]/state.json", b"{}")
    assert store.list("runs/r/steps/") == ["runs/r/steps/implement[0]/state.json",
                                           "runs/r/steps/review[reviewer=security]/state.json"]
