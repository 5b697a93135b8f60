"""``probe run · show · plot · diff · merge · export · cache``: each subcommand is a parser plus a command.

To add a subcommand, write ``_add_x(sub)`` (its parser, ending in ``set_defaults(func=cmd_x)``)
and ``cmd_x(args) -> int``, and list ``_add_x`` in :data:`COMMANDS`.

User errors print one line on stderr, ``probe <command>: error: ...``, and exit with status 2;
``--debug`` shows the traceback. Every value of ``probe run`` is checked before the model loads.
Nothing here imports torch, matplotlib or h5py at import time: ``probe show`` stays quick.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

from ..errors import ProbeError
from ..stats import NAMES as STATS

__all__ = ["main", "build_parser", "COMMANDS"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``probe run: error: ...; see probe run -h``."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} -h\n")


# --------------------------------------------------------------------------------------- run
def _add_run(sub) -> None:
    p = sub.add_parser("run", help="capture statistics of a model over text",
                       description="Run MODEL over text and write its activation statistics to an HDF5 file.")
    p.add_argument("model", nargs="?", default="smollm2-135m",
                   help="'smollm2-135m' (bundled SmolLM2-135M-Instruct, default), a local folder or a cached HF id")
    p.add_argument("--text", action="append", default=[], help="a document (repeatable)")
    p.add_argument("--file", action="append", default=[],
                   help=".txt (one document per blank-line-separated paragraph), .jsonl ('text' field per line), "
                        ".json (array of strings or {'text': ...}) or - for stdin; suffixes in any case")
    p.add_argument("-o", "--out", default="run.h5", help="output file (default run.h5)")
    p.add_argument("--batch-size", type=int, default=8, help="documents per forward (default 8)")
    p.add_argument("--max-length", type=int, default=512, help="truncate each document to this many tokens")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after about this many real tokens")
    p.add_argument("--skip-first", type=int, default=1,
                   help="drop the first k tokens of each document from all but per-position stats (default 1)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sites", action="append", default=None,
                   help="'hidden_states' (default), module names or globs (repeatable)")
    p.add_argument("--stats", default=None, help="comma-separated subset of " + ",".join(STATS) + " (default: all but cos)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the uniform sample (default: probe.capture's default)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_run)


def _check_run(args) -> tuple[list[str], tuple[str, ...] | None]:
    """Every ``probe run`` value, checked before anything heavy loads; returns (docs, stats)."""
    from ..models import DTYPES, check_model, check_text_file, read_texts, sample_texts

    def at_least(flag: str, value, low: int, fix: str) -> None:
        if value is not None and value < low:
            raise ProbeError(f"{flag}: expected an integer >= {low}, got {value}; {fix}")

    at_least("--batch-size", args.batch_size, 1, "pass e.g. --batch-size 8")
    at_least("--max-length", args.max_length, 1, "pass e.g. --max-length 512")
    at_least("--max-tokens", args.max_tokens, 1, "pass e.g. --max-tokens 10000, or leave it out")
    at_least("--skip-first", args.skip_first, 0, "pass 0 to keep every token")
    at_least("--seed", args.seed, 0, "pass a non-negative integer")
    if args.skip_first >= args.max_length:
        raise ProbeError(f"--skip-first {args.skip_first} drops every token of documents cut to --max-length "
                         f"{args.max_length}; expected --skip-first below --max-length; lower --skip-first")
    if args.dtype is not None and args.dtype not in DTYPES:
        raise ProbeError(f"--dtype: expected one of float32, bfloat16, float16, got {args.dtype!r}; "
                         "pass e.g. --dtype bfloat16")
    stats = None
    if args.stats is not None:
        stats = tuple(s.strip() for s in args.stats.split(",") if s.strip())
        bad = [s for s in stats if s not in STATS]
        if bad or not stats:
            raise ProbeError(f"--stats: expected a comma-separated subset of {','.join(STATS)}, got "
                             f"{args.stats!r}; pass e.g. --stats moments,histogram")
    for path in args.file:
        check_text_file(path)
    _check_out(args.out, args.overwrite)
    check_model(args.model)
    _check_device(args.device)
    docs = read_texts(args.file, args.text) if (args.file or args.text) else sample_texts()
    if not docs:
        raise ProbeError("--text/--file: expected at least one non-empty document, got none; "
                         "pass --text 'some text' or a non-empty --file")
    return docs, stats


def _check_out(out: str, overwrite: bool) -> None:
    from ..store import check_writable

    check_writable(out, overwrite, flag="-o")


def _check_device(device: str) -> None:
    import torch  # needed for the run anyway; imported after the cheap checks

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ProbeError(f"--device: expected a torch device such as cpu, cuda or cuda:1, got {device!r}; "
                         "pass --device cpu") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ProbeError(f"--device {device}: CUDA is not available here; expected an available device; "
                         "pass --device cpu")


def cmd_run(args) -> int:
    docs, stats = _check_run(args)

    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..capture.session import capture
    from ..models import batches, load_model
    from ..store import annotate

    console = Console(stderr=True)
    with console.status(f"loading {args.model} …"):
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    options = {"seed": args.seed} if args.seed is not None else {}
    tokens = done = complete = 0
    stopped: str | None = None  # why the run ended early, as stored in the file
    failure: BaseException | None = None
    what = ""
    started = time.perf_counter()
    with warnings.catch_warnings():
        with capture(model, args.out, sites=args.sites or "hidden_states", stats=stats,
                     skip_first=args.skip_first, overwrite=args.overwrite, **options) as run:
            try:
                with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console) as progress:
                    task = progress.add_task("documents", total=len(docs), rate="")
                    for batch in batches(tokenizer, docs, args.batch_size, args.max_length, args.max_tokens):
                        batch = {k: v.to(args.device) for k, v in batch.items()}
                        with torch.no_grad():
                            model(**batch)
                        complete += 1
                        tokens += int(batch["attention_mask"].sum())
                        done += batch["input_ids"].shape[0]
                        rate = tokens / max(1e-9, time.perf_counter() - started)
                        progress.update(task, completed=done, rate=f"{tokens} tokens · {rate:,.0f} tok/s")
            except KeyboardInterrupt:
                stopped = "interrupted (Ctrl-C)"
            except Exception as err:  # saved as partial below, then reported
                what = f"{type(err).__name__}: {str(err).splitlines()[0]}" if str(err) else type(err).__name__
                stopped, failure = f"failed: {what}", err
            if stopped:
                # the forward in flight stopped half-way: its sites did not all fire, which is
                # expected here and said once below, not as a cross-layer warning
                warnings.filterwarnings("ignore", message=r".*did not fire in this forward.*")
    elapsed = time.perf_counter() - started
    if complete == 0:
        if os.path.exists(args.out):
            os.remove(args.out)
        if failure is not None:
            raise ProbeError(f"the first batch failed ({what}); no file written; "
                             "check the model and text (--debug shows the traceback)") from failure
        console.print(f"[yellow]{stopped or 'stopped'}[/] before any batch finished: nothing collected, "
                      f"no file written", soft_wrap=True)
        return 130 if failure is None else 2
    result = run.result
    ids = {result[n].absmax_at["token"] for n in result.sites} - {-1}
    if "topk" in result.stats:
        ids |= {int(t) for n in result.sites for t in result[n].topk["token"]} - {-1}
    extra = {}
    if stopped:
        extra["partial"] = {"reason": stopped, "batches": complete, "documents": done, "tokens": tokens}
    annotate(args.out, token_text={str(i): tokenizer.decode([i]) for i in sorted(ids)}, texts=len(docs), **extra)
    if stopped:
        console.print(f"[yellow]{stopped}[/] after {complete} batch(es): {args.out} holds {done} documents, "
                      f"{tokens} tokens and is marked partial (probe show says so)", soft_wrap=True)
        if failure is not None:
            raise ProbeError(f"{what}; what ran before is saved in {args.out}, marked partial; "
                             "--debug shows the traceback") from failure
        return 130
    console.print(f"[green]wrote[/] {args.out}: {len(result.sites)} sites, {done} documents, {tokens} tokens "
                  f"in {elapsed:.1f}s ({tokens / max(elapsed, 1e-9):,.0f} tok/s)")
    return 0


# -------------------------------------------------------------------------------------- show
def _add_show(sub) -> None:
    p = sub.add_parser("show", help="print a run's statistics as a table")
    p.add_argument("file")
    p.add_argument("--site", default=None,
                   help="one site in detail: its name, or the layer number the table shows (e.g. 5)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts (honours --site)")
    from .export import add_quant_options

    add_quant_options(p)
    p.set_defaults(func=cmd_show)


def _load(path: str):
    from ..store import read

    return read(path)


def cmd_show(args) -> int:
    if getattr(args, "scale", None) is not None and not getattr(args, "quant", None):
        raise ProbeError(f"--scale: only used with --quant, got --scale {args.scale} alone; "
                         "pass --quant fp8 or --quant int8 with it")
    if getattr(args, "quant", None):
        from .export import cmd_show_quant

        return cmd_show_quant(args)
    from ..present.report import print_summary, resolve_site, summary

    run = _load(args.file)
    site = resolve_site(run, args.site) if args.site is not None else None
    if args.json:
        print(json.dumps(summary(run, sites=None if site is None else [site]), indent=1))
        return 0
    print_summary(run, console=_stdout(), site=site)
    return 0


def _stdout():
    """A rich console on stdout; for a pipe or a file, wide enough for every column (no terminal
    width to respect there, and a script should not get fewer columns than a person)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 160))


