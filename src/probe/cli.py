"""``probe run · show · plot · diff · merge``: each subcommand is a parser plus a command.

User errors print one line on stderr and exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .errors import ProbeError

__all__ = ["main"]


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="capture statistics of a model over text",
                       description="Run MODEL over text and write its activation statistics to an HDF5 file.")
    p.add_argument("model", nargs="?", default="smollm2-135m",
                   help="'smollm2-135m' (bundled, default), a local folder or a cached HF id")
    p.add_argument("--text", action="append", default=[], help="a document (repeatable)")
    p.add_argument("--file", action="append", default=[],
                   help=".txt (one document per blank-line-separated paragraph), .jsonl ('text' field) or - for stdin")
    p.add_argument("-o", "--out", default="run.h5", help="output file (default run.h5)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512, help="truncate each document to this many tokens")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after about this many real tokens")
    p.add_argument("--skip-first", type=int, default=1,
                   help="drop the first k tokens of each document from all but per-position stats (default 1)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sites", action="append", default=None,
                   help="'hidden_states' (default), module names or globs (repeatable)")
    p.add_argument("--stats", default=None, help="comma-separated subset of moments,position,histogram,sample,"
                   "cross,topk,norm,cos (default: all but cos)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from . import capture
    from .models import batches, load_model, read_texts, sample_texts
    from .store import annotate, check_writable

    console = Console(stderr=True)
    check_writable(args.out, args.overwrite)
    docs = read_texts(args.file, args.text) if (args.file or args.text) else sample_texts()
    if not docs:
        raise ProbeError("no text to run on; expected --text, --file or stdin with at least one non-empty document; "
                         "pass --text 'some text'")
    with console.status(f"loading {args.model} …"):
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    stats = tuple(s.strip() for s in args.stats.split(",")) if args.stats else None
    tokens = 0
    started = time.perf_counter()
    with capture(model, args.out, sites=args.sites or "hidden_states", stats=stats,
                 skip_first=args.skip_first, overwrite=args.overwrite) as run:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task("documents", total=len(docs), rate="")
            done = 0
            for batch in batches(tokenizer, docs, args.batch_size, args.max_length, args.max_tokens):
                batch = {k: v.to(args.device) for k, v in batch.items()}
                with torch.no_grad():
                    model(**batch)
                tokens += int(batch["attention_mask"].sum())
                done += batch["input_ids"].shape[0]
                rate = tokens / max(1e-9, time.perf_counter() - started)
                progress.update(task, completed=done, rate=f"{tokens} tokens · {rate:,.0f} tok/s")
    elapsed = time.perf_counter() - started
    result = run.result
    ids = {result[n].absmax_at["token"] for n in result.sites} - {-1}
    ids |= {int(t) for n in result.sites for t in (result.total["sites"][n].get("topk") or {}).get("token", [])} - {-1}
    annotate(args.out, token_text={str(i): tokenizer.decode([i]) for i in sorted(ids)}, texts=len(docs))
    console.print(f"[green]wrote[/] {args.out}: {len(result.sites)} sites, {done} documents, {tokens} tokens "
                  f"in {elapsed:.1f}s ({tokens / max(elapsed, 1e-9):,.0f} tok/s)")
    return 0


def _add_show(sub) -> None:
    p = sub.add_parser("show", help="print a run's statistics as a table")
    p.add_argument("file")
    p.add_argument("--site", default=None, help="show one site in detail")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=cmd_show)


def cmd_show(args) -> int:
    from . import load
    from .report import print_summary, summary

    run = load(args.file)
    if args.site is not None:
        run[args.site]  # validates the name
    if args.json:
        print(json.dumps(summary(run), indent=1))
    else:
        print_summary(run, site=args.site)
    return 0


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="draw a run's figures as PNG files")
    p.add_argument("file")
    p.add_argument("-o", "--out", default="figures", help="output folder (default figures/)")
    p.add_argument("--kind", action="append", default=None,
                   help="histograms | cross | scatter | channels | positions | steps (repeatable; default all)")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args) -> int:
    from . import load
    from .plot import plot_run

    run = load(args.file)
    paths = plot_run(run, args.out, kinds=args.kind)
    for path in paths:
        print(path)
    return 0


def _add_diff(sub) -> None:
    p = sub.add_parser("diff", help="per-site distribution shift between two runs")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw the shift to this PNG file")
    p.set_defaults(func=cmd_diff)


def cmd_diff(args) -> int:
    from . import load
    from .report import diff, print_diff

    a, b = load(args.a), load(args.b)
    rows = diff(a, b)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print_diff(rows)
    if args.plot:
        from .plot import plot_diff

        print(plot_diff(a, b, args.plot))
    return 0


def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="merge run files exactly (ranks, shards)")
    p.add_argument("files", nargs="+")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_merge)


def cmd_merge(args) -> int:
    from . import merge

    run = merge(args.files, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}: {len(args.files)} files, {len(run.rows)} window(s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="probe", description="See inside transformers while they run.")
    parser.add_argument("--version", action="version", version=f"probe {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_run, _add_show, _add_plot, _add_diff, _add_merge):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ProbeError, OSError) as err:
        if args.debug:
            raise
        print(f"probe {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"probe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
