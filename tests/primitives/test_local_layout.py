"""LocalStore's time-sharded layout: ``<ulid>~…`` names live in per-second shard directories,
and the Store protocol's listing semantics stay exactly those of a sorted key set."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dagcraft.errors import Conflict
from dagcraft.primitives import LocalStore
from dagcraft.primitives.ulid import new_ulid, ulid_floor

# ULIDs spread over a few shards (1,024 ms each) and a few within one shard; built from their
# time (new_ulid never goes back before the newest id this process made)
_T0 = 1_760_000_000_000 // 1024 * 1024
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
ulids = st.builds(lambda ms, rand: ulid_floor(_T0 + ms)[:10] + rand,
                  st.sampled_from([0, 1, 500, 1023, 1024, 1025, 5000, 70_000]),
                  st.text(alphabet=_CROCKFORD, min_size=16, max_size=16))
tails = st.sampled_from(["", "~a", "~@control", "~3~succeeded~s1", "~x%y", "~%25", "~b/c", "~~"])
plain = st.sampled_from(["a", "a%", "b", "0", "01", "0000000000", "zz", "~", "state.json"])


@st.composite
def keys(draw: st.DrawFn) -> str:
    parent = draw(st.sampled_from(["", "j/", "j/k/", "runs/r/journal/"]))
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return parent + draw(plain)
    u = draw(ulids)
    if kind == 1:  # a ULID-looking prefix that is not a full ULID name: stays flat
        return parent + u[: draw(st.integers(1, 25))]
    return parent + u + draw(tails)


def _reference(all_keys: set[str], prefix: str, start_after: str | None, limit: int | None) -> list[str]:
    out = sorted(k for k in all_keys if k.startswith(prefix) and (start_after is None or k > start_after))
    return out if limit is None else out[:limit]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), written=st.lists(keys(), min_size=1, max_size=30, unique=True))
def test_list_matches_a_sorted_key_set(tmp_path_factory, data, written):
    s = LocalStore(tmp_path_factory.mktemp("lay"))
    present: set[str] = set()
    for k in written:
        s.put(k, k.encode(), if_none_match=True)
        present.add(k)
    for k in present:
        assert s.get(k) == (k.encode(), s.head(k))
    candidates = sorted(present) + ["", "j/", "runs/r/journal/", "j/0", "j/01"]
    for _ in range(8):
        some = data.draw(st.sampled_from(candidates))
        prefix = data.draw(st.sampled_from(["", some[: len(some) // 2], some, "j/", "runs/r/journal/"]))
        start_after = data.draw(st.one_of(st.none(), st.sampled_from(candidates),
                                          st.sampled_from(candidates).map(lambda c: c[:-1] if c else c)))
        limit = data.draw(st.one_of(st.none(), st.integers(1, 5)))
        assert s.list(prefix, start_after=start_after, limit=limit) == _reference(present, prefix, start_after,
                                                                                  limit)


def test_ulid_names_are_sharded_and_plain_names_are_not(tmp_path):
    s = LocalStore(tmp_path)
    u = new_ulid()
    s.put(f"runs/r/journal/{u}~s1", b"", if_none_match=True)
    s.put("runs/r/journal/notes", b"x")
    journal = tmp_path / "objects" / "runs" / "r" / "journal"
    assert sorted(p.name for p in journal.iterdir()) == sorted([f"%s{u[:8]}", "notes%"])
    assert (journal / f"%s{u[:8]}" / f"{u}~s1%").is_file()
    assert s.list("runs/r/journal/") == [f"runs/r/journal/{u}~s1", "runs/r/journal/notes"]
    with pytest.raises(Conflict):
        s.put(f"runs/r/journal/{u}~s1", b"", if_none_match=True)


def test_list_after_a_key_opens_only_newer_shards(tmp_path, monkeypatch):
    s = LocalStore(tmp_path)
    keys = [f"j/{ulid_floor(_T0 + 1024 * i)[:-1]}1~s{i}" for i in range(50)]  # one shard each
    for k in keys:
        s.put(k, b"", if_none_match=True)
    opened: list[str] = []
    real_scandir, real_listdir = os.scandir, os.listdir

    def scandir(path):  # type: ignore[no-untyped-def]
        opened.append(os.fspath(path))
        return real_scandir(path)

    def listdir(path):  # type: ignore[no-untyped-def]  (a shard's names: no entry types needed)
        opened.append(os.fspath(path))
        return real_listdir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "listdir", listdir)
    assert s.list("j/", start_after=keys[47]) == keys[48:]
    # the parent directory, and the shards of keys[47] (at or after it) and later: not the 47 before
    assert len(opened) == 1 + 3, opened
    opened.clear()
    assert s.list("j/") == keys
    assert len(opened) == 1 + 50


def test_a_limited_list_opens_only_the_shards_it_returns_keys_from(tmp_path, monkeypatch):
    """A page of a long journal (the feed's sweep walks its window a page at a time) must not
    read every shard after ``start_after``: that made a page cost what the whole window cost."""
    s = LocalStore(tmp_path)
    keys = [f"j/{ulid_floor(_T0 + 1024 * i)[:-1]}1~s{i}" for i in range(50)]  # one shard each
    for k in keys:
        s.put(k, b"", if_none_match=True)
    s.put(f"j/{keys[3][2:10]}", b"")  # a plain name sharing shard 3's prefix: sorts before its keys
    opened: list[str] = []
    real_listdir = os.listdir

    def listdir(path):  # type: ignore[no-untyped-def]
        opened.append(os.fspath(path))
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", listdir)
    assert s.list("j/", start_after=keys[0], limit=3) == [keys[1], keys[2], f"j/{keys[3][2:10]}"]
    assert len(opened) == 3, opened  # shards 0 (it holds start_after), 1 and 2: not the 47 after
    opened.clear()
    assert s.list("j/", start_after=keys[10], limit=1000) == keys[11:]


def test_a_listing_counts_one_request_per_thousand_keys_as_s3_bills_it(tmp_path):
    """The local store's request counts stand for what the same calls cost on S3, where one
    LIST returns at most 1,000 keys: a sweep of a 2,500-key window is three requests, not one."""
    s = LocalStore(tmp_path, fsync=False)
    for i in range(2500):
        s.put(f"j/k{i:05d}", b"", if_none_match=True)
    before = s.stats["list"]
    assert len(s.list("j/")) == 2500
    assert s.stats["list"] - before == 3
    assert s.list("j/", start_after="j/k02499") == [] and s.stats["list"] - before == 4  # empty: one
    assert len(s.list("j/", limit=1000)) == 1000 and s.stats["list"] - before == 5


def test_objects_written_flat_by_an_older_version_are_still_found(tmp_path):
    s = LocalStore(tmp_path)
    u = new_ulid()
    key = f"runs/r/journal/{u}~s1"
    flat = tmp_path / "objects" / "runs" / "r" / "journal" / f"{u}~s1%"
    flat.parent.mkdir(parents=True)
    flat.write_bytes(b"old")
    newer = f"runs/r/journal/{new_ulid()}~s2"
    s.put(newer, b"", if_none_match=True)
    got = s.get(key)
    assert got is not None and got[0] == b"old"
    assert s.head(key) == got[1]
    assert s.list("runs/r/journal/") == [key, newer]
    assert s.list("runs/r/journal/", start_after=key) == [newer]
    with s.open_read(key) as f:
        assert f.read() == b"old"
    with pytest.raises(Conflict):
        s.put(key, b"dup", if_none_match=True)
    etag = s.put(key, b"new", if_match=got[1])
    assert s.get(key) == (b"new", etag) and flat.read_bytes() == b"new"
    s.delete(key)
    assert s.get(key) is None and not flat.exists()


_APPENDER = r"""
import sys
from dagcraft.primitives import LocalStore
from dagcraft.primitives.ulid import new_ulid, ulid_floor
s = LocalStore(sys.argv[1])
while True:
    key = f"runs/r/journal/{new_ulid()}~s"
    s.put(key, b"", if_none_match=True)
    s.put(f"runs/r/steps/{key[-28:-2]}/state.json", b'{"x": 1}', if_none_match=True)
    print(key, flush=True)  # acknowledged: both writes returned
"""


def test_unsynced_empty_entries_survive_kill_9_of_their_writer(tmp_path):
    """Journal entries are not fsynced (empty: nothing to tear). A writer killed with SIGKILL
    mid-stream loses nothing it acknowledged and leaves no partial or stray object."""
    root = tmp_path / "st"
    LocalStore(root)
    p = subprocess.Popen([sys.executable, "-c", _APPENDER, str(root)], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    acked = [p.stdout.readline().strip() for _ in range(200)]
    p.kill()
    p.wait()
    acked += [line.strip() for line in p.stdout if line.strip()]
    s = LocalStore(root)
    listed = s.list("runs/r/journal/")
    assert set(acked) <= set(listed)
    assert len(listed) - len(acked) <= 1  # at most the entry being written when killed
    for key in listed:
        assert s.get(key) == (b"", s.head(key))
    states = s.list("runs/r/steps/")
    assert len(states) >= len(acked)
    for key in states:
        got = s.get(key)
        assert got is not None and got[0] == b'{"x": 1}'  # whole, never torn
    assert not any(Path(root, "objects").rglob("*-*"))  # no temp file ever landed among objects


@pytest.mark.parametrize("src_dir", ["same-fs", "/dev/shm"])
def test_a_handed_over_file_is_linked_in_not_copied(tmp_path, src_dir):
    """put_file(consume=True) takes the caller's file itself when it can (same filesystem:
    the object is that inode, no bytes copied); across filesystems it copies. Either way the
    object is the file's content with the usual etag, and survives the caller deleting it."""
    store = LocalStore(tmp_path / "store")
    base = tmp_path if src_dir == "same-fs" else Path(src_dir)
    if not base.is_dir():
        pytest.skip(f"{src_dir} is not here")
    src = base / f"handed-{new_ulid()}"
    src.write_bytes(b"line\n" * 1000)
    ino = src.stat().st_ino
    etag = store.put_file("k/consumed", src, consume=True)
    obj = store._path("k/consumed")
    assert (obj.stat().st_ino == ino) == (src_dir == "same-fs")
    src.unlink()
    got = store.get("k/consumed")
    assert got is not None and got[0] == b"line\n" * 1000 and got[1] == etag
    assert etag == store.put("k/copy", b"line\n" * 1000)
    assert list((tmp_path / "store" / "tmp").iterdir()) == []  # no temp left behind
    with pytest.raises(Conflict):  # the conditions hold as for any put
        src.write_bytes(b"other")
        store.put_file("k/consumed", src, if_none_match=True, consume=True)
    assert store.get("k/consumed")[0] == b"line\n" * 1000 and src.read_bytes() == b"other"
    src.unlink()


