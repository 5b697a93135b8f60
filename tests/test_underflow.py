"""Tiny activations: subnormal float32 values, values near 1e-35 and huge values mixed with tiny ones,
against float64 numpy on the materialised tensors.

Float32 squares of |x| < ~1e-19 and fourth powers of |x| < ~1e-10 leave float32's normal range
(2**-126): summed in float32 they lose every bit (std 4x off, kurtosis 55 against 948 before the
fix). The CPU paths recompute such a chunk in float64, as they do when the powers overflow; the
masked path that stands in for an accelerator's eager path (``DENSE_CPU`` off) scales each
channel's deviations by a power of two instead (exact), and the compiled graphs form them in
float64. Tolerances are those of normal-range data (docs/statistics.md, "Moments"), loosened
tenfold for the sums of powers over a few thousand values: the failures they guard against are
off by factors, not by digits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probe.results.run import Run, combine_channels
from probe.stats import Cross, Histogram, Moments, Norm, Position, Tokens
from probe.stats import _base
from probe.stats._buckets import quantile
from probe.stats._state import WindowState

N, D = 192, 12
#: the relative quantile bound of normal floats, 2**-m / (2 + 2**-m)
GUARANTEE = lambda m: 2.0**-m / (2 + 2.0**-m)  # noqa: E731


def data(kind: str, seed: int = 0) -> torch.Tensor:
    """``x[N, D]`` float32: heavy-tailed (Student-t 3, so the kurtosis is large) and scaled."""
    rng = np.random.default_rng(seed)
    t = rng.standard_t(3, size=(N, D))
    if kind == "subnormal":  # |x| around 1e-41: every value below float32's smallest normal, 1.2e-38
        x = t * 1e-41
    elif kind == "tiny":  # around 1e-35: normal floats whose squares and fourth powers underflow
        x = t * 1e-35 + 3e-35
    elif kind == "mixed":  # channels of very different scales, a huge value and subnormals among them
        x = t * np.logspace(-38, 6, D)
        x[7, 0] = 1e-44
        x[9, D - 1] = 3e15
    elif kind == "subnormal_channel":  # one channel of subnormals beside ordinary ones
        x = t.copy()
        x[:, 2] *= 1e-42
    else:
        raise KeyError(kind)
    return torch.from_numpy(x.astype(np.float32))


KINDS = ["subnormal", "tiny", "mixed", "subnormal_channel"]


def tokens(n: int, keep=None, valid=None, forward: int = 1) -> Tokens:
    valid = torch.ones(n, dtype=torch.bool) if valid is None else valid
    keep = valid.clone() if keep is None else keep & valid
    position = torch.arange(n) % 32
    return Tokens(valid, keep, position, torch.arange(n) // 32, torch.arange(n) % 7, forward, 3, head_bound=-1)


#: the paths a CPU chunk takes: the dense fast path, the dense path over gathered kept tokens
#: (skip_first), the masked path (a kept NaN), and the masked path with no host read at all
#: (DENSE_CPU off: what an accelerator's eager path runs)
PATHS = ["dense", "dense_head", "masked_nan", "no_host_reads"]


def setup(path: str, x: torch.Tensor, monkeypatch):
    """``(x, keep, valid)`` for ``path``, with ``DENSE_CPU`` set for it."""
    monkeypatch.setattr(_base, "DENSE_CPU", path != "no_host_reads")
    x = x.clone()
    n = x.shape[0]
    keep = torch.ones(n, dtype=torch.bool)
    valid = torch.ones(n, dtype=torch.bool)
    if path == "dense_head":
        keep[::32] = False
    if path == "masked_nan":
        x[10, 4] = float("nan")
    return x, keep, valid


def fed(make, x: torch.Tensor, tk: Tokens, chunks: int = 2) -> dict[str, np.ndarray]:
    """A statistic fed ``x`` in ``chunks`` through the two-phase CPU path (partial, fold)."""
    stat = make()
    n = x.shape[0]
    step = -(-n // chunks)
    for a in range(0, n, step):
        part = type(stat).partial(stat, x[a:a + step].unsqueeze(0), tk.slice(a, a + step))
        type(stat).fold([stat], [part])
    return {k: v.numpy() for k, v in stat.state_dict().items()}


def reference(v: np.ndarray) -> dict[str, float]:
    """Biased moments of the float64 values ``v`` (scipy's defaults), as probe defines them."""
    c = v - v.mean()
    var = (c**2).mean()
    return {"mean": v.mean(), "var": var, "skew": (c**3).mean() / var**1.5, "kurt": (c**4).mean() / var**2 - 3}


def ours(n, mean, m2, m3, m4) -> dict[str, float]:
    return {"mean": mean, "var": m2 / n, "skew": np.sqrt(n) * m3 / m2**1.5, "kurt": n * m4 / m2**2 - 3}


def assert_moments(got: dict, ref: dict, what: str) -> None:
    # mean: a float64 sum of float32 values; var: float32 squares (2**-24 each), summed blocked;
    # skewness and kurtosis: absolute, scaled by the kurtosis itself (heavy tails: up to ~100)
    np.testing.assert_allclose(got["mean"], ref["mean"], rtol=1e-12, atol=0, err_msg=f"{what} mean")
    np.testing.assert_allclose(got["var"], ref["var"], rtol=1e-6, err_msg=f"{what} var")
    scale = max(1.0, abs(ref["kurt"]))
    assert abs(got["skew"] - ref["skew"]) <= 1e-5 * scale, (what, got["skew"], ref["skew"])
    assert abs(got["kurt"] - ref["kurt"]) <= 1e-5 * scale, (what, got["kurt"], ref["kurt"])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", KINDS)
def test_moments_site_and_channels(kind, path, monkeypatch):
    x, keep, valid = setup(path, data(kind), monkeypatch)
    st = fed(Moments, x, tokens(len(x), keep, valid))
    v = x[keep].double().numpy()
    finite = np.isfinite(v)
    n, mean, m2, m3, m4 = combine_channels(*(st[f] for f in ("n", "mean", "m2", "m3", "m4")))
    assert n == finite.sum()
    assert_moments(ours(n, mean, m2, m3, m4), reference(v[finite]), f"{kind}/{path} site")
    for c in range(D):
        col = v[:, c][finite[:, c]]
        if col.std() == 0:
            continue
        got = ours(*(st[f][c] for f in ("n", "mean", "m2", "m3", "m4")))
        assert_moments(got, reference(col), f"{kind}/{path} channel {c}")
        assert st["min"][c] == np.float32(col.min()) and st["max"][c] == np.float32(col.max())


def test_tiny_moments_were_wrong_in_float32(monkeypatch):
    """The failure these tests guard against is real: the same chunk's float32 powers, unscaled,
    are far off (so the tolerances above can fail)."""
    x = data("tiny")
    d = x - x.mean(0)
    var32 = (d * d).sum(0).double() / len(x)
    var64 = ((x.double() - x.double().mean(0)) ** 2).mean(0)
    assert torch.all(var32 == 0) or torch.max(torch.abs(var32 / var64 - 1)) > 0.1


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", KINDS)
def test_position_spread(kind, path, monkeypatch):
    x, keep, valid = setup(path, data(kind), monkeypatch)
    st = fed(lambda: Position(40), x, tokens(len(x), keep, valid))
    rows = x.double().numpy()
    pos = (torch.arange(len(x)) % 32).numpy()
    for q in range(32):
        vals = rows[pos == q]
        vals = vals[np.isfinite(vals)]
        assert st["n"][q] == vals.size
        # float32 squares summed over a token's channels: a relative error ~D * 2**-24
        np.testing.assert_allclose(st["m2"][q] / st["n"][q], vals.var(), rtol=1e-6, err_msg=f"{kind}/{path} {q}")
        np.testing.assert_allclose(st["mean"][q], vals.mean(), rtol=1e-12, err_msg=f"{kind}/{path} {q}")


def test_position_all_zero_tokens_stay_zero(monkeypatch):
    x, keep, valid = setup("dense", torch.zeros(64, D), monkeypatch)
    st = fed(lambda: Position(40), x, tokens(64, keep, valid))
    assert np.all(st["m2"] == 0) and np.all(st["mean"] == 0) and st["n"][:32].sum() == 64 * D


# the norms: float64 reference norms of the float32 tokens
@pytest.mark.parametrize("path", ["dense", "dense_head", "masked_nan"])
@pytest.mark.parametrize("kind", KINDS)
def test_norms(kind, path, monkeypatch):
    """On CPU a token whose float32 norm underflows (or overflows) is recomputed in float64; the
    norms' moments and unit-vector sum follow (an accelerator keeps float32 norms, see
    docs/statistics.md)."""
    x, keep, valid = setup(path, data(kind), monkeypatch)
    st = fed(lambda: Norm(max_positions=40), x, tokens(len(x), keep, valid))
    rows = x.double().numpy()
    norms = np.linalg.norm(rows, axis=1)
    good = np.isfinite(norms)
    kept = keep.numpy() & good
    ref = norms[kept]
    assert int(st["n"]) == kept.sum() and int(st["nonfinite"]) == (keep.numpy() & ~good).sum()
    np.testing.assert_allclose(st["mean"], ref.mean(), rtol=1e-6, err_msg=f"{kind}/{path}")
    np.testing.assert_allclose(st["m2"] / st["n"], ref.var(), rtol=1e-5, err_msg=f"{kind}/{path}")
    # min and max are float32: the float64 norm rounded once (a subnormal float32 has fewer bits)
    np.testing.assert_allclose(st["min"], ref.min(), rtol=1e-6, atol=2.0**-149)
    np.testing.assert_allclose(st["max"], ref.max(), rtol=1e-6, atol=2.0**-149)
    unit = (rows[kept] / ref[:, None]).sum(0)
    np.testing.assert_allclose(st["unit_sum"], unit, rtol=1e-5, atol=1e-6 * np.abs(unit).max())
    assert int(st["unit_n"]) == kept.sum()
    assert st["counts"].sum() == kept.sum()


@pytest.mark.parametrize("kind", ["subnormal", "tiny", "mixed"])
def test_cross_r2_and_cosines(kind, monkeypatch):
    """The cross-layer statistic stacks the sites in float64: nothing there underflows."""
    base = data(kind, seed=1)
    xs = [base, base * 0.5 + data(kind, seed=2), base * 3]
    st = Cross(["a", "b", "c"])
    keep = torch.from_numpy(np.arange(N) % 32 != 0)
    tk = tokens(N, keep)
    for i, x in enumerate(xs):
        st.hold(i, x, tk)
    st.finish()
    view = Run({"sites": [], "cross_sites": ["a", "b", "c"]},
               [WindowState(0, {}, {k: v.numpy() for k, v in st.state_dict().items()})]).cross
    flat = np.stack([x[keep].double().numpy().ravel() for x in xs])
    np.testing.assert_allclose(view.cov, np.cov(flat, bias=True), rtol=1e-9)
    assert np.max(np.abs(view.r2 - np.corrcoef(flat) ** 2)) <= 1e-9
    a, b = xs[0][keep].double().numpy(), xs[1][keep].double().numpy()
    cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    np.testing.assert_allclose(view.cos[0, 1], cos.mean(), rtol=1e-9)


def test_compiled_step_is_wide(monkeypatch):
    """The graph accelerators compile forms the powers in float64: run eagerly here, it gives the
    float64 answer for tiny data too."""
    from probe.stats import moments, position

    x = data("tiny")
    tk = tokens(N)
    st = Moments()
    st._init_like(x.unsqueeze(0))
    s = tuple(st.s[f].unsqueeze(0) for f in Moments._fields)
    out = moments._step(s, x.unsqueeze(0), None, None, None, None, tk.keep, tk.row, tk.position, tk.token, True)
    n, mean, m2, m3, m4 = (o[0].numpy() for o in out[:5])
    assert_moments(ours(*combine_channels(n, mean, m2, m3, m4)), reference(x.double().numpy().ravel()), "compiled")
    ps = Position(40)
    ps._init_like(x.unsqueeze(0))
    s = tuple(ps.s[f].unsqueeze(0) for f in Position._fields)
    out = position._step(s, x.unsqueeze(0), None, None, None, tk.valid, tk.position, True)
    rows, pos = x.double().numpy(), (torch.arange(N) % 32).numpy()
    np.testing.assert_allclose(out[3][0, :32].numpy() / out[1][0, :32].numpy(),
                               [rows[pos == q].var() for q in range(32)], rtol=1e-12)


# ----------------------------------------------------------------------------- quantiles
def bound(values: np.ndarray, qs, m: int) -> np.ndarray:
    """The documented bound at each ``q``: ``2**-m/(2+2**-m)`` of the interpolated order statistics'
    magnitudes, plus the width of a subnormal bucket, ``2**-(126+m)``."""
    v = np.sort(values)
    virtual = (len(v) - 1) * np.asarray(qs)
    lo = np.floor(virtual).astype(int)
    hi = np.minimum(lo + 1, len(v) - 1)
    g = virtual - lo
    mag = (1 - g) * np.abs(v[lo]) + g * np.abs(v[hi])
    return GUARANTEE(m) * mag + 2.0 ** -(126 + m)


QS = [0.0, 0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999, 1.0]


@pytest.mark.parametrize("m", [4, 7, 10])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", ["dense", "no_host_reads"])
def test_quantiles_within_the_documented_bound(kind, m, path, monkeypatch):
    x, keep, valid = setup(path, data(kind), monkeypatch)
    st = fed(lambda: Histogram(m), x, tokens(len(x), keep, valid))
    v = x.double().numpy().ravel()
    got = quantile(st["counts"], bool(st["lossless"]), QS)
    ref = np.quantile(v, QS)
    err = np.abs(got - ref)
    assert np.all(err <= bound(v, QS, m)), (err, bound(v, QS, m))
    if np.all(np.abs(v[v != 0]) >= 2.0**-126):  # normal floats only: the relative bound alone
        assert np.all(err <= bound(v, QS, m) - 2.0 ** -(126 + m))


def test_normal_floats_meet_the_relative_bound_and_subnormals_the_absolute_one():
    """For |x| >= 2**-126 the bound is relative; a subnormal's bucket is 2**-(126+m) wide, so the
    error there is absolute (and relative only above 2**m such widths)."""
    m = 7
    normal = np.float32(np.geomspace(2.0**-126, 1e-30, 2001))
    h = Histogram(m)
    h.update(torch.from_numpy(normal).reshape(-1, 1), tokens(len(normal)))
    counts = h.state_dict()["counts"].numpy()
    got = quantile(counts, False, QS)
    ref = np.quantile(normal.astype(np.float64), QS)
    assert np.all(np.abs(got - ref) <= GUARANTEE(m) * np.abs(ref))
    # subnormals: 2**-149 .. 2**-127, each within one bucket width
    sub = np.float32(np.geomspace(2.0**-149, 2.0**-127, 2001))
    h = Histogram(m)
    h.update(torch.from_numpy(sub).reshape(-1, 1), tokens(len(sub)))
    got = quantile(h.state_dict()["counts"].numpy(), False, QS)
    ref = np.quantile(sub.astype(np.float64), QS)
    assert np.all(np.abs(got - ref) <= 2.0 ** -(126 + m))
    assert np.any(np.abs(got - ref) > GUARANTEE(m) * np.abs(ref))  # the relative bound does not hold there


def test_fused_reference_partials_are_float64():
    """The fused kernel's torch reference forms its powers in float64: tiny data comes out exact."""
    from probe.capture import kernels
    from probe.capture.kernels import _reference
    from probe.capture.kernels._layout import Plan

    x = data("tiny").unsqueeze(0)
    tk = tokens(N)
    plan = Plan(mantissa_bits=7, rows=8, sub=4, block_d=16, dense_bins=512)
    pers = [{"moments": Moments(), "position": Position(40), "histogram": Histogram(7), "sample": None}]
    original = kernels._partials
    kernels._partials = lambda xc, keep, _plan: _reference.partials(xc, keep, plan)
    try:
        kernels.update(pers, x, tk)
    finally:
        kernels._partials = original
    st = {k: v.numpy() for k, v in pers[0]["moments"].state_dict().items()}
    got = ours(*combine_channels(*(st[f] for f in ("n", "mean", "m2", "m3", "m4"))))
    assert_moments(got, reference(x.double().numpy().ravel()), "fused reference")


@pytest.mark.parametrize("kind", KINDS)
def test_fused_triton_kernel_tiny_values(kind):
    """The fused kernel scales each tile's float32 deviations (per channel, and per token for the
    position statistic) by a power of two before forming their powers, as the eager path does:
    subnormal, near-underflow and mixed-scale data keep the guarantees above (with float32 powers
    of the raw deviations all four kinds failed them: mixed read NaN)."""
    from test_kernels import HAVE_TRITON, _interpreting, fused_all, triton_partials

    if not HAVE_TRITON or not _interpreting():
        pytest.skip("needs triton under TRITON_INTERPRET=1 (see tests/test_kernels.py)")
    x = data(kind)[:64]
    got = fused_all(x.unsqueeze(0).contiguous(), tokens(len(x)), triton_partials, chunks=2, max_positions=40)
    st = {k: v.numpy() for k, v in got["moments"][0].state_dict().items()}
    v = x.double().numpy()
    assert_moments(ours(*combine_channels(*(st[f] for f in ("n", "mean", "m2", "m3", "m4")))),
                   reference(v.ravel()), f"triton {kind} site")
    for c in range(D):
        if v[:, c].std() == 0:
            continue
        assert_moments(ours(*(st[f][c] for f in ("n", "mean", "m2", "m3", "m4"))), reference(v[:, c]),
                       f"triton {kind} channel {c}")
    ps = {k: t.numpy() for k, t in got["position"][0].state_dict().items()}
    pos = (torch.arange(len(x)) % 32).numpy()
    for q in range(32):
        vals = v[pos == q]
        assert ps["n"][q] == vals.size
        # float32 squares of the scaled deviations summed over a token's channels: ~D * 2**-24
        np.testing.assert_allclose(ps["m2"][q] / ps["n"][q], vals.var(), rtol=1e-6, err_msg=f"triton {kind} {q}")
        np.testing.assert_allclose(ps["mean"][q], vals.mean(), rtol=1e-12, err_msg=f"triton {kind} {q}")
