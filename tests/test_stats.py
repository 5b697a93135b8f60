"""Each statistic against float64 numpy on the materialised data; merges equal one pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import probe
from probe.results.run import Run, combine_channels
from probe.stats._state import WindowState
from probe.stats import Cross, Histogram, Moments, Position, Sample, Tokens
from probe.stats.histogram import quantile, render

GUARANTEE = lambda m: 2.0**-m / (2 + 2.0**-m)  # noqa: E731


def tokens(n, keep=None, valid=None, position=None, forward=1, seed=7):
    valid = torch.ones(n, dtype=torch.bool) if valid is None else valid
    keep = valid.clone() if keep is None else keep
    position = torch.arange(n) if position is None else position
    return Tokens(valid, keep, position, torch.zeros(n, dtype=torch.long), torch.full((n,), -1), forward, seed)


def heavy(n=4000, d=16, seed=0):
    """Student-t(3) body with a few massive values (as in first-token activations)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3, size=(n, d)).astype(np.float32) + 0.5
    x[0, 3 % d] = 2500.0
    x[1, 7 % d] = -800.0
    x[2:40, 5 % d] *= 60
    return x


def moments_of(x, keep=None, chunks=1):
    st = Moments()
    t = torch.from_numpy(x)
    keep = torch.ones(len(x), dtype=torch.bool) if keep is None else keep
    for part, kp in zip(torch.tensor_split(t, chunks), torch.tensor_split(keep, chunks)):
        st.update(part, tokens(len(part), keep=kp))
    return {k: v.numpy() for k, v in st.state_dict().items()}


def test_moments_heavy_tailed_against_float64():
    x = heavy()
    m = moments_of(x, chunks=3)
    ref = x.astype(np.float64)
    n, mean, m2, m3, m4 = combine_channels(m["n"], m["mean"], m["m2"], m["m3"], m["m4"])
    flat = ref.ravel()
    c = flat - flat.mean()
    var, skew, kurt = (c**2).mean(), (c**3).mean() / (c**2).mean() ** 1.5, (c**4).mean() / (c**2).mean() ** 2 - 3
    assert n == flat.size
    assert abs(mean - flat.mean()) / abs(flat.mean()) < 1e-12
    # squares are formed in float32 (one rounding, 6e-8), then summed in float64
    assert abs(m2 / n - var) / var < 2e-7
    assert abs(np.sqrt(n) * m3 / m2**1.5 - skew) / abs(skew) < 1e-5
    assert abs(n * m4 / m2**2 - 3 - kurt) / abs(kurt) < 1e-5
    cc = ref - ref.mean(0)
    np.testing.assert_allclose(m["m4"] / m["n"], (cc**4).mean(0), rtol=1e-6)
    np.testing.assert_array_equal(m["min"], x.min(0))
    assert m["absmax"] == 2500.0 and list(m["absmax_at"][1:3]) == [0, 3]
    np.testing.assert_array_equal(m["large"], (np.abs(x) >= 6).sum(0))


def test_moments_split_merge_equals_one_pass():
    x = heavy(seed=1)
    one = moments_of(x)
    a, b = Moments(), Moments()
    a.update(torch.from_numpy(x[:1234]), tokens(1234))
    b.update(torch.from_numpy(x[1234:]), tokens(len(x) - 1234))
    a.merge(b)
    merged = {k: v.numpy() for k, v in a.state_dict().items()}
    for k in ("n", "min", "max", "nan", "tokens", "absmax", "absmax_at", "large"):
        np.testing.assert_array_equal(merged[k], one[k], err_msg=k)
    np.testing.assert_allclose(merged["mean"], one["mean"], rtol=1e-12)
    # central sums differ only by the float32 rounding of each chunk's squares (6e-8 each)
    for k in ("m2", "m3", "m4"):
        np.testing.assert_allclose(merged[k], one[k], rtol=2e-7, atol=1e-6 * np.abs(one[k]).max(), err_msg=k)


