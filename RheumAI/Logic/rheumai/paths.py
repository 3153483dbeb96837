"""Confinement of output paths built from data (patient IDs, study names, series descriptions).

A name read from the input must be one plain path component that a file system takes, and the path
it names must resolve (links followed) inside the output folder; otherwise an
:class:`~rheumai.errors.InputError` names it. Refusing rather than rewriting keeps one output per ID.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import InputError

MAX_NAME_BYTES = 255  # ext4, XFS, APFS, NTFS (UTF-16 units, a stricter bound is not needed here)
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_name(name: object, what: str = "name", source: str | Path | None = None) -> str:
    """``name`` as a string when it is one safe path component; InputError otherwise, naming ``what``
    the name is ("patient ID", "study name") and the ``source`` file it came from."""
    text = str(name)
    problems = [(not text.strip(), "is empty"), (text in (".", ".."), "is a relative folder reference"),
                ("/" in text or "\\" in text, "contains a path separator ('/' or '\\')"),
                (bool(_CONTROL.search(text)), "contains NUL or another control character"),
                (text.split(".")[0].strip().upper() in _RESERVED, "is a reserved device name on Windows"),
                (text != text.strip() or text.endswith("."), "starts or ends with white space or ends with '.'"),
                (len(text.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES, f"is longer than {MAX_NAME_BYTES} bytes")]
    for bad, problem in problems:
        if bad:
            raise InputError(source, f"{what} {text[:80]!r} cannot name an output file or folder: it {problem}")
    return text


def safe_child(out_dir: str | Path, name: object, suffix: str = "", what: str = "name",
               source: str | Path | None = None) -> Path:
    """``out_dir / (name + suffix)`` (``name`` from data, ``suffix`` a constant of the writer such as
    ``"_saliency.nii.gz"``, both checked by :func:`check_name`), refused unless it resolves inside
    ``out_dir``. Nothing is created."""
    text = check_name(name, what, source)
    path = Path(out_dir) / check_name(text + suffix, what, source)
    root, resolved = Path(out_dir).resolve(), path.resolve()
    if resolved.parent != root and root not in resolved.parents:
        raise InputError(source, f"{what} {text[:80]!r}: {path} resolves to {resolved}, "
                                 f"outside the output folder {root}")
    return path
