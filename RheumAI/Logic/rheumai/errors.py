"""Errors raised on bad input. Every message names the offending file and the problem."""

from __future__ import annotations

from pathlib import Path


class RheumAIError(Exception):
    """Base class for errors reported to the user (CLI prints the message, no traceback)."""


class InputError(RheumAIError, ValueError):
    """Bad input data: unreadable, wrong kind, or inconsistent geometry.

    The message always starts with the path of the offending file or folder.
    """

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class AmbiguousSeriesError(InputError):
    """A DICOM folder holds several candidate series; the message lists them."""