def test_nonfinite_counted_and_excluded():
    x = heavy(200, 4)
    x[5, 1], x[6, 2], x[7, 3] = np.nan, np.inf, -np.inf
    m = moments_of(x)
    assert (m["nan"], m["posinf"], m["neginf"]) == (1, 1, 1)
    finite = x[:, 1][np.isfinite(x[:, 1])].astype(np.float64)
    assert m["n"][1] == len(finite)
    np.testing.assert_allclose(m["mean"][1], finite.mean(), rtol=1e-12)
    assert np.isfinite(m["m4"]).all()


def test_empty_and_all_masked_give_no_nan_counts():
    x = heavy(10, 4)
    m = moments_of(x, keep=torch.zeros(10, dtype=torch.bool))
    assert m["n"].sum() == 0 and m["tokens"] == 0 and np.isfinite(m["m2"]).all()


def test_memory_constant_over_updates():
    st = Moments()
    x = torch.randn(256, 64)
    st.update(x, tokens(256))
    sizes = {k: v.numel() for k, v in st.state_dict().items()}
    for _ in range(100):
        st.update(x, tokens(256))
    assert {k: v.numel() for k, v in st.state_dict().items()} == sizes


# ---------------------------------------------------------------------------- histogram
def hist_of(x, m=7):
    h = Histogram(m)
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape(-1, 1)
    h.update(t, tokens(len(t)))
    s = h.state_dict()
    return s["counts"].numpy(), bool(s["lossless"])


QS = [0.001, 0.01, 0.5, 0.99, 0.999]


@pytest.mark.parametrize("m", [5, 7])
def test_quantiles_heavy_tailed_within_guarantee(m):
    x = heavy().ravel()
    counts, lossless = hist_of(x, m)
    assert counts.sum() == x.size and not lossless
    ours, ref = quantile(counts, lossless, QS), np.quantile(x.astype(np.float64), QS)
    assert np.all(np.abs(ours - ref) <= GUARANTEE(m) * np.abs(ref) + 1e-300)


def test_quantiles_many_zeros():
    rng = np.random.default_rng(3)
    x = np.where(rng.random(50_000) < 0.7, 0.0, rng.lognormal(0, 2, 50_000)).astype(np.float32)
    x[:100] = -x[:100]
    counts, lossless = hist_of(x)
    ours, ref = quantile(counts, lossless, QS), np.quantile(x.astype(np.float64), QS)
    assert ours[2] == 0.0 == ref[2]
    assert np.all(np.abs(ours - ref) <= GUARANTEE(7) * np.abs(ref))


def test_quantiles_exact_for_bf16():
    x = torch.randn(30_000).mul(3).to(torch.bfloat16).float().numpy()
    x[:5] = 0
    counts, lossless = hist_of(x)
    assert lossless
    np.testing.assert_array_equal(quantile(counts, lossless, QS), np.quantile(x.astype(np.float64), QS))
    c, e = render(counts, lossless, 50, (-4.0, 4.0))
    ref, _ = np.histogram(x, 50, (-4.0, 4.0))
    np.testing.assert_array_equal(c, ref)


def test_histogram_counts_and_big_bucket():
    x = heavy(500, 8).ravel()
    x[3] = np.nan
    counts, _ = hist_of(x)
    assert counts.sum() == np.isfinite(x).sum()
    # a bucket past 2**24 stays exact: build the state directly and merge twice
    h = Histogram(7)
    h.update(torch.ones(4, 1), tokens(4))
    state = h.state_dict()
    big = dict(state, counts=state["counts"].clone())
    big["counts"][int(np.argmax(big["counts"].numpy()))] = 2**24 + 1
    a, b = Histogram(), Histogram()
    a.load_state_dict(big)
    b.load_state_dict(big)
    a.merge(b)
    assert int(a.state_dict()["counts"].max()) == 2**25 + 2
    assert quantile(a.state_dict()["counts"].numpy(), True, 0.5) == 1.0


