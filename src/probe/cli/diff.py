"""``probe diff A B [--json] [--plot FILE]``: per-site distribution shift between two runs, each quantile
shift with the interval the histogram buckets bound it to."""

from __future__ import annotations

import json
import sys

from ._common import load, stdout

__all__ = ["add_parser", "command"]


def add_parser(sub) -> None:
    p = sub.add_parser("diff", help="per-site distribution shift between two runs")
    p.add_argument("a", help="the reference run (.h5)")
    p.add_argument("b", nargs="?", default=None, help="the run compared with it (.h5)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", default=None, metavar="FILE",
                   help="also draw the shift to this file (.png, .pdf or .svg by its suffix), with the quantile "
                        "shifts' intervals as error bars")
    p.add_argument("--dpi", type=int, default=None, help="with --plot: pixels per inch of a PNG (default 110)")
    p.set_defaults(func=command)


def command(args) -> int:
    from ..errors import ProbeError
    from ..present.report import diff, diff_warnings, print_diff

    if args.b is None:
        raise ProbeError(f"expected two runs, A and B; got one ({args.a}); pass e.g. probe diff {args.a} other.h5")
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

        print(plot_diff(a, b, args.plot, dpi=args.dpi))
    return 0
