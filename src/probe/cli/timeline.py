"""``probe timeline RUN [--json] [--window W] [--min-history H] [--threshold Z] [--floor F]``: the steps
where a site's series jumps, the first layer where each shows, the channel, position and token
responsible, and the first NaN/Inf (rules: :mod:`probe.present.timeline`)."""

from __future__ import annotations

import json

from ._common import load, stdout

__all__ = ["add_parser", "command", "add_rule_options"]


def add_rule_options(p) -> None:
    """The jump rule's options, shared with ``probe watch``."""
    from ..present.timeline import FLOOR, MIN_HISTORY, THRESHOLD, WINDOW

    p.add_argument("--window", type=int, default=WINDOW,
                   help=f"previous windows a step is scored against (default {WINDOW})")
    p.add_argument("--min-history", type=int, default=MIN_HISTORY,
                   help=f"fewest previous windows a score needs (default {MIN_HISTORY})")
    p.add_argument("--threshold", type=float, default=THRESHOLD,
                   help=f"robust z-score above which a step is a jump (default {THRESHOLD:g})")
    p.add_argument("--floor", type=float, default=FLOOR,
                   help=f"smallest noise scale, as a share of the trailing median (default {FLOOR:g})")


def add_parser(sub) -> None:
    p = sub.add_parser("timeline", help="steps where a series jumps, and the layer, channel and token behind it")
    p.add_argument("file")
    p.add_argument("--json", action="store_true",
                   help="print the events as a JSON list (step, site, layer, series, score, channel, position, "
                        "row, token, ...)")
    add_rule_options(p)
    p.set_defaults(func=command)


def command(args) -> int:
    from ..present.timeline import print_timeline, timeline

    run = load(args.file)
    tl = timeline(run, window=args.window, min_history=args.min_history, threshold=args.threshold, floor=args.floor)
    if args.json:
        print(json.dumps(tl.to_list(), indent=1))
    else:
        print_timeline(tl, console=stdout())
    return 0
