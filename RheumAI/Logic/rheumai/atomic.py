"""Atomic writing: files via a temporary file + rename, folders via a staging folder + swap.

A reader never sees a half-written output, even if the process is killed mid-write: a file is
either the old or the new one; a folder written through :func:`staging_dir` + :func:`replace_dir`
is either the whole previous set or the whole new one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

try:  # POSIX advisory locks mark a staging folder as in use
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

STALE_AFTER_S = 24 * 3600.0  # without file locks (Windows): staging folders older than this are stale


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same full suffix, e.g. ``.nii.gz``, for writers that
    pick the format from it); on success rename it onto ``path``, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix="".join(path.suffixes) or ".tmp",
                               dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)  # mkstemp creates 0600: give the permissions a plain open() would
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    """Indented, key-sorted JSON; numpy scalars / arrays and paths are converted."""
    import numpy as np

    def default(o: Any) -> Any:
        if isinstance(o, (np.generic, np.ndarray, Path)):
            return str(o) if isinstance(o, Path) else o.tolist()
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=default) + "\n")


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """Hard-link ``src`` (an immutable file) at ``dst``, copied where links fail; a symlink is recreated."""
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def exchange_paths(a: str | Path, b: str | Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or file system does not offer it."""
    linux = sys.platform.startswith("linux")
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if linux else None
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    # AT_FDCWD = -100, RENAME_EXCHANGE = 2
    if fn(-100, os.fsencode(str(a)), -100, os.fsencode(str(b)), 2) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def replace_dir(new: str | Path, target: str | Path) -> Path:
    """Put folder ``new`` (a sibling of ``target``) at ``target`` whole: exchanged in one step on Linux, else
    two renames (a kill between them leaves ``.<name>.old-*``, cleaned by :func:`staging_dir`)."""
    new, target = Path(new), Path(target)
    if not target.exists():
        try:
            os.rename(new, target)
            return target
        except OSError as exc:  # created meanwhile by someone else: swap with it below
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    if exchange_paths(new, target):
        shutil.rmtree(new, ignore_errors=True)  # now holds the previous set
        return target
    old = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def _lock_free(lock_path: Path) -> bool:
    """True if no live process holds the lock file (or it is gone)."""
    try:
        if fcntl is None:
            return time.time() - lock_path.stat().st_mtime > STALE_AFTER_S
        fd = os.open(lock_path, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing releases the probe lock


def clean_stale_staging(target: str | Path) -> list[Path]:
    """Remove staging / old folders of ``target`` left by killed runs (no process holds their lock);
    returns what was removed. Folders of a run still going on are left alone."""
    target = Path(target)
    removed: list[Path] = []
    if not target.parent.is_dir():
        return removed
    for p in sorted(target.parent.glob(f".{target.name}.staging-*")):
        lock = p.with_name(p.name + ".lock")
        if p.name.endswith(".lock") or not p.is_dir() or not _lock_free(lock):
            continue
        shutil.rmtree(p, ignore_errors=True)
        lock.unlink(missing_ok=True)
        removed.append(p)
    for lock in target.parent.glob(f".{target.name}.staging-*.lock"):
        if not lock.with_name(lock.name[:-5]).exists() and _lock_free(lock):
            lock.unlink(missing_ok=True)
    for p in target.parent.glob(f".{target.name}.old-*"):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


@contextlib.contextmanager
def staging_dir(target: str | Path) -> Iterator[Path]:
    """Yield a new empty sibling folder ``.<name>.staging-<pid>-<random>`` of ``target``, locked (``flock`` on
    ``<folder>.lock``) while the block runs; write the whole set there and call :func:`replace_dir` inside
    the block to publish it. Stale staging folders are removed first; on an error ``target`` is kept."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(target)
    stage = target.with_name(f".{target.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    lock = stage.with_name(stage.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        stage.mkdir()
        try:
            yield stage
        finally:
            shutil.rmtree(stage, ignore_errors=True)  # gone already after a successful replace_dir
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)
