"""Filesystem and S3 failures become StoreUnavailable naming the store, the operation and the
key, in one place per backend; opening a store for reading never creates one.

Faults are the OS's own errors raised from inside LocalStore's real calls (its commit step,
``Path.read_bytes``), so the mapping under test is LocalStore's, not a wrapper's."""

from __future__ import annotations

import builtins
import errno
import os
from pathlib import Path

import pytest

from dagcraft.errors import NotFound, StoreUnavailable
from dagcraft.primitives.local import LocalStore
from dagcraft.primitives.url import open_store


def _fail_commits(store: LocalStore, code: int) -> None:
    def commit(key, path, tmp, *rest):
        Path(tmp).unlink(missing_ok=True)
        raise OSError(code, os.strerror(code))

    store._commit = commit  # type: ignore[method-assign]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO])
def test_write_errors_are_store_unavailable_naming_op_and_key(tmp_path, code):
    store = LocalStore(tmp_path / "s")
    _fail_commits(store, code)
    for call in (lambda: store.put("a/b", b"x"), lambda: store.put("a/b", b"x", if_none_match=True)):
        with pytest.raises(StoreUnavailable) as exc:
            call()
        msg = str(exc.value)
        assert msg == f"local store {store.root}: put a/b: {os.strerror(code)}"
    src = tmp_path / "f"
    src.write_bytes(b"data")
    with pytest.raises(StoreUnavailable, match="put blob/x"):
        store.put_file("blob/x", src)
    assert list((tmp_path / "s" / "tmp").iterdir()) == []  # no stray temp file


def test_read_errors_are_store_unavailable(tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "s")
    store.put("a/b", b"x")
    real = builtins.open

    def refusing_open(file, *args, **kw):  # the OS refusing the read, whatever the call path
        if str(file).startswith(str(store.root)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real(file, *args, **kw)

    real_os_open = os.open

    def refusing_os_open(path, *args, **kw):  # get reads with os calls
        if str(path).startswith(str(store.root)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real_os_open(path, *args, **kw)

    monkeypatch.setattr(builtins, "open", refusing_open)
    monkeypatch.setattr(os, "open", refusing_os_open)
    with pytest.raises(StoreUnavailable, match=r": get a/b: Permission denied$"):
        store.get("a/b")


def test_a_full_disk_in_the_lock_directory_is_store_unavailable(tmp_path):
    store = LocalStore(tmp_path / "s")
    (tmp_path / "s" / "locks").rmdir()
    (tmp_path / "s" / "locks").write_text("not a directory")  # the lock file cannot be created
    with pytest.raises(StoreUnavailable, match="put a: "):
        store.put("a", b"x", if_match="0" * 32)
    with pytest.raises(StoreUnavailable, match="delete a: "):
        store.delete("a")


def test_open_without_create_never_creates(tmp_path):
    typo = tmp_path / "typo"
    with pytest.raises(NotFound, match=f"^no store at {typo}$"):
        LocalStore(typo, create=False)
    with pytest.raises(NotFound):
        open_store(str(typo), create=False)
    assert not typo.exists()
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(NotFound):
        open_store(str(plain), create=False)  # a directory that is not a store
    assert list(plain.iterdir()) == []
    real = LocalStore(tmp_path / "real")
    real.put("k", b"v")
    ro = open_store(str(tmp_path / "real"), create=False)
    assert ro.get("k") is not None and ro.get("k")[0] == b"v"  # type: ignore[index]


def test_s3_errors_name_the_operation_and_key(moto_store):
    from dagcraft.primitives.s3 import S3Store

    gone = S3Store("no-such-bucket", "pfx", client=moto_store.client)
    for call, what in ((lambda: gone.get("runs/r/run.json"), "get runs/r/run.json"),
                       (lambda: gone.put("runs/r/x", b"1", if_none_match=True), "put runs/r/x"),
                       (lambda: gone.list("runs/"), "list runs/")):
        with pytest.raises(StoreUnavailable) as exc:
            call()
        assert str(exc.value).startswith("s3://no-such-bucket/pfx at ")
        assert f": {what}: bucket 'no-such-bucket' does not exist" in str(exc.value)


@pytest.mark.parametrize("code,refused", [(errno.EROFS, True), (errno.EACCES, True), (errno.EPERM, True),
                                          (errno.ENOSPC, False), (errno.EIO, False)])
def test_a_refusing_store_is_not_waited_out(tmp_path, code, refused):
    """A read-only or denied store raised StoreUnavailable like an outage, so an attempt's
    commit rode it out for 300 s before saying anything. It is StoreRefused now: the writes
    that ride out outages give up at once (a full disk may still be freed: waited out)."""
    from dagcraft.errors import StoreRefused
    from dagcraft.primitives.persist import Persistence

    store = LocalStore(tmp_path / "s")
    _fail_commits(store, code)
    calls = 0

    def put() -> str:
        nonlocal calls
        calls += 1
        return store.put("a/b", b"x")

    with pytest.raises(StoreUnavailable) as exc:
        Persistence(limit_s=0.5, first_wait_s=0.01, max_wait_s=0.02).call(put)
    assert isinstance(exc.value, StoreRefused) is refused
    assert (calls == 1) if refused else (calls > 1)
