"""``probe report RUN [RUN2] -o report.html``: one self-contained HTML report (a run, or two and their shift)."""

from __future__ import annotations

import time

from ._common import load

__all__ = ["add_parser", "command"]


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="write one self-contained HTML report of a run (or of two and their shift)",
                       description="Write the summary table, every figure, the massive-activation and outlier "
                                   "tables and, for two runs, the diff with its uncertainty, as one HTML file "
                                   "with everything inline (opens offline).")
    p.add_argument("file")
    p.add_argument("file_b", nargs="?", default=None, metavar="file2",
                   help="a second run to compare with the first (default: report the first alone)")
    p.add_argument("-o", "--out", default="report.html", help="output file (default report.html)")
    p.add_argument("--dpi", type=int, default=90, help="pixels per inch of the inline figures (default 90)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    p.set_defaults(func=command)


def command(args) -> int:
    from rich.console import Console

    from ..errors import ProbeError
    from ..present.html import write_report
    from ..store import check_writable

    if not 10 <= args.dpi <= 600:
        raise ProbeError(f"--dpi: expected an integer from 10 to 600, got {args.dpi}; pass e.g. --dpi 90")
    check_writable(args.out, args.overwrite, flag="-o", file="report.html")
    console = Console(stderr=True)
    started = time.perf_counter()
    a = load(args.file)
    b = load(args.file_b) if args.file_b is not None else None
    with console.status("drawing the figures and writing the report …"):
        path = write_report(a, args.out, b=b, dpi=args.dpi)
    print(path)
    console.print(f"[green]wrote[/] {path} in {time.perf_counter() - started:.1f}s")
    return 0
