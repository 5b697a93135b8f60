"""``probe run [MODEL] --text/--file ... -o run.h5``: capture a model's statistics over text.

Every value is checked before the model loads; a run stopped by Ctrl-C or an error keeps what it
collected, marked partial.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from ..errors import ProbeError
from ..stats import NAMES as STATS, PRESETS
from ._common import check_out

if TYPE_CHECKING:
    from ..capture.options import StatName
    from ..capture.session import Capture

__all__ = ["add_parser", "command"]


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="capture statistics of a model over text",
                       description="Run MODEL over text and write its activation statistics to an HDF5 file.")
    p.add_argument("model", nargs="?", default="smollm2-135m",
                   help="'smollm2-135m' (bundled SmolLM2-135M-Instruct, default), a local folder or a cached HF id")
    p.add_argument("--text", action="append", default=[],
                   help="a document (repeatable; default: with no --text or --file, the bundled sample texts)")
    p.add_argument("--file", action="append", default=[],
                   help=".txt (one document per blank-line-separated paragraph), .jsonl ('text' field per line), "
                        ".json (array of strings or {'text': ...}) or - for stdin; suffixes in any case (repeatable; default: none, see --text)")
    p.add_argument("-o", "--out", default="run.h5", help="output file (default run.h5)")
    p.add_argument("--batch-size", type=int, default=8, help="documents per forward (default 8)")
    p.add_argument("--max-length", type=int, default=512,
                   help="truncate each document to this many tokens (default 512)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="stop after about this many real tokens (default: no limit)")
    p.add_argument("--skip-first", type=int, default=1,
                   help="drop the first k tokens of each document from all but per-position stats (default 1)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda or cuda:1 (default cpu)")
    p.add_argument("--sites", action="append", default=None,
                   help="'hidden_states' (default), module names or globs (repeatable)")
    p.add_argument("--stats", default=None, help="comma-separated subset of " + ",".join(STATS) + ", or 'calibration' (what the exports read: "
                   "moments) (default: all but cos; 'calibration' with --sites linear_inputs)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the uniform sample (default: probe.capture's default)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    p.set_defaults(func=command)


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
    if args.stats is None and args.sites == ["linear_inputs"]:  # a calibration run: what the exports read
        stats = PRESETS["calibration"]
    elif args.stats is not None and args.stats.strip() in PRESETS:
        stats = PRESETS[args.stats.strip()]
    elif args.stats is not None:
        stats = tuple(s.strip() for s in args.stats.split(",") if s.strip())
        bad = [s for s in stats if s not in STATS]
        if bad or not stats:
            raise ProbeError(f"--stats: expected a comma-separated subset of {','.join(STATS)}, got "
                             f"{args.stats!r}; pass e.g. --stats moments,histogram")
    for path in args.file:
        check_text_file(path)
    check_out(args.out, args.overwrite)
    check_model(args.model)
    _check_device(args.device)
    docs = read_texts(args.file, args.text) if (args.file or args.text) else sample_texts()
    if not docs:
        raise ProbeError("--text/--file: expected at least one non-empty document, got none; "
                         "pass --text 'some text' or a non-empty --file")
    return docs, stats


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


@dataclass
class _Progress:
    """How far ``probe run`` got, and why it ended early (``stopped``, as stored in the file)."""

    batches: int = 0
    documents: int = 0
    tokens: int = 0
    seconds: float = 0.0
    stopped: str | None = None
    failure: BaseException | None = None
    #: the failure in one line (``TypeError: ...``)
    what: str = ""


def command(args) -> int:
    docs, stats = _check_run(args)

    from rich.console import Console

    from ..models import load_model

    console = Console(stderr=True)
    with console.status(f"loading {args.model} …"):
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    run, got = _capture(args, model, tokenizer, docs, stats, console)
    if got.batches == 0:
        return _nothing_written(args, got, console)
    return _finish(args, run, tokenizer, len(docs), got, console)


def _capture(args, model, tokenizer, docs: list[str], stats: tuple[str, ...] | None,
             console) -> tuple[Capture, _Progress]:
    """The model over ``docs``, batch by batch, in one capture. Ctrl-C or an error ends the
    loop early; the capture still commits what the finished batches collected."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..capture.session import capture
    from ..models import batches

    options = {"seed": args.seed} if args.seed is not None else {}
    got = _Progress()
    started = time.perf_counter()
    with warnings.catch_warnings():
        # names checked against the registry in _check_run (a registered statistic is no Literal member)
        names = cast("tuple[StatName, ...] | None", stats)
        with capture(model, args.out, sites=args.sites or "hidden_states", stats=names,
                     skip_first=args.skip_first, overwrite=args.overwrite, **options) as run:
            try:
                with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console) as progress:
                    task = progress.add_task("documents", total=len(docs), rate="")
                    for batch in batches(tokenizer, docs, args.batch_size, args.max_length, args.max_tokens):
                        batch = {k: v.to(args.device) for k, v in batch.items()}
                        with torch.no_grad():
                            model(**batch)
                        got.batches += 1
                        got.tokens += int(batch["attention_mask"].sum())
                        got.documents += batch["input_ids"].shape[0]
                        rate = got.tokens / max(1e-9, time.perf_counter() - started)
                        progress.update(task, completed=got.documents, rate=f"{got.tokens} tokens · {rate:,.0f} tok/s")
            except KeyboardInterrupt:
                got.stopped = "interrupted (Ctrl-C)"
            except Exception as err:  # saved as partial, then reported
                got.what = f"{type(err).__name__}: {str(err).splitlines()[0]}" if str(err) else type(err).__name__
                got.stopped, got.failure = f"failed: {got.what}", err
            if got.stopped:
                # the forward in flight stopped half-way: its sites did not all fire, which is
                # expected here and said once after, not as a cross-layer warning
                warnings.filterwarnings("ignore", message=r".*did not fire in this forward.*")
    got.seconds = time.perf_counter() - started
    return run, got


