"""LocalStore: the Store protocol on a local directory (the embedded default, ``.dagcraft/``).

On-disk layout under ``root``::

    objects/<seg>/<seg>/.../<seg>%   one file per object (directories: the key's segments)
    objects/.../%s<8 chars>/<ulid>…%  an object whose last segment starts with a ULID
    tmp/                             temp files being written (never listed)
    locks/<hh>/<sha256(key)>         per-key fcntl lock files for conditional writes

Segments are escaped (``%`` -> ``%25``) and every object file name ends with a single ``%``,
so the key ``a`` (file ``a%``) and the key ``a/b`` (directory ``a``) never collide, and a
directory can never be mistaken for an object.

**Time shards.** Append-only ``<ulid>~…`` names (the run journal, ``runs-index/``) grow by
thousands per run and are listed with ``start_after`` on every poll. Such a file lives in a
shard directory ``%s<first 8 ULID chars>`` (one per ~1 s of ULID time) of its parent
directory, so ``list(start_after=k)`` reads the parent (one entry per second) and only the
shards at or after ``k``: its cost follows what is new, not the run's length. ``%s`` cannot
start an escaped segment (every ``%`` in one is ``%25``), so shards never collide with keys.
Listing semantics are unchanged (keys, order, ``start_after``, ``limit``); a file written
flat by an older version is still found (reads fall back to the flat path, lists merge both).

Guarantees (across threads and processes on one machine, on a local POSIX filesystem):

- **Atomic create-if-absent**: ``put(if_none_match=True)`` writes a temp file fully (and fsyncs
  it), then ``os.link``\\ s it to the target name; ``link`` fails if the name exists, so exactly
  one of any number of concurrent creators wins, the rest get ``Conflict``. An empty object
  (the key is the message) is made by an exclusive ``open(O_CREAT|O_EXCL)`` in place instead:
  the same one-winner rule, with nothing to write. ``put_file(consume=True)`` hard-links the
  handed-over file in as the temp instead of copying it.
- **Atomic compare-and-swap**: ``put(if_match=etag)`` (and unconditional put and delete) run
  under an exclusive ``flock`` on the key's lock file (one of 4,096 stripes): compare the current etag, then
  ``os.replace`` a fully written temp file. ``flock`` locks are per open file description, so
  they exclude threads of one process as well as other processes.
- **No torn reads, crash safety**: objects only ever appear by ``link``/``replace`` of a
  complete file, so a reader sees the old or the new object; a crash of the process mid-write
  leaves the old object and at worst a stray temp file under ``tmp/`` (never listed). An
  acknowledged write survives the crash of the process that made it (it is in the kernel's
  page cache before ``link``/``replace`` returns); no fsync is needed for that.
- **Machine crash** (power loss, kernel panic): with ``fsync=True`` (default) every object
  with content is fsynced before it appears, so after a reboot an object is whole or absent
  (old), never empty or torn. Empty objects (journal entries, ``runs-index/`` entries: the
  key is the message) are not fsynced: there is nothing to tear, and a notification lost with
  the machine is caught by the readers' periodic full resync. Directories are never fsynced,
  so the last writes before a machine crash may be lost (not torn) either way.
- **Etag** = the first 32 hex digits of the SHA-256 of the content: two different contents
  never share an etag; identical content has the same etag (as on S3, where it is the MD5).
  Records that must change on every write (leases, memory) carry a unique ``write_id``.
- ``now()`` is this machine's ``time.time()``.

Not guaranteed: correctness on NFS or other network filesystems without working ``flock``.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import hashlib
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from dagcraft.errors import Conflict, InvalidInput, NotFound, StoreRefused, StoreUnavailable
from dagcraft.primitives.keys import validate_key, validate_prefix
from dagcraft.primitives.store import LIST_PAGE
from dagcraft.primitives.ulid import new_ulid

_SUFFIX = "%"
_CHUNK = 1 << 20
#: a last segment starting with a ULID (26 Crockford base32 chars, then ``~`` or the end)
_ULID_NAME = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}(?:~|$)")
_SHARD = "%s"  # shard directory marker: never the start of an escaped segment
_SHARD_LEN = 8  # ULID chars in a shard name: 2**10 ms of ULID time per shard
# what a listed directory entry is (the second field of a listing's sort tuples); a file sorts
# before a shard of the same name, as its key is a prefix of every key in the shard
_FILE, _DIR, _IN_SHARD = 0, 1, 2
_LOCK_HEX = 3  # hex digits of a key's hash naming its lock stripe
_LOCK_STRIPES = 16 ** _LOCK_HEX


def _esc(seg: str) -> str:
    return seg.replace("%", "%25")


def _unesc(name: str) -> str:
    return name.replace("%25", "%")


def _read_file(path: str) -> bytes:
    """The whole file at ``path``, with os calls: a buffered ``open`` per read cost a third of
    the read (``status`` reads 10,000 records). A short read of a regular file is its end."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, size + 1)
        if len(data) <= size:
            return data
        parts = [data]  # it grew since the fstat: read on to the end
        while chunk := os.read(fd, 1 << 20):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


