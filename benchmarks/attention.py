#!/usr/bin/env python
"""Cost of the attention statistics (``sites="attention"``: per-head MaxLogit, entropy, sink mass)
on a recorded forward, against the plain forward of the same model, on CPU, in one process.

The model is GPT-2 small's layer shape (768 wide, 12 heads, head dim 64) with fewer layers
(``--layers``, default 4), random-init, SDPA attention, eval and no_grad, batch x sequence 4 x 256
by default, one padded row. Each round times ``--forwards`` forwards of each method (the
capture's setup is not timed), methods in alternating order (ABBA) so that load drift on a shared
machine cancels; times are the process's CPU time by default (``--clock wall`` for wall time), which
other processes on a shared machine move less; ``extra`` is the median over rounds of ``t(attention) / t(plain) - 1``, the cost
of a forward the schedule records; ``skipped_extra`` the same for a forward the schedule skips
(the wrapper's and the hooks' flag checks), and ``one_in_25`` their mix at one forward in 25.

    python benchmarks/attention.py
    python benchmarks/attention.py --layers 12 --batch 4 --seq 256 --rounds 7 --json attention.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import transformers

import probe


def _model(args):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=768, n_head=12, n_layer=args.layers, n_positions=max(1024, args.seq),
                                  vocab_size=50257, attn_implementation=args.attn)
    return transformers.GPT2LMHeadModel(cfg).eval()


METHODS = {"plain": None, "attention": {"sites": "attention"},
           # the forwards a schedule skips: the wrapper's and the hooks' flag checks only
           "skipped": {"sites": "attention", "schedule": lambda i: False}}


CLOCK = time.process_time  # CPU seconds of this process: less moved by other load than wall time


def _time(model, batch, method: str, forwards: int) -> float:
    spec = METHODS[method]
    perf = CLOCK
    with torch.no_grad():
        if spec is None:
            model(**batch)
            t = perf()
            for _ in range(forwards):
                model(**batch)
            return (perf() - t) / forwards
        with probe.capture(model, **spec):
            model(**batch)  # warm
            t = perf()
            for _ in range(forwards):
                model(**batch)
            return (perf() - t) / forwards


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--forwards", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="cpu: process CPU time (default; steadier on a shared machine); wall: perf_counter")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    model = _model(args)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 50257, (args.batch, args.seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, args.seq // 2:] = 0  # one padded row
    batch = {"input_ids": ids, "attention_mask": mask}
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    order = list(METHODS)
    for r in range(args.rounds):
        for m in order if r % 2 == 0 else order[::-1]:
            times[m].append(_time(model, batch, m, args.forwards))
    ratios = [a / b - 1 for a, b in zip(times["attention"], times["plain"])]
    skipped = [a / b - 1 for a, b in zip(times["skipped"], times["plain"])]
    extra, idle = statistics.median(ratios), statistics.median(skipped)
    out = {"shape": f"{args.batch}x{args.seq}", "layers": args.layers, "attn": args.attn, "clock": args.clock,
           "threads": args.threads,
           "plain_s": statistics.median(times["plain"]), "attention_s": statistics.median(times["attention"]),
           "extra": extra, "ratios": ratios, "skipped_extra": idle, "skipped_ratios": skipped,
           "one_in_25": (extra + 24 * idle) / 25, "torch": torch.__version__,
           "transformers": transformers.__version__}
    print(f"GPT-2 small layers x{args.layers}, {args.attn}, {out['shape']}: plain {out['plain_s'] * 1e3:.1f} ms, "
          f"with attention statistics {out['attention_s'] * 1e3:.1f} ms per recorded forward "
          f"(+{extra * 100:.1f} %), a skipped forward +{idle * 100:.2f} %, so a 1-in-25 schedule "
          f"+{out['one_in_25'] * 100:.2f} % (medians of {args.rounds} rounds, {args.clock} time, "
          f"{args.threads} threads)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
