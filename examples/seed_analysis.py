"""The seed analysis, end to end, on any causal LM: capture the residual stream, then draw it.

What it does:

1. loads the model with :func:`probe.models.load_model` (default: the bundled SmolLM2-135M-Instruct,
   a Q4_1 GGUF de-quantised to float32; any local folder or cached Hugging Face id works, nothing
   is downloaded);
2. runs it over the sample corpus (or ``--text`` / ``--file``) with ``skip_first=1``: the first
   token of every document is dropped from every statistic except the per-position ones, because
   its activations are orders of magnitude larger (the attention sink) and would hide the rest;
3. writes ``OUT/run.h5`` and the seed figures via :func:`probe.present.plot.plot_run`:

   - histograms of every layer (``hist_grid.png``) and of six chosen ones (``hist_overlay.png``),
     on asinh axes that reach each layer's exact min and max, log-y;
   - width by depth: quantile bands, std and excess kurtosis per layer (``depth.png``);
   - layer × layer covariance and R² (``cross_cov.png``, ``cross_r2.png``);
   - a uniform sample of values against token position (``scatter_position.png``);
   - the same sample against channel (``scatter_channel.png``): outlier channels are the columns.

Run::

    python examples/seed_analysis.py                       # bundled model, sample corpus
    python examples/seed_analysis.py ./my-model --file corpus.txt -o figures --dtype bfloat16
    python examples/seed_analysis.py --layers 0,6,12,18,24,30     # the overlay's and scatter's layers
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import probe
from probe.models import BUNDLED, batches, load_model, read_texts, sample_texts
from probe.present.plot import plot_run

FIGURES = ["histograms", "depth", "cross", "scatter"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=BUNDLED,
                        help=f"{BUNDLED!r} (bundled, default), a local folder or a cached HF id")
    parser.add_argument("--text", action="append", default=[], help="a document (repeatable)")
    parser.add_argument("--file", action="append", default=[],
                        help=".txt (one document per paragraph), .jsonl ('text' field) or - for stdin")
    parser.add_argument("-o", "--out", default="seed_analysis", help="output folder (default seed_analysis/)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512, help="truncate each document to this many tokens")
    parser.add_argument("--max-tokens", type=int, default=None, help="stop after about this many real tokens")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", default=None, help="layers of the overlay and scatter figures: e.g. 0,5,10-12 or all")
    args = parser.parse_args(argv)

    try:
        docs = read_texts(args.file, args.text) if (args.file or args.text) else sample_texts()
        if not docs:
            raise probe.ProbeError("no text to run on; expected --text, --file or stdin with a non-empty "
                                   "document; pass --text 'some text'")
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
        os.makedirs(args.out, exist_ok=True)
        h5 = os.path.join(args.out, "run.h5")
        started, tokens = time.perf_counter(), 0
        with probe.capture(model, out=h5, skip_first=1, overwrite=True) as run:
            for batch in batches(tokenizer, docs, args.batch_size, args.max_length, args.max_tokens):
                batch = {k: v.to(args.device) for k, v in batch.items()}
                with torch.no_grad():
                    model(**batch)
                tokens += int(batch["attention_mask"].sum())
        print(f"captured {len(run.sites)} sites over {tokens} tokens in {time.perf_counter() - started:.1f}s "
              f"-> {h5}", file=sys.stderr)
        for path in plot_run(probe.load(h5), args.out, kinds=FIGURES, layers=args.layers):
            print(path)
    except probe.ProbeError as err:
        print(f"seed_analysis: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
