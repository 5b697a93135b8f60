#!/usr/bin/env python
"""Cost of the mixture-of-experts statistics (router + per-expert inputs: the experts' and the down
projection's) against the hidden-state capture of the same MoE model, on CPU, in one process.

Each round opens one capture per method and times forwards inside it (the capture's own setup,
a discovery forward, is not timed), methods in alternating order (ABBA) so that load drift on a
shared machine cancels; ``extra`` is the median over rounds of ``t(hidden + moe) / t(hidden) - 1``.

    python benchmarks/moe.py                 # Qwen3-MoE from a config: 4 layers, 256 wide, 16 experts, top-4
    python benchmarks/moe.py --batch 8 --seq 256 --rounds 9 --json moe.json
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
    cfg = transformers.Qwen3MoeConfig(hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                      moe_intermediate_size=args.hidden, num_hidden_layers=args.layers,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden // 4,
                                      vocab_size=1000, num_experts=args.experts, num_experts_per_tok=args.top_k)
    return transformers.Qwen3MoeForCausalLM(cfg).eval()


METHODS = {
    "plain": None,
    "hidden": {"sites": "hidden_states"},
    "hidden+moe": {"sites": ["hidden_states", "moe"]},
    # the same without the down projection's input (followed inside the experts' forward)
    "hidden+moe-down": {"sites": ["hidden_states", "model.layers.*.mlp.gate:router",
                                  "model.layers.*.mlp.experts:experts"]},
    "moe": {"sites": "moe"},
}


def _time(model, batch, method: str, forwards: int) -> float:
    spec = METHODS[method]
    with torch.no_grad():
        if spec is None:
            model(**batch)
            t = time.perf_counter()
            for _ in range(forwards):
                model(**batch)
            return (time.perf_counter() - t) / forwards
        with probe.capture(model, **spec):
            model(**batch)  # warm the buffers
            t = time.perf_counter()
            for _ in range(forwards):
                model(**batch)
            return (time.perf_counter() - t) / forwards


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--forwards", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    model = _model(args)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (args.batch, args.seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, args.seq // 2:] = 0  # one padded row
    batch = {"input_ids": ids, "attention_mask": mask}
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    order = list(METHODS)
    for r in range(args.rounds):
        for m in (order if r % 2 == 0 else order[::-1]):
            times[m].append(_time(model, batch, m, args.forwards))
    med = {m: statistics.median(v) for m, v in times.items()}
    extra = statistics.median(b / a - 1 for a, b in zip(times["hidden"], times["hidden+moe"]))
    no_down = statistics.median(b / a - 1 for a, b in zip(times["hidden"], times["hidden+moe-down"]))
    moe_vs_plain = statistics.median(b / a - 1 for a, b in zip(times["plain"], times["moe"]))
    hidden_vs_plain = statistics.median(b / a - 1 for a, b in zip(times["plain"], times["hidden"]))
    out = {"shape": [args.batch, args.seq], "model": vars(args), "median_s": med,
           "moe_extra_over_hidden": extra, "moe_extra_without_down_proj": no_down, "moe_alone_over_plain": moe_vs_plain,
           "hidden_over_plain": hidden_vs_plain, "torch_threads": torch.get_num_threads()}
    for m, t in med.items():
        print(f"{m:>15}: {t * 1e3:8.1f} ms / forward")
    print(f"router + per-expert statistics: {100 * extra:+.1f} % over the hidden-state capture "
          f"(median of {args.rounds} interleaved rounds; {100 * no_down:+.1f} % without the down projection's "
          f"input); moe sites alone {100 * moe_vs_plain:+.1f} % over a plain "
          f"forward; hidden-state capture {100 * hidden_vs_plain:+.1f} % over a plain forward")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
