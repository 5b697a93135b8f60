"""Cost of recording a training step: GPT-2 small (random init, float32, CPU) at batch x length,
AdamW, loss.backward(); plain steps against steps under ``probe.capture(schedule=..., grads=...)``.

Measured per step, interleaved in one process (ABAB...), so that drifts of a shared machine hit
both sides alike: a plain step; a step the schedule skips (its hooks return at once); a recorded
step without gradients; a recorded step with ``grads=True``. The cost of a 1-in-N schedule is
``((N - 1) * skipped + recorded) / (N * plain)``.

    python benchmarks/train_bench.py --batch 4 --length 256 --reps 6
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

import probe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--every", type=int, default=25, help="the schedule's period N")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, 50257, (args.batch, args.length))

    def step() -> float:
        t = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    def under(record: bool, grads: bool) -> float:
        with probe.capture(model, schedule=lambda i: record, grads=grads, seed=0):
            return step()

    step()  # warm-up
    under(True, True)
    times: dict[str, list[float]] = {"plain": [], "skipped": [], "recorded": [], "recorded+grads": []}
    for _ in range(args.reps):
        times["plain"].append(step())
        times["skipped"].append(under(False, True))
        times["recorded"].append(under(True, False))
        times["recorded+grads"].append(under(True, True))
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:15s} median {v * 1000:8.1f} ms  ({', '.join(f'{x * 1000:.0f}' for x in times[k])})")
    n = args.every
    for k in ("recorded", "recorded+grads"):
        ratio = ((n - 1) * med["skipped"] + med[k]) / (n * med["plain"])
        print(f"1-in-{n} schedule, {k}: {ratio:.3f}x a plain step; a recorded step alone {med[k] / med['plain']:.2f}x")


if __name__ == "__main__":
    main()
