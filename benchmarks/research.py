#!/usr/bin/env python
"""Cost of the research statistics (top-k, per-token norms, layer-to-layer cosines) on CPU.

GPT-2 small (random init from its config: 12 layers, 768 channels, 13 hidden states) on a
4 x 256 batch, against a plain forward timed in the same process.

1. **Per statistic**: the update of every site on the materialised hidden states
   (``output_hidden_states``), timed alone, for ``topk``, ``norm``, the cosines inside ``cross``
   (``finish()`` with and without them, i.e. ``stats=(..., "cos")``) and, for scale, ``moments``.
2. **End to end**: ``with probe.capture(model, stats=...)`` around one forward, per configuration.

Every time is the minimum over ``--rounds`` repetitions (configurations interleaved): on a shared
machine other processes only ever add time, so the minimum is the best estimate of the cost.

    python benchmarks/research.py              # 5 rounds
    python benchmarks/research.py --rounds 3 --batch 2 --seq 128 --threads 2

Measured on the 2-core CI machine (shared, ``--threads 1 --rounds 5``), plain forward 3.34 s:
``topk`` 0.5 % and ``norm`` 0.4 % of a plain forward alone (+1.2 % each end to end), the
cosines 3.5 % (``cross`` alone is 2.4 %: they more than double it; +3.3 % end to end). Hence
``topk`` and ``norm`` run by default (+1.6 % together) and ``cos`` is opt-in.
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

import probe
from probe.stats import Cross, Moments, Norm, TopK, Tokens

BASE = ("moments", "position", "histogram", "sample", "cross")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end part")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.GPT2Model(transformers.GPT2Config()).eval()
    ids = torch.randint(0, 50257, (args.batch, args.seq))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True).hidden_states
    hs = [h.reshape(-1, h.shape[-1]).contiguous() for h in out]
    n = hs[0].shape[0]
    tok = Tokens(torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool),
                 torch.arange(args.seq).repeat(args.batch), torch.arange(args.batch).repeat_interleave(args.seq),
                 ids.reshape(-1), 1, 0)

    def plain() -> None:
        with torch.no_grad():
            model(input_ids=ids)

    def per_site(make):
        def run() -> None:
            for h in hs:
                t = Tokens(tok.valid, tok.keep, tok.position, tok.row, tok.token, 1, 0)  # fresh per-chunk memo
                make().update(h, t)
        return run

    def cross(cosines: bool):
        def run() -> None:
            c = Cross([str(i) for i in range(len(hs))], cosines=cosines)
            for i, h in enumerate(hs):
                c.hold(i, h, tok)
            c.finish()
        return run

    parts = {
        "plain forward": plain,
        "moments (for scale)": per_site(Moments),
        "topk": per_site(TopK),
        "norm": per_site(lambda: Norm(7, 4096)),
        "cross without cosines": cross(False),
        "cross with cosines": cross(True),
    }

    def capture(stats):
        def run() -> None:
            with torch.no_grad(), probe.capture(model, stats=stats, seed=0):
                model(input_ids=ids)
        return run

    if not args.no_e2e:
        parts.update({
            "capture: 5 classic stats": capture(BASE),
            "capture: + topk": capture(BASE + ("topk",)),
            "capture: + norm": capture(BASE + ("norm",)),
            "capture: + cos": capture(BASE + ("cos",)),
            "capture: default (+ topk, norm)": capture(None),
        })
    for fn in parts.values():  # warm-up
        fn()
    best = {k: float("inf") for k in parts}
    names = list(parts)
    for r in range(args.rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            parts[k]()
            best[k] = min(best[k], time.perf_counter() - t)
        print(f"round {r + 1}/{args.rounds}", flush=True)
    p = best["plain forward"]
    print(f"GPT-2 small, {args.batch}x{args.seq}, CPU, {torch.get_num_threads()} threads, min of {args.rounds} rounds")
    print(f"{'':40} {'seconds':>8} {'% of plain':>11}")
    for k in names:
        print(f"{k:40} {best[k]:8.3f} {100 * best[k] / p:10.1f}%")
    print(f"{'cosines alone (with - without)':40} {best['cross with cosines'] - best['cross without cosines']:8.3f} "
          f"{100 * (best['cross with cosines'] - best['cross without cosines']) / p:10.1f}%")


if __name__ == "__main__":
    main()