def test_render_wide_range_close_to_numpy():
    x = heavy(2000, 8, seed=4).ravel()
    counts, lossless = hist_of(x)
    c, edges = render(counts, lossless, 40, (-20, 20))
    ref, _ = np.histogram(x, 40, (-20, 20))
    assert abs(c.sum() - ref.sum()) <= 1e-6 * x.size + 2
    assert np.max(np.abs(c - ref)) <= 0.02 * ref.max() + 2


# ------------------------------------------------------------------------------- sample
def test_sample_uniform_chi_square():
    n, d, k = 400, 20, 4000
    st = Sample(k)
    for f in range(5):
        x = torch.arange(n * d, dtype=torch.float32).reshape(n, d)
        st.update(x, tokens(n, forward=f, seed=100 + f))
    s = st.state_dict()
    assert np.isfinite(s["key"].numpy()).all()
    for field, bins in (("position", n), ("channel", d)):
        counts = np.bincount(s[field].numpy(), minlength=bins)
        expected = k / bins
        stat = ((counts - expected) ** 2 / expected).sum()
        df = bins - 1
        # chi-square with df degrees of freedom: mean df, sd sqrt(2 df); 5 sd is p < 1e-5
        assert stat < df + 5 * np.sqrt(2 * df), (field, stat, df)
        assert stat > df - 5 * np.sqrt(2 * df), (field, stat, df)  # not suspiciously regular either


def test_sample_respects_keep_and_merges_exactly():
    n, d = 50, 6
    keep = torch.arange(n) >= 3
    x = torch.randn(n, d)
    one = Sample(40)
    one.update(x, tokens(n, keep=keep, seed=5))
    assert (one.state_dict()["position"] >= 3).all()
    # split stream: the same keys (same seed per forward) -> the union's bottom-k
    a, b = Sample(40), Sample(40)
    t1 = tokens(n, keep=keep, seed=5)
    a.update(x, t1)
    b.update(x * 2, tokens(n, keep=keep, seed=6, forward=2))
    both = Sample(40)
    both.update(x, tokens(n, keep=keep, seed=5))
    both.update(x * 2, tokens(n, keep=keep, seed=6, forward=2))
    a.merge(b)
    for f, v in a.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), both.state_dict()[f].numpy())


def test_sample_shared_merge_follows_each_sites_history():
    """Sites that share a forward share its merge only when they hold the same keys: a site that
    missed a forward, or got another's state by merge, keeps a sample of its own stream."""
    n, d, k = 30, 4, 25
    forwards = [tokens(n, seed=10 + f, forward=f) for f in range(3)]  # one Tokens per forward, shared
    xs = [torch.randn(n, d) for _ in range(3)]
    a, b, c = Sample(k), Sample(k), Sample(k)
    for f, tk in enumerate(forwards):
        a.update(xs[f], tk)
        if f != 1:  # b misses forward 1
            b.update(xs[f] * 3, tk)
        c.update(xs[f] - 1, tk)

    def alone(fs, scale=1.0, shift=0.0):  # the same stream through fresh Tokens: no sharing possible
        st = Sample(k)
        for f in fs:
            st.update(xs[f] * scale + shift, tokens(n, seed=10 + f, forward=f))
        return st.state_dict()

    for st, ref in ((a, alone([0, 1, 2])), (b, alone([0, 2], scale=3.0)), (c, alone([0, 1, 2], shift=-1.0))):
        for f, v in st.state_dict().items():
            np.testing.assert_array_equal(v.numpy(), ref[f].numpy(), err_msg=f)
    assert a.history == c.history != b.history
    # a merge makes the history unique: the next shared forward does not reuse another's merge
    a.merge(b)
    tk = tokens(n, seed=99, forward=4)
    a.update(xs[0], tk)
    c.update(xs[0], tk)
    assert a.history != c.history
    ref_a, ref_c = Sample(k), Sample(k)
    ref_a.load_state_dict(alone([0, 1, 2]))
    other = Sample(k)
    other.load_state_dict(alone([0, 2], scale=3.0))
    ref_a.merge(other)
    ref_c.load_state_dict(alone([0, 1, 2], shift=-1.0))
    for st, ref in ((a, ref_a), (c, ref_c)):
        ref.update(xs[0], tokens(n, seed=99, forward=4))
        for f, v in st.state_dict().items():
            np.testing.assert_array_equal(v.numpy(), ref.state_dict()[f].numpy(), err_msg=f)


