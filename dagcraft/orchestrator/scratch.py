"""A worker host's scratch directories under ``tmp_root`` (``$TMPDIR/dagcraft``):
``<run>/<step>/<attempt>/`` per attempt, private to this user.

Guarantees: every level from ``tmp_root`` down is a 0700 directory of this user, never a
symlink (refused otherwise: in a shared ``/tmp`` someone else could have made it first); what an
attempt leaves is removed when it ends, its step and run directories when the worker stops
serving the run. An ended attempt's emptied directory (and its emptied ``work/``) is kept as a
*spare* under ``tmp_root/.spare/`` and renamed into place for the next attempt on this host:
on ext4 without a journal every directory made after others were removed costs a scan of the
recently freed inodes, so two made and removed per step made per-step cost grow with the run.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from dagcraft.primitives.ulid import new_ulid

#: at most this many spare attempt directories wait under ``tmp_root/.spare/``
MAX_SPARES = 32
SPARE_DIR = ".spare"
#: the one entry a spare keeps (emptied): the attempt's default working directory
KEPT = "work"


def private_dir(path: Path, root: Path) -> Path:
    """Create ``path`` and every directory from ``root`` down to it, each 0700 (existing ones
    are tightened), so that no other user can list or read what a step leaves in scratch.
    Refuses (PermissionError) a level that is a symlink or owned by another user: in a shared
    ``/tmp`` someone else could have made it first."""
    rel = path.relative_to(root).parts
    top = os.fspath(root)
    levels = [top]
    for part in rel:  # string joins: this runs for every attempt
        levels.append(f"{levels[-1]}/{part}")
    os.makedirs(os.path.dirname(top), exist_ok=True)  # above root: not ours to tighten
    uid = os.geteuid()
    for tries in range(1000):
        try:
            for level in levels:
                try:
                    os.mkdir(level, 0o700)
                except FileExistsError:
                    pass
                st = os.lstat(level)
                if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
                    raise PermissionError(f"scratch directory {level} is not a directory of this user")
                if stat.S_IMODE(st.st_mode) != 0o700:
                    os.chmod(level, 0o700)
            return path
        except FileNotFoundError:
            # an attempt that just ended removed an empty parent between two of our steps
            if tries == 999:
                raise
    return path


def attempt_dir(path: Path, root: Path) -> Path:
    """Make ``path`` (an attempt's directory, absent) with :func:`private_dir`'s guarantees,
    from a spare when one is waiting (it may hold an empty ``work/``)."""
    private_dir(path.parent, root)
    spares = root / SPARE_DIR
    try:
        names = [e.name for e in os.scandir(spares)]
    except OSError:
        names = []
    for name in names:
        try:
            os.rename(spares / name, path)  # atomic: of racing workers exactly one gets it
        except OSError:
            continue  # taken by another worker of this host meanwhile
        st = path.lstat()
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o700:
            return path
        # not a private directory of ours (planted, or tampered with): removed, made fresh below
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    return private_dir(path, root)


def release_attempt_dir(path: Path, root: Path) -> None:
    """Remove what an ended attempt left in ``path`` and keep the emptied directory (and its
    emptied ``work/``) as a spare, or remove it when enough spares wait."""
    spares = root / SPARE_DIR
    try:
        entries = list(os.scandir(path))
    except OSError:
        return
    for e in entries:
        if e.name == KEPT and e.is_dir(follow_symlinks=False):
            for inner in list(os.scandir(e.path)):
                _remove(inner)
        else:
            _remove(e)
    try:
        if len(os.listdir(spares)) < MAX_SPARES:
            os.rename(path, spares / new_ulid())
            return
    except FileNotFoundError:
        try:
            private_dir(spares, root)
            os.rename(path, spares / new_ulid())
            return
        except OSError:
            pass
    except OSError:
        pass
    shutil.rmtree(path, ignore_errors=True)


def _remove(e: os.DirEntry[str]) -> None:
    try:
        if e.is_dir(follow_symlinks=False):
            shutil.rmtree(e.path, ignore_errors=True)
        else:
            os.unlink(e.path)
    except OSError:
        pass


def clean_run_scratch(tmp_root: Path, run_id: str) -> None:
    """Remove the run's empty step directories and then its run directory under ``tmp_root``
    (what attempts leave there once each removed its own directory). Non-empty ones stay: an
    attempt of another worker on this host, or ``--keep-workdirs``; a sibling attempt creating
    a directory again concurrently is handled by ``private_dir``."""
    run_dir = tmp_root / run_id
    try:
        # names, not DirEntry objects: at one directory per step, a 10,000-step run's
        # entries held ~2.5 MiB at the sealing worker's peak (~250 B each, ~80 as names)
        names = os.listdir(run_dir)
    except OSError:
        return
    base = f"{run_dir}/"
    for name in names:
        try:
            os.rmdir(base + name)
        except OSError:
            pass  # not empty, or not a directory
    try:
        run_dir.rmdir()
    except OSError:
        pass
