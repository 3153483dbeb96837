"""Confinement of output paths built from data (patient IDs, study names, series descriptions).

Every writer that names a file or folder after something read from the input goes through
:func:`safe_child`: the name must be one plain path component, and the result must resolve to a
path inside the output folder (symbolic links included). A name that would escape, or that no
file system takes (empty, ``.``/``..``, a separator, NUL or another control character, a Windows
device name, over 255 bytes), is refused with an :class:`~rheumai.errors.InputError` naming it.
Refusing rather than silently rewriting keeps one output per ID and tells the user which ID to fix.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import InputError

MAX_NAME_BYTES = 255  # ext4, XFS, APFS, NTFS (UTF-16 units, a stricter bound is not needed here)
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_name(name: object, what: str = "name", source: str | Path | None = None) -> str:
    """``name`` as a string when it is one safe path component; InputError otherwise.

    what: what the name is ("patient ID", "study name") for the message; source: the file it came
    from (named in the message).
    """
    text = str(name)
    problem = None
    if not text.strip():
        problem = "is empty"
    elif text in (".", ".."):
        problem = "is a relative folder reference"
    elif "/" in text or "\\" in text:
        problem = "contains a path separator ('/' or '\\')"
    elif _CONTROL.search(text):
        problem = "contains NUL or another control character"
    elif text.split(".")[0].strip().upper() in _RESERVED:
        problem = "is a reserved device name on Windows"
    elif text != text.strip() or text.endswith("."):
        problem = "starts or ends with white space or ends with '.'"
    elif len(text.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        problem = f"is longer than {MAX_NAME_BYTES} bytes"
    if problem:
        raise InputError(source, f"{what} {text[:80]!r} cannot name an output file or folder: it {problem}")
    return text


def safe_child(out_dir: str | Path, name: object, suffix: str = "", what: str = "name",
               source: str | Path | None = None) -> Path:
    """``out_dir / (name + suffix)``, refused unless it stays inside ``out_dir``.

    ``name`` comes from data and is checked by :func:`check_name` (with ``suffix``, a constant of
    the writer such as ``"_saliency.nii.gz"``, appended); the resolved result (links followed)
    must lie under the resolved ``out_dir``. Nothing is created.
    """
    text = check_name(name, what, source)
    full = check_name(text + suffix, what, source)
    base = Path(out_dir)
    path = base / full
    root = base.resolve()
    resolved = path.resolve()
    if resolved.parent != root and root not in resolved.parents:
        raise InputError(source, f"{what} {text[:80]!r}: {path} resolves to {resolved}, outside the output folder {root}")
    return path