def test_same_triples_across_sites(tiny):
    model = tiny("llama")
    from conftest import batch

    ids, mask = batch(3, 9, "right")
    with probe.capture(model, stats=("sample",), sample_size=50, skip_first=1) as run:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
            model(input_ids=ids, attention_mask=mask)
    first = run[run.sites[0]].sample
    for name in run.sites[1:]:
        s = run[name].sample
        for f in ("row", "position", "channel"):
            np.testing.assert_array_equal(getattr(s, f), getattr(first, f))
    assert (first.position >= 1).all()
    valid = mask.bool().numpy()
    assert valid[first.row % 3, first.position].all()


# -------------------------------------------------------------------------------- cross
def _cross_reference(xs, keep):
    data = np.stack([x[keep].astype(np.float64).ravel() for x in xs])
    return np.cov(data, bias=True), np.corrcoef(data) ** 2


@pytest.mark.parametrize("block_bytes", [64 << 20, 800])
def test_cross_against_numpy_with_blocks(block_bytes):
    rng = np.random.default_rng(0)
    n_forward, n, d = 3, 40, 8
    st = Cross(["a", "b", "c"], block_bytes=block_bytes)
    xs_all, keep_all, valid_all = [[], [], []], [], []
    for f in range(n_forward):
        base = rng.standard_normal((n, d)).astype(np.float32)
        xs = [base, base * 0.5 + rng.standard_normal((n, d)).astype(np.float32), base**2]
        xs[0][0, 0] = 300.0  # a massive first-token value
        valid = rng.random(n) > 0.2
        keep = valid & (np.arange(n) % 10 != 0)
        tk = tokens(n, keep=torch.from_numpy(keep), valid=torch.from_numpy(valid), forward=f)
        for i, x in enumerate(xs):
            st.hold(i, torch.from_numpy(x), tk)
            xs_all[i].append(x)
        st.finish()
        keep_all.append(keep)
        valid_all.append(valid)
    xs = [np.concatenate(x) for x in xs_all]
    keep, valid = np.concatenate(keep_all), np.concatenate(valid_all)
    view = Run({"sites": [], "cross_sites": ["a", "b", "c"]},
               [WindowState(0, {}, {k: v.numpy() for k, v in st.state_dict().items()})]).cross
    cov, r2 = _cross_reference(xs, keep)
    np.testing.assert_allclose(view.cov, cov, rtol=1e-10)
    assert np.max(np.abs(view.r2 - r2)) <= 1e-9
    cov, r2 = _cross_reference(xs, valid)
    np.testing.assert_allclose(view.cov_all, cov, rtol=1e-10)
    assert np.max(np.abs(view.r2_all - r2)) <= 1e-9


def test_cross_over_budget_skips_forward_with_warning():
    st = Cross(["a", "b"], budget=100)
    tk = tokens(10)
    st.hold(0, torch.randn(10, 4), tk)
    st.hold(1, torch.randn(10, 4), tk)
    with pytest.warns(UserWarning, match="cross_budget"):
        st.finish()
    assert int(st.state_dict()["skipped_tokens"]) == 10


