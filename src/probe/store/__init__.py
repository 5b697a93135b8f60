"""The HDF5 run file (schema version 2, see ``docs/format.md``); the only package importing h5py.

:mod:`.schema` holds the layout and one codec per statistic, shared by :mod:`.writer` (append a
window, keep ``/total``) and :mod:`.reader` (check a file, read it lazily)::

    w = Writer("run.h5")        # refuses a path another live process writes
    w.append(meta, window)      # one committed window: rows, /total, then the commit marker
    w.close()
    run = read("run.h5")        # a probe.results.Run
    repair("old.h5")            # clear the open-for-write flag a killed writer left (old files)
"""

from __future__ import annotations

from typing import Any

from ..stats._state import WindowState
from .reader import read
from .repair import repair
from .schema import SCHEMA, SPARSE, VERSION
from .writer import StoreError, Writer, annotate, check_writable, write_run

__all__ = ["SCHEMA", "VERSION", "SPARSE", "Writer", "StoreError", "read", "check_writable", "write_run", "annotate",
           "in_memory", "repair"]


def in_memory(meta: dict[str, Any], windows: list[WindowState]):
    """A run over windows held in memory (a capture without ``out=``, a merge before it is
    written): the same :class:`probe.results.Run` a file gives, so the write side hands its
    windows over here and never builds read-side objects itself."""
    from ..results.run import Run

    return Run(meta, windows)