def _etag_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


class LocalStore:
    """Store on a local directory. See the module docstring for guarantees."""

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True,
                 clock: Callable[[], float] | None = None, create: bool = True) -> None:
        """Open the store at ``root``, creating it unless ``create`` is False: then a
        directory that is not a store raises NotFound ("no store at ROOT") and nothing is
        created (read-only commands: a mistyped path must not leave a store behind)."""
        self.root = Path(root).absolute()
        self.url = str(self.root)
        self.stats: Counter[str] = Counter()
        self.fsync = fsync
        self._clock = clock or time.time
        self._objects = self.root / "objects"
        self._objects_s = str(self._objects)
        self._tmp = self.root / "tmp"
        self._locks = self.root / "locks"
        # the write path joins strings: a pathlib join per call cost more than the syscalls
        self._tmp_s, self._locks_s = str(self._tmp), str(self._locks)
        with self._io("open", "(store root)"):
            if not create:
                if not self._objects.is_dir():
                    raise NotFound(f"no store at {self.root}")
                return
            for d in (self._objects, self._tmp, self._locks):
                if not d.is_dir():  # an existing store on a read-only filesystem still opens
                    d.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _io(self, op: str, key: str) -> Iterator[None]:
        """The one place filesystem errors become store errors: any OSError a protocol call
        does not handle itself (EACCES, EROFS, ENOSPC, EDQUOT, EIO, a root removed under us)
        is StoreUnavailable naming the store, the operation and the key — StoreRefused for the
        ones that do not pass with time (EROFS, EACCES, EPERM), which nothing waits out."""
        try:
            yield
        except OSError as exc:
            raise self._unavailable(op, key, exc) from None

    def _unavailable(self, op: str, key: str, exc: OSError) -> StoreUnavailable:
        why = exc.strerror or type(exc).__name__
        # a read-only filesystem or a denied permission does not pass with time
        kind = StoreRefused if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else StoreUnavailable
        return kind(f"local store {self.root}: {op} {key}: {why}")

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    # -- paths -------------------------------------------------------------------------
    def _path(self, key: str) -> Path:
        return Path(self._fspath(key))

    def _fspath(self, key: str) -> str:
        """The object file of ``key``, as a string (plain string joins: a pathlib join per
        read costs more than the read itself)."""
        validate_key(key)
        parent, _, last = key.rpartition("/")
        if "%" in key:  # escaping is per segment; most keys have nothing to escape
            parent = "/".join(_esc(p) for p in parent.split("/")) if parent else ""
        shard = f"{_SHARD}{last[:_SHARD_LEN]}/" if _ULID_NAME.match(last) else ""
        prefix = f"{self._objects_s}/{parent}/" if parent else f"{self._objects_s}/"
        return f"{prefix}{shard}{_esc(last)}{_SUFFIX}"

    @staticmethod
    def _flat(path: str) -> str | None:
        """The pre-shard path of a sharded object path (stores written by older versions)."""
        parent, _, name = path.rpartition("/")
        grand, _, shard = parent.rpartition("/")
        if shard.startswith(_SHARD):
            return f"{grand}/{name}"
        return None

    def _resolve(self, path: str) -> str:
        """``path``, or the flat path of the same key when only that exists (an older store)."""
        flat = self._flat(path)
        if flat is not None and not os.path.lexists(path) and os.path.lexists(flat):
            return flat
        return path

    def _lock_path(self, key: str) -> str:
        """The key's lock: one of :data:`_LOCK_STRIPES` files, by the key's hash. Keys sharing a
        stripe exclude each other too (each call holds one lock, so no deadlock); a file per key
        made one more inode per step and a lock directory that grew with every key ever written."""
        h = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        return f"{self._locks_s}/stripe-{h[:_LOCK_HEX]}"

    def _write_temp(self, data: bytes | None = None, src: str | None = None) -> tuple[str, str]:
        """Write a complete temp file (fsynced unless empty or ``fsync=False``) and return
        (path, etag)."""
        tmp = f"{self._tmp_s}/{new_ulid()}-{os.getpid()}"
        h = hashlib.sha256()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileNotFoundError:  # opened with create=False, or tmp/ removed
            os.makedirs(self._tmp_s, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if src is None:
                assert data is not None
                h.update(data)
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
            else:
                with open(src, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        h.update(chunk)
                        view = memoryview(chunk)
                        while view:
                            n = os.write(fd, view)
                            view = view[n:]
            if self.fsync and (src is not None or data):  # empty objects: nothing to tear
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        os.close(fd)
        return tmp, h.hexdigest()[:32]

    def _lock(self, key: str) -> int:
        lp = self._lock_path(key)
        try:
            fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            os.makedirs(self._locks_s, exist_ok=True)
            fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    @staticmethod
    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def _current_etag(self, path: str) -> str | None:
        try:
            with open(path, "rb") as f:
                h = hashlib.sha256()
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
            return h.hexdigest()[:32]
        except FileNotFoundError:
            return None

    # -- protocol ----------------------------------------------------------------------
    def get(self, key: str) -> tuple[bytes, str] | None:
        fspath = self._fspath(key)
        self.stats["get"] += 1
        try:  # what self._io does, without a generator context manager per read
            try:
                data = _read_file(fspath)
            except FileNotFoundError:
                # only a sharded path has a flat twin (a pending step's missing state is not)
                flat = self._flat(fspath)
                if flat is None:
                    return None
                try:
                    data = _read_file(flat)
                except (FileNotFoundError, NotADirectoryError):
                    return None
            except NotADirectoryError:
                return None
        except OSError as exc:
            raise self._unavailable("get", key, exc) from None
        return data, _etag_of(data)

    def put(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidInput(f"put {key!r}: data must be bytes")
        path = self._fspath(key)
        self.stats["put"] += 1
        with self._io("put", key):
            if if_none_match and if_match is None and not data:
                return self._create_empty(key, path)
            tmp, etag = self._write_temp(bytes(data))
            return self._commit(key, path, tmp, etag, if_none_match, if_match)

    def put_file(self, key: str, path: Path, *, if_none_match: bool = False, consume: bool = False) -> str:
        target = self._fspath(key)
        self.stats["put"] += 1
        src = os.fspath(path)
        if not os.path.isfile(src):
            raise NotFound(f"no such file: {path}")
        with self._io("put", key):
            tmp, etag = self._take_file(src) if consume else self._write_temp(src=src)
            return self._commit(key, target, tmp, etag, if_none_match, None)

    def _create_empty(self, key: str, path: str) -> str:
        """Create-if-absent of an empty object (journal and index entries: the key is the
        message): an exclusive create in place, as atomic as the temp-and-link of other
        objects, with nothing to write and no temp to make and remove."""
        self._create_new(key, self._resolve(path),
                         lambda p: os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)))
        return _etag_of(b"")

    def _create_new(self, key: str, path: str, make: Callable[[str], None]) -> None:
        """The one-winner create: ``make(path)`` fails with FileExistsError when the name
        exists (``link``, ``O_EXCL``); missing parent directories are made and it is tried
        again (a concurrent remover of an empty parent can race it, hence a few tries)."""
        for _ in range(3):
            try:
                make(path)
                return
            except FileExistsError:
                raise Conflict(f"{key}: already exists") from None
            except FileNotFoundError:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            except NotADirectoryError:
                raise InvalidInput(f"{key}: a parent is not a directory") from None
        raise StoreUnavailable(f"local store {self.root}: cannot create {key}")

    def _take_file(self, src: str) -> tuple[str, str]:
        """A handed-over file as a temp: hard-linked in (fsynced unless ``fsync=False``), not
        copied — no bytes written, and no inode made here and freed with the caller's copy.
        Falls back to a copy when a link cannot be made (another filesystem, a refusing one)."""
        tmp = f"{self._tmp_s}/{new_ulid()}-{os.getpid()}"
        h = hashlib.sha256()
        with open(src, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
            if self.fsync:
                os.fsync(f.fileno())
        try:
            os.link(src, tmp)
        except FileNotFoundError:
            os.makedirs(self._tmp_s, exist_ok=True)
            try:
                os.link(src, tmp)
            except OSError:
                return self._write_temp(src=src)
        except OSError:  # EXDEV, EPERM (a filesystem without hard links), ...
            return self._write_temp(src=src)
        return tmp, h.hexdigest()[:32]

    def _commit(self, key: str, path: str, tmp: str, etag: str, if_none_match: bool,
                if_match: str | None) -> str:
        path = self._resolve(path)
        try:
            if if_none_match and if_match is None:
                self._create_new(key, path, lambda p: os.link(tmp, p))
                return etag
            fd = self._lock(key)
            try:
                if if_match is not None or if_none_match:
                    current = self._current_etag(path)
                    if if_none_match and current is not None:
                        raise Conflict(f"{key}: already exists")
                    if if_match is not None and current != if_match:
                        raise Conflict(f"{key}: version mismatch" if current else f"{key}: does not exist")
                try:
                    os.replace(tmp, path)
                except FileNotFoundError:  # first object under this prefix: create its directory
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    os.replace(tmp, path)
                return etag
            finally:
                self._unlock(fd)
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def list(self, prefix: str, start_after: str | None = None, limit: int | None = None) -> list[str]:
        validate_prefix(prefix)
        self.stats["list"] += 1
        out: list[str] = []
        if limit is not None and limit <= 0:
            return out
        # The deepest directory that contains every key with this prefix.
        cut = prefix.rfind("/")
        dir_key = prefix[: cut + 1] if cut >= 0 else ""
        base = "/".join([self._objects_s, *(_esc(p) for p in dir_key.split("/") if p)])
        with self._io("list", prefix or "(all)"):
            self._walk(base, dir_key, prefix, start_after, limit, out)
        self.stats["list"] += max(0, (len(out) - 1) // LIST_PAGE)  # pages beyond the first, as on S3
        return out

    def _walk(self, d: str, dir_key: str, prefix: str, start_after: str | None,
              limit: int | None, out: builtins.list[str]) -> bool:
        """Append keys under ``d`` (whose keys start with ``dir_key``) in order; True when full.

        Entries that cannot hold a wanted key are dropped before sorting: a directory (or a
        time shard) holds only keys starting with its prefix, so one whose prefix is outside
        ``prefix`` or wholly at or before ``start_after`` is never opened; nor is one after
        the ``limit``-th key (a page of a long journal reads the shards it returns)."""
        items: list[tuple[str, int, str]] = []  # (sort key, kind, path: a directory's only)
        if not self._scan(d, dir_key, prefix, start_after, items):
            return False
        items.sort()
        return self._emit(items, dir_key, prefix, start_after, limit, out)

    def _emit(self, items: builtins.list[tuple[str, int, str]], dir_key: str, prefix: str,
              start_after: str | None, limit: int | None, out: builtins.list[str]) -> bool:
        """Append the keys of the sorted ``items`` in order; True when ``out`` is full."""
        i, n = 0, len(items)
        while i < n:
            full, kind, path = items[i]
            i += 1
            if kind == _IN_SHARD:
                # every key in the shard starts with ``full``, and of the directory's other
                # entries only those starting with it too (names that begin like a ULID but are
                # not one) can sort among them: they follow the shard here, and join its keys
                group: list[tuple[str, int, str]] = []
                self._scan_shard(path, dir_key, prefix, start_after, group)
                while i < n and items[i][0].startswith(full):
                    group.append(items[i])
                    i += 1
                group.sort()
                if self._emit(group, dir_key, prefix, start_after, limit, out):
                    return True
            elif kind == _DIR:
                if self._walk(path, full, prefix, start_after, limit, out):
                    return True
            else:
                out.append(full)
                if limit is not None and len(out) >= limit:
                    return True
        return False

    @staticmethod
    def _scan(d: str, dir_key: str, prefix: str, start_after: str | None,
              items: builtins.list[tuple[str, int, str]]) -> bool:
        """Add the wanted entries of directory ``d`` to ``items`` (a time shard as one entry,
        opened by :meth:`_emit` when the listing reaches it); False when ``d`` does not exist."""
        try:
            entries = list(os.scandir(d))
        except (FileNotFoundError, NotADirectoryError):
            return False
        for e in entries:
            name = e.name
            try:
                is_dir = e.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if is_dir:
                if name.endswith(_SUFFIX):
                    continue
                shard = name.startswith(_SHARD)
                # every key below starts with `full`
                full = dir_key + (name[len(_SHARD):] if shard else _unesc(name) + "/")
                if not (full.startswith(prefix) or prefix.startswith(full)):
                    continue
                if start_after is not None and start_after >= full and not start_after.startswith(full):
                    continue
                items.append((full, _IN_SHARD if shard else _DIR, e.path))
            else:
                if not name.endswith(_SUFFIX):
                    continue
                full = dir_key + _unesc(name[: -len(_SUFFIX)])
                if not full.startswith(prefix) or (start_after is not None and full <= start_after):
                    continue
                items.append((full, _FILE, ""))  # a file's path is never used: not built
        return True

    @staticmethod
    def _scan_shard(d: str, dir_key: str, prefix: str, start_after: str | None,
                    items: builtins.list[tuple[str, int, str]]) -> None:
        """The wanted keys of a time shard, added to ``items``: it holds only object files
        (names ending in ``%``), so names are enough (no per-entry type check), and only the
        wanted ones become keys. Polled on every cycle by every worker: its newest shard holds
        up to ~1 s of entries."""
        try:
            names = os.listdir(d)
        except (FileNotFoundError, NotADirectoryError):
            return
        if start_after is not None and start_after.startswith(dir_key):
            # the poll's case: most entries are at or before ``start_after``; drop them in one
            # pass (a stem without ``%`` is its own key suffix; escaped ones go the long way)
            cut = start_after[len(dir_key):]
            names = [n for n in names if n[:-1] > cut or "%" in n[:-1]]
        for name in names:
            if not name.endswith(_SUFFIX):
                continue  # a temp or foreign file: never an object
            stem = name[:-1]
            full = dir_key + (_unesc(stem) if "%" in stem else stem)
            if (start_after is not None and full <= start_after) or not full.startswith(prefix):
                continue
            items.append((full, _FILE, ""))  # as in _scan: no path string per listed key

    def delete(self, key: str) -> None:
        path = self._fspath(key)
        self.stats["delete"] += 1
        with self._io("delete", key):
            fd = self._lock(key)
            try:
                os.unlink(self._resolve(path))
            except (FileNotFoundError, NotADirectoryError):
                pass
            finally:
                self._unlock(fd)

    def now(self) -> float:
        return self._clock()

    def head(self, key: str) -> str | None:
        """Etag of ``key`` or None (counted as one 'head'); cheap existence check for blobs."""
        path = self._fspath(key)
        self.stats["head"] += 1
        with self._io("head", key):
            try:
                return self._current_etag(self._resolve(path))
            except NotADirectoryError:
                return None

    def open_read(self, key: str) -> BinaryIO:
        path = self._fspath(key)
        self.stats["get"] += 1
        with self._io("get", key):
            try:
                return open(self._resolve(path), "rb")
            except (FileNotFoundError, NotADirectoryError):
                raise NotFound(f"{key}: not found") from None
