"""``probe plot RUN [-o figures/] [--kind K] [--layers L] [--shared] [--linear] [--format F] [--dpi N]
[--size S] [--no-title]``: a run's figures as files."""

from __future__ import annotations

import time

from ._common import load

__all__ = ["add_parser", "command"]


def add_parser(sub) -> None:
    from ..present.plot import FORMATS, KINDS, SIZES

    p = sub.add_parser("plot", help="draw a run's figures as PNG, PDF or SVG files")
    p.add_argument("file")
    p.add_argument("-o", "--out", default="figures", help="output folder, created if missing (default figures/)")
    p.add_argument("--kind", action="append", default=None,
                   help=" | ".join(KINDS) + " (repeatable; default all the run has data for)")
    p.add_argument("--layers", default=None,
                   help="layers for the overlay and scatter figures: e.g. 0,5,10-12 or all "
                        "(default: a spread of about six); at a print --size, also the histogram grid's "
                        "panels when all would be taller than a page (then a spread of those that fit)")
    p.add_argument("--shared", action="store_true",
                   help="histogram grid on one shared x and y axis (default: each panel its own)")
    p.add_argument("--linear", action="store_true",
                   help="histograms on a linear value axis with equal-width bins (default: asinh axis)")
    p.add_argument("--format", choices=FORMATS, default="png", help="file format (default png)")
    p.add_argument("--dpi", type=int, default=None, help="pixels per inch of PNGs and of the rasterised parts of PDF/SVG "
                        "(default 110 at --size screen, 300 at the print sizes)")
    p.add_argument("--size", choices=tuple(SIZES), default="screen",
                   help="figure width: screen (each figure's own), column (3.5 in, a paper's column), "
                        "page (7 in), slide (13.33 in, 16:9) (default screen)")
    p.add_argument("--no-title", dest="titles", action="store_false",
                   help="leave each figure's title out, for a paper whose caption says it; the title's text is "
                        "printed as the start of the file's caption (default: titles drawn)")
    p.set_defaults(func=command)


def command(args) -> int:
    from rich.console import Console

    from ..errors import ProbeError, closest
    from ..present.plot import KINDS, parse_layers, plot_run

    console = Console(stderr=True)
    unknown = [k for k in args.kind or () if k not in KINDS]
    if unknown:  # in the command's words, not plot_run's kinds=[...]
        raise ProbeError(f"--kind {unknown[0]}: unknown plot kind; expected one of {', '.join(KINDS)}"
                         f"{closest(unknown[0], KINDS)}; pass e.g. --kind histograms --kind depth")
    run = load(args.file)
    layers = parse_layers(run, args.layers) if args.layers is not None else None
    started = time.perf_counter()

    def progress(kind: str, i: int, n: int) -> None:
        console.print(f"[dim]{time.perf_counter() - started:5.1f}s[/] drawing {kind} ({i}/{n}) …")

    captions: dict[str, str] = {}

    def skipped(kind: str, why: str) -> None:
        console.print(f"[yellow]skipped[/] {kind}: {why}", soft_wrap=True)

    paths = plot_run(run, args.out, kinds=args.kind, layers=layers, shared=args.shared, linear=args.linear,
                     format=args.format, dpi=args.dpi, size=args.size, titles=args.titles, progress=progress,
                     skipped=skipped,
                     caption=captions.__setitem__)
    for path in paths:
        print(path)
        if path in captions:  # what the figure leaves to its caption: printed with it
            console.print(f"[dim]caption of {path}:[/] {captions[path]}", soft_wrap=True)
    console.print(f"[green]drew[/] {len(paths)} figure(s) in {time.perf_counter() - started:.1f}s")
    return 0
