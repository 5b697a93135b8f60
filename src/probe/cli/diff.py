"""``probe diff A B [--json] [--plot PNG]``: per-site distribution shift between two runs."""

from __future__ import annotations

import json
import sys

from ._common import load, stdout

__all__ = ["add_parser", "command"]


def add_parser(sub) -> None:
    p = sub.add_parser("diff", help="per-site distribution shift between two runs")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw the shift to this PNG file")
    p.set_defaults(func=command)


def command(args) -> int:
    from ..present.report import diff, diff_warnings, print_diff

    a, b = load(args.a), load(args.b)
    rows = diff(a, b)  # raises when the runs share no site
    for line in diff_warnings(a, b):
        print(f"probe diff: warning: {line}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print_diff(rows, console=stdout())
    if args.plot:
        from ..present.plot import plot_diff

        print(plot_diff(a, b, args.plot))
    return 0
