"""``bench.py --workload``: probe's cost where users meet it, settled to a stated precision.

Each workload is a pair of callables doing the same work, plain and with probe; both run in one
process, in interleaved pairs (ABBA order: plain first in odd pairs, probe first in even ones), so
load drifts on a shared machine hit both sides alike. Each pair gives one ratio ``probe / plain``.

The figure is the median of the pair ratios with a distribution-free 95 % confidence interval:
the order-statistic interval ``[r_(k), r_(n+1-k)]`` of the sorted ratios, ``k`` the largest
index with ``P(Binomial(n, 1/2) < k) <= 0.025`` (the median of any continuous distribution lies
below each ratio with probability 1/2; Hollander, Wolfe & Chicken, "Nonparametric Statistical
Methods", 3rd ed., 2014, section 3.6). It needs no assumption about the noise (no bootstrap, no
normality). Pairs are added until the interval is within ``--half-width`` (default 0.02) of the
median on both sides, or ``--max-pairs`` is reached: then the line says NOT SETTLED, and the
interval printed is the one reached.

Workloads (``--workload``, comma-separated; ``all`` runs every one):

- ``gpt2``: GPT-2 small (random init, 12 layers, 768 wide), 4 x 256 tokens, one forward per
  batch; probe's default statistics, 13 ``hidden_states`` sites; the probe batch is a whole
  capture (enter, the forward, exit with the results in memory).
- ``smollm2``: the bundled SmolLM2-135M (``probe.models.load_model()``), 4 x 256, as ``gpt2``
  (31 sites).
- ``generate``: the bundled model's ``generate``, batch 1, a 32-token prompt, 32 new tokens
  (greedy, no early stop): 1 prefill and 31 decode steps per batch, inside one capture with the
  default statistics.
- ``calibration``: the bundled model, ``sites="linear_inputs"`` (210 sites) with
  ``stats="calibration"`` (what ``probe run --sites linear_inputs`` uses), 4 x 256 per forward.
- ``entry``: seconds of ``probe.capture(model)`` plus entering and leaving it with no forward on
  the bundled model: the first capture of the process (the discovery forward runs) and later
  ones (sites remembered per module graph). Times, not ratios.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

WORKLOADS = ("gpt2", "smollm2", "generate", "calibration", "entry")


def median_interval(ratios: list[float], confidence: float = 0.95) -> tuple[float, float, float] | None:
    """``(median, lo, hi)``: the distribution-free order-statistic interval for the median of
    ``ratios`` (see the module docstring); ``None`` while too few values for any such interval
    (fewer than 6 at 95 %)."""
    n = len(ratios)
    r = sorted(ratios)
    alpha = (1 - confidence) / 2
    k, tail = 0, 0.0
    while True:  # tail = P(B <= k) for B ~ Binomial(n, 1/2)
        nxt = tail + math.comb(n, k) / 2**n
        if nxt > alpha:
            break
        tail, k = nxt, k + 1
    if k == 0:
        return None
    return statistics.median(r), r[k - 1], r[n - k]


def settle(plain: Callable[[], None], probe: Callable[[], None], *, half_width: float, min_pairs: int,
           max_pairs: int, budget_s: float, say: Callable[[str], None]) -> dict:
    """Interleaved pairs of ``plain()`` and ``probe()`` until the median ratio's 95 % interval is
    within ``half_width`` on both sides (or ``max_pairs`` / ``budget_s`` is reached)."""
    plain()
    probe()  # warm both (allocator, caches, the first capture's discovery)
    times_a: list[float] = []
    times_b: list[float] = []
    ratios: list[float] = []
    started = time.perf_counter()
    settled = False
    ci = None
    while len(ratios) < max_pairs and time.perf_counter() - started < budget_s:
        order = (plain, probe) if len(ratios) % 2 == 0 else (probe, plain)
        got = {}
        for fn in order:
            t = time.perf_counter()
            fn()
            got[fn] = time.perf_counter() - t
        times_a.append(got[plain])
        times_b.append(got[probe])
        ratios.append(got[probe] / got[plain])
        ci = median_interval(ratios)
        if ci is not None and len(ratios) >= min_pairs:
            med, lo, hi = ci
            if med - lo <= half_width and hi - med <= half_width:
                settled = True
                break
        if len(ratios) % 5 == 0:
            say(f"    {len(ratios)} pairs, median {statistics.median(ratios):.3f}"
                + (f" [{ci[1]:.3f}, {ci[2]:.3f}]" if ci else ""))
    med, lo, hi = ci if ci is not None else (statistics.median(ratios), float("nan"), float("nan"))
    return {"pairs": len(ratios), "plain_s": statistics.median(times_a), "probe_s": statistics.median(times_b),
            "ratio": med, "lo": lo, "hi": hi, "settled": settled, "ratios": ratios}


def _ids(torch, vocab: int, b: int, t: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=g)


def build(name: str, args) -> tuple[Callable[[], None], Callable[[], None], str]:
    """``(plain, probe, description)`` of one ratio workload."""
    import torch

    import probe as probe_pkg

    if name == "gpt2":
        from bench import build_hf

        model = build_hf("gpt2", 12, "cpu", torch.float32)
        sites, stats, what = "hidden_states", None, "GPT-2 small 4x256, default stats, 13 sites"
    else:
        model, _ = probe_pkg.models.load_model()
        if name == "calibration":
            sites, stats, what = "linear_inputs", "calibration", "SmolLM2-135M 4x256, linear_inputs (210 sites), stats='calibration'"
        elif name == "generate":
            sites, stats, what = "hidden_states", None, "SmolLM2-135M generate, batch 1, 32-token prompt + 32 new tokens, default stats"
        else:
            sites, stats, what = "hidden_states", None, "SmolLM2-135M 4x256, default stats, 31 sites"
    vocab = model.config.vocab_size
    if name == "generate":
        ids = _ids(torch, vocab, 1, 32)

        def work() -> None:
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                               do_sample=False, pad_token_id=0)
    else:
        ids = _ids(torch, vocab, 4, 256)

        def work() -> None:
            with torch.no_grad():
                model(input_ids=ids)

    def with_probe() -> None:
        with probe_pkg.capture(model, sites=sites, stats=stats):
            work()

    return work, with_probe, what


def entry(say: Callable[[str], None]) -> dict:
    """Seconds to create, enter and leave a capture with no forward on the bundled model."""
    import probe as probe_pkg

    model, _ = probe_pkg.models.load_model()

    def once() -> float:
        t = time.perf_counter()
        with probe_pkg.capture(model):
            pass
        return time.perf_counter() - t

    from probe.capture import session

    session._RESOLVED.clear()  # as in a fresh process: the first capture runs the discovery forward
    first = once()
    later = [once() for _ in range(5)]
    return {"first_s": first, "later_s": statistics.median(later)}


def workload_main(args) -> int:
    """Run ``args.workload`` (see the module docstring); prints one line per workload."""
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    names = list(WORKLOADS) if args.workload == "all" else [w.strip() for w in args.workload.split(",") if w.strip()]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        print(f"unknown workloads {unknown}; choose from {', '.join(WORKLOADS)} or all")
        return 2

    def say(line: str) -> None:
        print(line, flush=True)

    say(f"torch {torch.__version__}, {args.threads} threads; 95% order-statistic interval for the median "
        f"pair ratio, target +-{args.half_width}, {args.min_pairs}..{args.max_pairs} pairs")
    failed = 0
    for name in names:
        if name == "entry":
            got = entry(say)
            say(f"entry: first capture {got['first_s']:.3f} s (discovery forward), later {got['later_s']:.4f} s")
            continue
        plain, with_probe, what = build(name, args)
        say(f"{name}: {what}")
        got = settle(plain, with_probe, half_width=args.half_width, min_pairs=args.min_pairs,
                     max_pairs=args.max_pairs, budget_s=args.budget, say=say)
        verdict = "settled" if got["settled"] else (
            f"NOT SETTLED: the interval is wider than +-{args.half_width} after {got['pairs']} pairs")
        say(f"{name}: plain {got['plain_s']:.3f} s, probe {got['probe_s']:.3f} s, x plain {got['ratio']:.3f} "
            f"(95% CI {got['lo']:.3f}-{got['hi']:.3f}, {got['pairs']} pairs; {verdict})")
        failed += not got["settled"]
    return 1 if failed else 0
