"""Clip / flush-to-zero / |x| >= 6 counts from the float-bit histogram (probe.present.quant), against direct
counts on the values: bounds always hold, and are exact where docs/calibration.md says so."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import probe
from probe.errors import ProbeError
from probe.models import batches, sample_texts
from probe.present.quant import FORMATS, count_at_least, fractions, report


def buckets(x: np.ndarray, m: int = 7) -> np.ndarray:
    """Float-bit histogram of float32 ``x`` as docs/format.md defines it (numpy, independent)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.int64)
    return np.bincount(bits >> (23 - m), minlength=2 ** (9 + m))


def data(seed: int, n: int = 50_000, bf16: bool = False) -> np.ndarray:
    g = np.random.default_rng(seed)
    x = (g.standard_t(3, n) * g.choice([0.01, 1.0, 3.0], n)).astype(np.float32)
    x[:50] = 0.0
    x[50:60] = 7.5
    if bf16:
        x = torch.from_numpy(x).bfloat16().float().numpy()
    return x


def direct(x: np.ndarray, clip: float, flush: float) -> dict[str, int]:
    a = np.abs(x.astype(np.float64))
    return {"clip": int((a > clip).sum()), "flush": int(((a > 0) & (a <= flush)).sum()),
            "large": int((a >= 6).sum())}


@pytest.mark.parametrize("seed", range(6))
def test_bounds_hold_and_are_one_bucket_wide(seed):
    x = data(seed)
    counts = buckets(x)
    g = np.random.default_rng(100 + seed)
    widths = []
    for _ in range(20):
        clip, flush = g.uniform(0.5, 8.0), g.uniform(1e-4, 0.3)
        f = fractions(counts, False, clip_above=clip, flush_at_or_below=flush)
        ref = direct(x, clip, flush)
        assert f["total"] == x.size
        for key in ("clip", "flush", "large"):
            assert f[key].low <= ref[key] <= f[key].high, (key, clip, flush)
        assert f["large"].exact  # 6 is a bucket edge
        # the bound is exactly the count of the one bucket holding U, the smallest float32 > clip
        u = np.float32(clip)
        u = u if float(u) > clip else np.nextafter(u, np.float32(np.inf))
        bits = int(np.array([u], dtype=np.float32).view(np.uint32)[0]) >> 16 << 16  # m = 7: 16 low bits
        lo, hi = np.array([bits, bits + (1 << 16)], dtype=np.uint32).view(np.float32)
        a = np.abs(x)
        inside = int(((a >= lo) & (a < hi)).sum()) if lo < u else 0
        assert f["clip"].high - f["clip"].low == inside
        widths.append(inside)
    assert max(widths) > 0  # the inexact case occurs, so the bound is really tested


def test_exact_when_the_threshold_boundary_is_a_bucket_edge():
    x = data(7)
    counts = buckets(x)
    for edge in (np.float32(2.0), np.float32(3.0), np.float32(0.0625), np.float32(1.0078125 * 4)):
        below = float(np.nextafter(edge, np.float32(0)))  # the float32 just below the edge
        f = fractions(counts, False, clip_above=below, flush_at_or_below=below / 64)
        ref = direct(x, below, below / 64)
        assert f["clip"].exact and f["clip"].low == ref["clip"]
        # at least-`edge` counts are exact too
        b = count_at_least(counts, False, edge)
        assert b.exact and b.low == int((np.abs(x) >= edge).sum())


def test_lossless_data_is_exact_at_any_threshold_including_ties():
    x = data(3, bf16=True)
    counts = buckets(x)
    g = np.random.default_rng(0)
    thresholds = list(g.uniform(0.01, 8.0, 30)) + [float(np.abs(x[100])), float(np.abs(x[200]))]  # ties
    for t in thresholds:
        f = fractions(counts, True, clip_above=t, flush_at_or_below=t / 16)
        ref = direct(x, t, t / 16)
        assert (f["clip"].low, f["clip"].high) == (ref["clip"], ref["clip"]), t
        assert (f["flush"].low, f["flush"].high) == (ref["flush"], ref["flush"]), t
        assert f["large"].low == ref["large"] == 10 + int((np.abs(x[60:]) >= 6).sum())


def test_clip_at_the_amax_scale_is_exactly_zero():
    x = data(1)
    amax = float(np.abs(x).max())
    for q in FORMATS.values():
        f = fractions(buckets(x), False, clip_above=q.qmax * (amax / q.qmax), flush_at_or_below=0.0, absmax=amax)
        assert f["clip"].exact and f["clip"].low == 0


def test_bad_histogram_is_refused():
    with pytest.raises(ProbeError, match="2\\*\\*\\(9\\+m\\) entries"):
        fractions(np.zeros(1000, dtype=np.int64), False, clip_above=1.0, flush_at_or_below=0.1)


# --------------------------------------------------------------- end to end on the bundled model
@pytest.fixture(scope="module")
def bf16_run(smollm):
    model, tok = smollm
    model = model.to(torch.bfloat16)
    try:
        batch = next(batches(tok, sample_texts()[:4], batch_size=4, max_length=48))
        mask = batch["attention_mask"].bool()
        assert not mask.all()  # padded
        ref: dict[str, list] = {}
        handles = [m.register_forward_pre_hook(
            lambda mod, args, name=n: ref.setdefault(name, []).append(args[0][mask].float().numpy()))
            for n, m in model.named_modules()
            if n in ("model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj")]
        try:
            with torch.no_grad():
                model(**batch)
        finally:
            for h in handles:
                h.remove()
        with probe.capture(model, sites=["model.layers.1.self_attn.q_proj:input", "model.layers.1.mlp.down_proj:input"],
                           stats=("moments", "histogram", "position"), strict=True) as run:
            with torch.no_grad():
                model(**batch)
    finally:
        model.to(torch.float32)
    return run.result, {k + ":input": np.concatenate(v) for k, v in ref.items()}


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_report_equals_direct_count_on_real_bf16_activations(bf16_run, fmt):
    run, ref = bf16_run
    q = FORMATS[fmt]
    for name, x in ref.items():
        amax = float(np.abs(x).max())
        for scale in (None, amax / q.qmax / 8, 0.37 * amax / q.qmax):
            row = report(run, fmt, scale=scale, sites=[name])[0]
            s = amax / q.qmax if scale is None else scale
            want = direct(x, q.qmax * s, q.flush * s)
            n = x.size
            assert row["count"] == n and row["amax"] == amax
            assert row["clip_exact"] and row["flush_exact"] and row["large_exact"]  # bf16: lossless
            assert row["clip"] == [want["clip"] / n] * 2
            assert row["flush"] == [want["flush"] / n] * 2
            assert row["large"] == [want["large"] / n] * 2
            if scale is not None and scale < amax / q.qmax:
                assert want["clip"] > 0  # the test can fail: something clips


def test_first_token_holding_the_max_is_reported(bf16_run):
    run, ref = bf16_run
    rows = {r["site"]: r for r in report(run, "fp8")}
    for name in ref:
        at = run[name].absmax_at
        ft = rows[name]["first_token"]
        assert (ft is not None) == (at["position"] == 0)
        if ft is not None:
            p = run[name].position.absmax
            assert ft["channel"] == at["channel"] and ft["ratio"] == pytest.approx(p[0] / np.nanmax(p[1:]))


def test_report_refuses_unknown_format_and_bad_scale(bf16_run):
    run, _ = bf16_run
    with pytest.raises(ProbeError, match="quantization format must be one of"):
        report(run, "fp4")
    with pytest.raises(ProbeError, match="must be a finite number > 0"):
        report(run, "int8", scale=-1.0)
