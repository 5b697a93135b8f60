"""One exception family for everything probe refuses.

Every message follows one formula: what was wrong, what was expected, what was received, and the
fix. ``ProbeError`` subclasses ``ValueError`` so that generic handlers still catch it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["ProbeError", "SiteError", "FileFormatError", "closest"]


class ProbeError(ValueError):
    """Base class of every error probe raises on purpose; the message is one line."""


class SiteError(ProbeError):
    """A site name, pattern or tensor that cannot be captured."""


class FileFormatError(ProbeError):
    """A file that is not a probe run, is damaged, or was written by a newer probe."""


def closest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """``"closest: a, b"`` for the nearest valid names, or ``""`` when nothing is near."""
    found = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f"; closest: {', '.join(found)}" if found else ""