def _nothing_written(args, got: _Progress, console) -> int:
    """No batch finished: remove the empty file and say why."""
    if os.path.exists(args.out):
        os.remove(args.out)
    if got.failure is not None:
        raise ProbeError(f"the first batch failed ({got.what}); no file written; "
                         "check the model and text (--debug shows the traceback)") from got.failure
    console.print(f"[yellow]{got.stopped or 'stopped'}[/] before any batch finished: nothing collected, "
                  f"no file written", soft_wrap=True)
    return 130


def _finish(args, run: Capture, tokenizer, texts: int, got: _Progress, console) -> int:
    """Add the absmax (and top-k) tokens' texts to the file, mark a run that ended early partial,
    and report."""
    from ..store import annotate

    result = run.result
    ids = {result[n].absmax_at["token"] for n in result.sites} - {-1}
    if "topk" in result.stats:
        ids |= {int(t) for n in result.sites for t in result[n].topk["token"]} - {-1}
    extra = {}
    if got.stopped:
        extra["partial"] = {"reason": got.stopped, "batches": got.batches, "documents": got.documents,
                            "tokens": got.tokens}
    annotate(args.out, token_text={str(i): tokenizer.decode([i]) for i in sorted(ids)}, texts=texts, **extra)
    if got.stopped:
        console.print(f"[yellow]{got.stopped}[/] after {got.batches} batch(es): {args.out} holds {got.documents} "
                      f"documents, {got.tokens} tokens and is marked partial (probe show says so)", soft_wrap=True)
        if got.failure is not None:
            raise ProbeError(f"{got.what}; what ran before is saved in {args.out}, marked partial; "
                             "--debug shows the traceback") from got.failure
        return 130
    elapsed, tokens = got.seconds, got.tokens
    if args.max_tokens is not None and tokens < args.max_tokens:  # every document ran before the limit
        console.print(f"[yellow]warning[/]: the texts ran out at {tokens} tokens ({got.documents} documents, each cut to "
                      f"--max-length {args.max_length}), below --max-tokens {args.max_tokens}; add text with --file "
                      "or --text", soft_wrap=True)
    console.print(f"[green]wrote[/] {args.out}: {len(result.sites)} sites, {got.documents} documents, {tokens} tokens "
                  f"in {elapsed:.1f}s ({tokens / max(elapsed, 1e-9):,.0f} tok/s)")
    return 0