# -------------------------------------------------------------------------------------- plot
def _add_plot(sub) -> None:
    from ..present.plot import KINDS

    p = sub.add_parser("plot", help="draw a run's figures as PNG files")
    p.add_argument("file")
    p.add_argument("-o", "--out", default="figures", help="output folder (default figures/)")
    p.add_argument("--kind", action="append", default=None,
                   help=" | ".join(KINDS) + " (repeatable; default all the run has data for)")
    p.add_argument("--layers", default=None,
                   help="layers for the overlay and scatter figures: e.g. 0,5,10-12 or all "
                        "(default: a spread of about six)")
    p.add_argument("--shared", action="store_true",
                   help="histogram grid on one shared x and y axis (default: each panel its own)")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args) -> int:
    from rich.console import Console

    from ..present.plot import parse_layers, plot_run

    console = Console(stderr=True)
    run = _load(args.file)
    layers = parse_layers(run, args.layers) if args.layers is not None else None
    started = time.perf_counter()

    def progress(kind: str, i: int, n: int) -> None:
        console.print(f"[dim]{time.perf_counter() - started:5.1f}s[/] drawing {kind} ({i}/{n}) …")

    paths = plot_run(run, args.out, kinds=args.kind, layers=layers, shared=args.shared, progress=progress)
    for path in paths:
        print(path)
    console.print(f"[green]drew[/] {len(paths)} figure(s) in {time.perf_counter() - started:.1f}s")
    return 0


