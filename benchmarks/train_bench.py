"""Cost of recording a training step: GPT-2 small (random init, float32, CPU) at batch x length,
AdamW, loss.backward(); plain steps against steps under ``probe.capture(schedule=..., grads=...)``.

Two arms.

**Per step** (the default), interleaved in one process (ABAB...), so that drifts of a shared
machine hit both sides alike: a plain step; a step the schedule skips (its hooks return at once);
a recorded step without gradients; a recorded step with ``grads=True``. The cost of a 1-in-N
schedule is computed as ``((N - 1) * skipped + recorded) / (N * plain)``.

**Measured schedule** (``--cycles C``): the 1-in-N cost measured, not computed. Two copies of the
model with their own optimizers: one trained plainly, one inside a single ``probe.capture`` that
stays open for the whole run, as a training monitor would (``schedule=lambda i: i % N == 0``,
``grads=True``, ``sites=["hidden_states", "attention"]``, every statistic, a window of each
recorded step committed and written to a temporary HDF5 file, ``every=N``). A cycle is N plain
steps and N probed steps (one recorded, N - 1 skipped), each block timed whole, the order
alternating from cycle to cycle (plain first in even cycles, probed first in odd ones) so that a
drift or an advantage of running second cancels. Reported: the median over cycles of
(probed block / plain block), its range and quartiles, and a distribution-free 95 % interval for
that median (order statistics of the binomial law, Conover 1999 §3.2); and, from the same
blocks, the recorded step alone against the median plain step.

    python benchmarks/train_bench.py --batch 4 --length 256 --reps 6
    python benchmarks/train_bench.py --batch 4 --length 256 --cycles 8      # the issue's target
    python benchmarks/train_bench.py --model tiny --batch 1 --length 32 --cycles 2 --every 5   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import tempfile
import time

import torch
import transformers

import probe


def build(name: str, length: int) -> transformers.GPT2LMHeadModel:
    """GPT-2 small's shape (12 x 768, 12 heads, 50257 tokens), or a tiny GPT-2 for smoke runs."""
    torch.manual_seed(0)
    if name == "tiny":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=max(length, 64))
    else:
        cfg = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=max(length, 1024))
    return transformers.GPT2LMHeadModel(cfg).train()


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free ``level`` interval for the median: ``(x_(k), x_(n-k+1))`` with the
    largest ``k`` such that ``P(Binomial(n, 1/2) < k) <= (1 - level) / 2``; ``None`` when ``n`` is
    too small for one (n < 6 at 95 %)."""
    xs, n = sorted(values), len(values)
    tail, k, below = (1 - level) / 2, 0, 0.0
    while k < n // 2:
        nxt = below + math.comb(n, k) / 2 ** n  # P(Binomial(n, 1/2) <= k)
        if nxt > tail:
            break
        below, k = nxt, k + 1
    return (xs[k - 1], xs[n - k]) if k else None


def per_step(model, ids, args) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

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
        print(f"1-in-{n} schedule, {k}: {ratio:.3f}x a plain step (computed); "
              f"a recorded step alone {med[k] / med['plain']:.2f}x")


def measured_schedule(model, ids, args) -> None:
    n = args.every
    plain, probed = model, copy.deepcopy(model)  # the plain steps never run on a hooked model
    optimizers = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-5) for m in (plain, probed)}

    def block(m) -> list[float]:
        """``n`` training steps of ``m``; each step's wall seconds."""
        opt, out = optimizers[id(m)], []
        for _ in range(n):
            t = time.perf_counter()
            m(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            out.append(time.perf_counter() - t)
        return out

    sites = [s for s in args.sites.split(",") if s]
    folder = tempfile.mkdtemp(prefix="train_bench_")
    out = os.path.join(folder, "train.h5")
    ratios, cpu_ratios, steps = [], [], {"plain": [], "recorded": [], "skipped": []}
    with probe.capture(probed, out, sites=sites, grads=True, schedule=lambda i: i % n == 0, every=n, seed=0) as c:
        block(plain)  # warm-up: thread pools, the optimizers' state, probe's first allocation
        block(probed)
        for cycle in range(args.cycles):
            timed = {}
            for name in (("plain", "probed") if cycle % 2 == 0 else ("probed", "plain")):
                cpu = time.process_time()
                timed[name] = (block(plain if name == "plain" else probed), time.process_time() - cpu)
            (p, p_cpu), (q, q_cpu) = timed["plain"], timed["probed"]
            ratios.append(sum(q) / sum(p))
            cpu_ratios.append(q_cpu / p_cpu)
            steps["plain"] += p
            steps["recorded"].append(q[0])  # the forward index of a block's first step is a multiple of n
            steps["skipped"] += q[1:]
            print(f"cycle {cycle}: plain {sum(p):7.2f} s  probed {sum(q):7.2f} s  ratio {ratios[-1]:.4f}  "
                  f"(CPU {cpu_ratios[-1]:.4f}; recorded step {q[0] * 1000:.0f} ms)", flush=True)
    recorded = [s for s in c.steps]
    os.remove(out)
    os.rmdir(folder)
    print(f"\n{len(recorded)} windows recorded (steps {recorded[:3]}{' ...' if len(recorded) > 3 else ''}), "
          f"sites {sites}, grads=True; load average {os.getloadavg()[0]:.1f}")
    q1, med, q3 = (statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3)
    interval = median_interval(ratios)
    print(f"1-in-{n} schedule, measured: {statistics.median(ratios):.4f}x a plain step "
          f"(median of {len(ratios)} cycle ratios; range {min(ratios):.4f}-{max(ratios):.4f}, "
          f"quartiles {q1:.4f}-{q3:.4f}; "
          + (f"95 % interval for the median {interval[0]:.4f}-{interval[1]:.4f})" if interval else
             "too few cycles for a 95 % interval: use --cycles 6 or more)"))
    print(f"  process CPU time: median ratio {statistics.median(cpu_ratios):.4f} "
          "(probe's writer process not included)")
    plain_step = statistics.median(steps["plain"])
    print(f"  a recorded step {statistics.median(steps['recorded']) / plain_step:.2f}x the median plain step; "
          f"a skipped one {statistics.median(steps['skipped']) / plain_step:.3f}x "
          f"(plain step median {plain_step * 1000:.1f} ms)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--reps", type=int, default=6, help="per-step arm: rounds of the four kinds of step")
    ap.add_argument("--every", type=int, default=25, help="the schedule's period N")
    ap.add_argument("--cycles", type=int, default=0,
                    help="run the measured schedule instead: this many cycles of N plain and N probed steps")
    ap.add_argument("--sites", default="hidden_states,attention", help="measured schedule: capture(sites=...)")
    ap.add_argument("--model", choices=("gpt2", "tiny"), default="gpt2",
                    help="GPT-2 small's shape, or a 2-layer 64-wide GPT-2 for smoke runs")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.every < 2:
        ap.error(f"--every must be 2 or more (one recorded step in N); got {args.every}")
    if args.cycles < 0:
        ap.error(f"--cycles must be 0 (the per-step arm) or more; got {args.cycles}")
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    model = build(args.model, args.length)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.length))
    print(f"{args.model} {args.batch}x{args.length}, {args.threads} threads, torch {torch.__version__}")
    (measured_schedule if args.cycles else per_step)(model, ids, args)


if __name__ == "__main__":
    main()
