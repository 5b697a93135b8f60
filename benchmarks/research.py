#!/usr/bin/env python
"""Cost of the research statistics (top-k, per-token norms, layer-to-layer cosines) on CPU.

GPT-2 small (random init from its config: 12 layers, 768 channels) on a 4 x 256 batch. Each round
times a plain forward and a forward inside ``probe.capture`` for every configuration, in an order
that rotates each round; a configuration's cost is the median over rounds of its time divided by
the same round's plain forward. The cost of one statistic is its configuration's ratio minus the
baseline's (the five classic statistics), in percent of a plain forward.

    python benchmarks/research.py              # 7 rounds
    python benchmarks/research.py --rounds 3 --batch 2 --seq 128 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

import probe
from probe.stats import Cross

BASE = ("moments", "position", "histogram", "sample", "cross")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.GPT2Model(transformers.GPT2Config()).eval()
    ids = torch.randint(0, 50257, (args.batch, args.seq))
    configs = {  # name: (stats, cosines)
        "base (5 classic stats, no cos)": (BASE, False),
        "+ topk": (BASE + ("topk",), False),
        "+ norm": (BASE + ("norm",), False),
        "+ cos (in cross)": (BASE, True),
        "all (default)": (None, True),
        "topk alone": (("topk",), False),
        "norm alone": (("norm",), False),
    }

    def plain() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids)
        return time.perf_counter() - t

    def probed(stats, cosines) -> float:
        Cross.cosines = cosines
        t = time.perf_counter()
        with torch.no_grad(), probe.capture(model, stats=stats, seed=0):
            model(input_ids=ids)
        return time.perf_counter() - t

    names = list(configs)
    plain(), probed(None, True)  # warm-up
    ratios: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            base = plain()
            ratios[n].append(probed(*configs[n]) / base)
        print(f"round {r + 1}/{args.rounds}: plain {base:.2f} s", flush=True)
    Cross.cosines = True
    med = {n: statistics.median(v) for n, v in ratios.items()}
    print(f"GPT-2 small, {args.batch}x{args.seq}, CPU, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print(f"{'configuration':34} {'x plain':>8} {'added (% of plain)':>20}")
    ref = med[names[0]]
    for n in names:
        added = "" if n == names[0] or "alone" in n else f"{100 * (med[n] - ref):+.1f}"
        if "alone" in n:
            added = f"{100 * (med[n] - 1):+.1f} over plain"
        print(f"{n:34} {med[n]:8.3f} {added:>20}")


if __name__ == "__main__":
    main()
