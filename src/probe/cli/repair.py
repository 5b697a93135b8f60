"""``probe repair RUN [RUN ...]``: open run files a killed writer left, with probe alone.

For each file: clear HDF5's "open for write" flag and a dead writer's lock file
(:func:`probe.store.repair`; refused while a live process writes the file), then read every
committed window and the cumulative state back, every record checked as any read checks it.
One line per file, ``RUN: <what was done>; <N> committed window(s), every record checked``; the
exit status is 2 if any file could not be repaired or read (its line says why). What a killed
writer began past the commit marker needs no repair: readers never see it, and a ``/total``
whose digest does not prove it is recomputed from the windows (``docs/format.md``, crash model).
"""

from __future__ import annotations

import sys

__all__ = ["add_parser", "command"]


def add_parser(sub) -> None:
    p = sub.add_parser("repair", help="reopen run files whose writer was killed, and check every record",
                       description="Clear what a killed writer left (HDF5's open-for-write flag, a stale lock "
                                   "file) without HDF5 tools, then read every committed window back, checked. "
                                   "Refused while a live process writes the file.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run files (.h5)")
    p.set_defaults(func=command)


def command(args) -> int:
    from ..errors import ProbeError
    from ..store import repair
    from . import one_line
    from ._common import load

    status = 0
    for path in args.runs:
        try:
            what = repair(path)
            run = load(path)
            for _ in run.rows:  # each window read and checked
                pass
            for name in run.sites:
                run.total.state(name, "moments")
        except (ProbeError, OSError) as err:
            print(f"probe repair: error: {one_line(str(err))}", file=sys.stderr)
            status = 2
            continue
        print(one_line(f"{path}: {what}; {len(run.steps)} committed window(s), every record checked"))
    return status