def test_position_stat_against_numpy():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((60, 5)).astype(np.float32)
    pos = torch.from_numpy(np.tile(np.arange(12), 5))
    valid = torch.from_numpy(rng.random(60) > 0.1)
    st = Position(8)
    st.update(torch.from_numpy(x), tokens(60, valid=valid, position=pos))
    s = {k: v.numpy() for k, v in st.state_dict().items()}
    for p in range(8):
        sel = x[(pos.numpy() == p) & valid.numpy()].astype(np.float64)
        assert s["tokens"][p] == len(sel)
        np.testing.assert_allclose(s["mean"][p], sel.mean(), rtol=1e-10)
        np.testing.assert_allclose(s["m2"][p] / s["n"][p], sel.var(), rtol=2e-7)
    assert s["overflow"] == int(((pos.numpy() >= 8) & valid.numpy()).sum())


@pytest.mark.parametrize("pad", ["left", "right"])
@pytest.mark.parametrize("explicit_positions", [False, True])
def test_cross_through_capture_both_views(tiny, pad, explicit_positions):
    """Both head paths (gathered by topk, or masked when position_ids are the caller's) equal numpy."""
    from conftest import batch

    model = tiny("llama")
    data = [batch(3, 9, pad, seed=s) for s in range(3)]
    hidden, keeps, valids = [], [], []
    with probe.capture(model, skip_first=2, stats=("cross",), strict=True) as run:
        for ids, mask in data:
            position = (mask.cumsum(-1) - 1).clamp(min=0)
            extra = {"position_ids": position} if explicit_positions else {}
            with torch.no_grad():
                hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **extra).hidden_states
            hidden.append(hs)
            valids.append(mask.bool())
            keeps.append(mask.bool() & (position >= 2))
    for view, masks in (("", keeps), ("_all", valids)):
        data64 = np.stack([np.concatenate([h[i][m].double().numpy().ravel() for h, m in zip(hidden, masks)])
                           for i in range(len(run.sites))])
        np.testing.assert_allclose(getattr(run.cross, "cov" + view), np.cov(data64, bias=True), rtol=1e-10)
        assert np.max(np.abs(getattr(run.cross, "r2" + view) - np.corrcoef(data64) ** 2)) <= 1e-9


def test_no_per_site_buffer_scales_with_the_activations():
    """Memory must not grow with depth: no statistic keeps anything activation-sized per site."""
    x = torch.randn(8192, 64)  # larger than the 65,536 histogram buckets
    for stat in (Moments(), Position(16), Histogram(), Sample(32)):
        stat.update(x, tokens(8192))
        held = [v for v in list(vars(stat).values()) + list(stat.state_dict().values()) if isinstance(v, torch.Tensor)]
        assert all(t.numel() < x.numel() / 2 for t in held), type(stat).__name__


def test_statistics_declare_and_document_their_state():
    from probe.stats._state import SPECS

    for cls in (Moments, Position, Histogram, Sample, Cross):
        spec = SPECS[cls.name]
        assert cls.spec is spec and tuple(cls._fields) == spec.names
        doc = cls.__doc__.replace("``keep_", "``v_").replace("``all_", "``v_")
        for f in spec.fields:
            name = f.name.replace("keep_", "v_").replace("all_", "v_")
            assert f"``{name}``" in doc, (cls.name, f.name)
            assert f.reduce in doc, (cls.name, f.reduce)


def test_identity_state_and_kway_merge_against_numpy():
    from probe.stats._state import dims_of, empty_state, merge_states

    x = heavy(900, 8)
    parts = [moments_of(p) for p in np.array_split(x, 3)]
    one = merge_states("moments", parts)
    with_empty = merge_states("moments", [parts[0], empty_state("moments", dims_of("moments", parts[0])), *parts[1:]])
    for field in one:
        np.testing.assert_array_equal(one[field], with_empty[field], err_msg=field)
    xd = x.astype(np.float64)
    np.testing.assert_array_equal(one["n"], np.full(8, 900.0))
    np.testing.assert_allclose(one["mean"], xd.mean(0), rtol=1e-12)
    for p in (2, 3, 4):
        ref = ((xd - xd.mean(0)) ** p).sum(0)
        np.testing.assert_allclose(one[f"m{p}"], ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    assert one["absmax"] == np.float32(2500.0) and one["min"].min() == x.min()