# -------------------------------------------------------------------------------------- diff
def _add_diff(sub) -> None:
    p = sub.add_parser("diff", help="per-site distribution shift between two runs")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw the shift to this PNG file")
    p.set_defaults(func=cmd_diff)


def cmd_diff(args) -> int:
    from ..present.report import diff, diff_warnings, print_diff

    a, b = _load(args.a), _load(args.b)
    rows = diff(a, b)  # raises when the runs share no site
    for line in diff_warnings(a, b):
        print(f"probe diff: warning: {line}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print_diff(rows, console=_stdout())
    if args.plot:
        from ..present.plot import plot_diff

        print(plot_diff(a, b, args.plot))
    return 0


# ------------------------------------------------------------------------------------- merge
def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="merge run files exactly (ranks, shards)")
    p.add_argument("files", nargs="+")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_merge)


def cmd_merge(args) -> int:
    from .. import merge

    _check_out(args.out, args.overwrite)
    run = merge(args.files, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}: {len(args.files)} files, {len(run.rows)} window(s)")
    return 0


# ------------------------------------------------------------------------------------- cache
def _add_cache(sub) -> None:
    p = sub.add_parser("cache", help="list or remove the bundled model's de-quantised copies",
                       description="The bundled GGUF is de-quantised to float32 once and cached (about 513 MiB) "
                                   "under $PROBE_CACHE (default ~/.cache/probe), keyed by the GGUF's content.")
    p.add_argument("action", nargs="?", choices=("list", "clear"), default="list")
    p.set_defaults(func=cmd_cache)


def cmd_cache(args) -> int:
    from ..models import cache_entries, cache_root, clear_cache

    if args.action == "clear":
        n, size = clear_cache()
        print(f"removed {n} cached model copy(ies), {size / 2**20:.0f} MiB, from {cache_root()}")
        return 0
    entries = cache_entries()
    for path, size in entries:
        print(f"{size / 2**20:8.0f} MiB  {path}")
    print(f"{len(entries)} cached copy(ies) under {cache_root()}; remove them with: probe cache clear")
    return 0


def _add_export(sub) -> None:
    from .export import add_export

    add_export(sub)


#: every subcommand, in ``probe -h`` order: each adds its parser (and its command via set_defaults)
COMMANDS = (_add_run, _add_show, _add_plot, _add_diff, _add_merge, _add_export, _add_cache)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(prog="probe", description="See inside transformers while they run.")
    parser.add_argument("--version", action="version", version=f"probe {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in COMMANDS:
        add(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    text = str(message)
    return (text if text.startswith("probe") else f"probe: {category.__name__}: {text}") + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    formatwarning = warnings.formatwarning
    if not args.debug:  # probe's warnings as one line each, not a source path and line
        warnings.formatwarning = _one_line_warning
    try:
        return args.func(args)
    except (ProbeError, OSError) as err:
        if args.debug:
            raise
        print(f"probe {args.command}: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"probe {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
