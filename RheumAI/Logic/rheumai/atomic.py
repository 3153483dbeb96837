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


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    The temporary name keeps the full suffix (``.nii.gz``, ``.nrrd``...) so writers that
    choose a format from the extension still work. On error the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; give the file the permissions a plain open() would (umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ------------------------------------------------------------------------------ folders

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
STALE_AFTER_S = 24 * 3600.0  # without file locks (Windows): staging folders older than this are stale


def exchange_paths(a: str | Path, b: str | Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the system or file system does not offer it (the caller falls back).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def replace_dir(new: str | Path, target: str | Path) -> Path:
    """Put folder ``new`` at ``target``, replacing the previous ``target`` folder as a whole.

    On Linux the two folders are exchanged in one atomic step, so a reader (or a kill) sees
    either the complete old set or the complete new one; elsewhere two renames follow each other
    (a kill between them leaves ``.<name>.old-<pid>`` beside the target, cleaned by the next
    :func:`staging_dir`). ``new`` must be a sibling of ``target`` (same file system).
    """
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
    if fcntl is None:
        try:
            return time.time() - lock_path.stat().st_mtime > STALE_AFTER_S
        except FileNotFoundError:
            return True
    try:
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
    """Remove staging / old folders of ``target`` left by killed runs; returns what was removed.

    A staging folder is stale when no process holds its lock file; folders of a run still going
    on (in this or another process) are left alone.
    """
    target = Path(target)
    parent = target.parent
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    for p in sorted(parent.glob(f".{target.name}.staging-*")):
        if p.name.endswith(".lock") or not p.is_dir():
            continue
        lock = p.with_name(p.name + ".lock")
        if (lock.exists() or fcntl is None) and not _lock_free(lock):
            continue
        shutil.rmtree(p, ignore_errors=True)
        lock.unlink(missing_ok=True)
        removed.append(p)
    for lock in parent.glob(f".{target.name}.staging-*.lock"):
        if not lock.with_name(lock.name[:-5]).exists() and _lock_free(lock):
            lock.unlink(missing_ok=True)
    for p in parent.glob(f".{target.name}.old-*"):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


@contextlib.contextmanager
def staging_dir(target: str | Path) -> Iterator[Path]:
    """Yield a new empty sibling folder ``.<name>.staging-<pid>-<random>`` of ``target``.

    Write the whole set there, then call :func:`replace_dir` (inside the block) to publish it.
    The folder is locked (``flock`` on ``<folder>.lock``) while the block runs; stale staging
    folders of killed runs are removed first; on an error the staging folder is removed, so a
    failed run leaves ``target`` exactly as it was.
    """
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
