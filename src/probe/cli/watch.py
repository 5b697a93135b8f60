"""``probe watch RUN [--interval S] [--once] [--last N]``: follow a run file being written, a live
table of its latest window (per site: absmax, std, kurtosis, norm p99, non-finite values,
gradient absmax, and the largest jump score; a jump in red). Ctrl-C stops it; when the file's
writer died without closing it (a killed job), it says so and exits with status 1."""

from __future__ import annotations

import os
import sys
import time

from ..errors import ProbeError
from ._common import load, stdout, writer_gone

__all__ = ["add_parser", "command"]


def add_parser(sub) -> None:
    from .timeline import add_rule_options

    p = sub.add_parser("watch", help="follow a run file being written: a live table of its latest window")
    p.add_argument("file")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between reads (default 2)")
    p.add_argument("--once", action="store_true", help="print the table once and exit (for scripts and tests)")
    p.add_argument("--last", type=int, default=None,
                   help="windows read each time (default: the jump rule's --window + 1)")
    add_rule_options(p)
    p.set_defaults(func=command)


def _table(args):
    from ..present.timeline import print_window, timeline

    last = args.last if args.last is not None else args.window + 1
    run = load(args.file)
    tl = timeline(run, window=args.window, min_history=args.min_history, threshold=args.threshold,
                  floor=args.floor, last=last)
    table = print_window(tl)
    if tl.first_nonfinite is not None:
        e = tl.first_nonfinite
        table.caption = f"NaN/Inf at step {e.step}, {e.site} (first in the windows read)"
    return table


def command(args) -> int:
    if not args.interval > 0:
        raise ProbeError(f"--interval must be > 0 seconds; got {args.interval}; pass e.g. --interval 2")
    if args.last is not None and args.last < 1:
        raise ProbeError(f"--last must be >= 1; got {args.last}; pass e.g. --last 17")
    console = stdout()
    if args.once:
        console.print(_table(args))
        gone = writer_gone(args.file)
        if gone is not None:
            print(f"probe watch: note: {gone}", file=sys.stderr)
        return 0
    from rich.live import Live

    seen = None
    dead = 0
    with Live(console=console, auto_refresh=False) as live:
        while True:  # until Ctrl-C (status 130), or the writer is gone
            gone = writer_gone(args.file)
            dead = dead + 1 if gone is not None else 0
            if dead >= 2:  # twice in a row: not a writer between creating its lock file and taking it
                try:
                    live.update(_table(args), refresh=True)
                except ProbeError:
                    pass
                live.stop()
                print(f"probe watch: {gone}", file=sys.stderr)
                return 1
            try:
                stamp = os.stat(args.file).st_mtime_ns
            except FileNotFoundError:
                stamp = None
            if stamp is not None and stamp != seen:
                try:
                    live.update(_table(args), refresh=True)
                    seen = stamp
                except ProbeError as err:  # mid-write or not yet a run: say so and read again
                    live.update(f"[yellow]waiting[/]: {err}", refresh=True)
            elif stamp is None:
                live.update(f"[yellow]waiting[/] for {args.file} to appear", refresh=True)
            time.sleep(args.interval if not dead else min(args.interval, 0.2))
