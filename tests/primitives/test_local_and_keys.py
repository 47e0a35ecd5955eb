"""Keys, ULIDs, URL resolution, and LocalStore crash safety with a real killed writer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from dagcraft.errors import InvalidInput
from dagcraft.primitives import LocalStore, new_ulid, open_store
from dagcraft.primitives.keys import validate_key, validate_relpath, validate_segment
from dagcraft.primitives.ulid import ulid_time_ms


@pytest.mark.parametrize("ok", ["plan", "review[reviewer=security]", "implement[0]", "a b", "ünï", "x" * 200, ".hidden"])
def test_valid_segments(ok):
    assert validate_segment(ok, "step id") == ok


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "a\\b", "a\x00", "a\x1f", "a\x7f", "x" * 201, 3])
def test_invalid_segments_name_what(bad):
    with pytest.raises(InvalidInput, match="step id"):
        validate_segment(bad, "step id")


def test_keys_and_relpaths():
    assert validate_key("runs/r1/steps/a/state.json")
    assert validate_relpath("out/report.md", "artifact name")
    for bad in ["/etc/passwd", "a/../b", "C:/x", "a//b", "a/", "\\x"]:
        with pytest.raises(InvalidInput):
            validate_relpath(bad, "artifact name")


def test_ulid_monotonic_sortable():
    ids = [new_ulid() for _ in range(5000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(len(i) == 26 for i in ids)
    assert abs(ulid_time_ms(ids[0]) - ulid_time_ms(ids[-1])) < 5000


def test_open_store_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert open_store().root == tmp_path / ".dagcraft"
    monkeypatch.setenv("DAGCRAFT_STORE", str(tmp_path / "env"))
    assert open_store().root == tmp_path / "env"
    assert open_store(f"file://{tmp_path}/f").root == tmp_path / "f"
    s = open_store("s3://bkt/some/prefix?endpoint=http://127.0.0.1:9000")
    assert (s.bucket, s.prefix, s.endpoint_url) == ("bkt", "some/prefix", "http://127.0.0.1:9000")
    for bad in ["gs://x", "s3://", "s3://b/p?bogus=1", "s3://b/../x"]:
        with pytest.raises(InvalidInput):
            open_store(bad)


def test_s3_store_url_reopens_the_same_store():
    # store.url is what subprocesses and printed hints get as --store: it must keep the region
    for url in ["s3://bkt/p?endpoint=http://127.0.0.1:9000&region=eu-west-1", "s3://bkt/p?region=eu-west-1",
                "s3://bkt/p?endpoint=http://127.0.0.1:9000", "s3://bkt"]:
        s = open_store(url)
        again = open_store(s.url)
        assert (again.bucket, again.prefix, again.endpoint_url, again.region) == \
            (s.bucket, s.prefix, s.endpoint_url, s.region), url


_WRITER = r"""
import sys
from dagcraft.primitives import LocalStore
s = LocalStore(sys.argv[1])
i = 0
print("go", flush=True)
while True:
    s.put("obj", bytes([97 + i % 2]) * (1 << 20))
    i += 1
"""


def test_no_torn_reads_and_crash_leaves_old_or_new(tmp_path):
    root = tmp_path / "st"
    s = LocalStore(root)
    s.put("obj", b"a" * (1 << 20))
    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(root)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "go"
    seen = set()
    for _ in range(150):
        data, etag = s.get("obj")
        assert len(data) == 1 << 20 and len(set(data)) == 1, "torn read"
        seen.add(data[:1])
    os.kill(p.pid, signal.SIGKILL)  # most likely mid-write
    p.wait()
    data, _ = s.get("obj")
    assert len(data) == 1 << 20 and len(set(data)) == 1
    assert s.list("") == ["obj"]  # a stray temp file is never listed
    assert seen  # we did read while it was writing


def test_key_fast_paths_agree_with_the_segment_rules(tmp_path):
    # validate_key's and LocalStore._fspath's common-case shortcuts decide exactly as the
    # per-segment rules: the same keys accepted, the same object paths
    import random

    from dagcraft.primitives import keys as keys_mod
    from dagcraft.primitives import local as local_mod

    def by_segments(key):
        if not key or key.startswith("/") or len(key.encode("utf-8", "surrogatepass")) > keys_mod.MAX_KEY_BYTES:
            return False
        try:
            for seg in key.split("/"):
                if not seg:
                    return False
                keys_mod.validate_segment(seg)
        except keys_mod.InvalidInput:
            return False
        return True

    def old_fspath(store, key):
        parts = key.split("/")
        head = [store._objects_s, *(local_mod._esc(p) for p in parts[:-1])]
        if local_mod._ULID_NAME.match(parts[-1]):
            head.append(local_mod._SHARD + parts[-1][:local_mod._SHARD_LEN])
        head.append(local_mod._esc(parts[-1]) + local_mod._SUFFIX)
        return "/".join(head)

    store = LocalStore(tmp_path / "s")
    rng = random.Random(7)
    alphabet = ["a", "b", ".", "/", "%", "\\", "\x00", "\x07", "é", "~", "[", "=", "01M8SC6NVJ4AQPVR6PWA62YKQ5"]
    samples = ["a" * 201, "a/" + "b" * 200, "b" * 200 + "/a", "x/" * 600 + "y", "runs/r/steps/s1/state.json",
               "a/../b", "./a", "a/.", "a//b", "/a", "a/", "", "..", "a/.../b"]
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(3000)]
    for key in samples:
        try:
            keys_mod.validate_key(key)
            accepted = True
        except keys_mod.InvalidInput:
            accepted = False
        assert accepted == by_segments(key), key
        if accepted:
            assert store._fspath(key) == old_fspath(store, key), key