def test_an_empty_object_is_created_in_place_exactly_once(tmp_path):
    store = LocalStore(tmp_path / "store")
    key = f"runs/r/journal/{new_ulid()}~1~running~s"
    store.put(key, b"", if_none_match=True)
    with pytest.raises(Conflict):
        store.put(key, b"", if_none_match=True)
    assert store.get(key) == (b"", store.put("other/empty", b""))
    assert list((tmp_path / "store" / "tmp").iterdir()) == []


def test_lock_files_are_a_bounded_set_of_stripes(tmp_path):
    """Locks are striped by key hash: writing ever more keys reuses the same few thousand lock
    files instead of making one per key (an inode per step, and a directory without bound)."""
    from dagcraft.primitives.local import _LOCK_STRIPES

    store = LocalStore(tmp_path / "store", fsync=False)
    for i in range(3 * _LOCK_STRIPES // 2):
        store.put(f"runs/r/steps/s{i}/state.json", b"{}")
    locks = list((tmp_path / "store" / "locks").iterdir())
    assert 0 < len(locks) <= _LOCK_STRIPES
    assert all(p.is_file() and p.name.startswith("stripe-") for p in locks)


def test_a_shard_listed_after_a_key_keeps_byte_order_for_any_name(tmp_path):
    """The shard fast path drops entries at or before ``start_after`` by comparing raw names:
    names with ``%`` (escaped on disk), ``#`` or ``!`` (below ``%``) must still sort as keys."""
    s = LocalStore(tmp_path)
    u = ulid_floor(_T0)  # one shard for all
    tails = ["", "~a", "~a!", "~a#1.b", "~a%", "~a%25", "~a%b", "~a~", "~b", "~ab", "~a!x%"]
    keys = sorted(f"j/{u}{t}" for t in tails)
    for k in keys:
        s.put(k, b"", if_none_match=True)
    for i, after in enumerate(keys):
        assert s.list("j/", start_after=after) == keys[i + 1:], after
    assert s.list("j/", start_after=f"j/{u}~a") == [k for k in keys if k > f"j/{u}~a"]
