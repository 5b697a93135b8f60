"""The CPU fast paths (``probe.stats._base.dense`` and the host-read shortcuts) compute what the
masked paths compute: the same chunks go through both (``DENSE_CPU`` on and off) and the states
agree, counts and extremes exactly, sums to their rounding. The float64 references of
test_stats.py and test_parity.py run on CPU, so they hold the fast paths to numpy as well."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import probe
from probe.stats import Cross, Histogram, Moments, Norm, Position, Sample, Tokens, TopK
from probe.stats import _base
from conftest import batch

N, D = 96, 24


def tokens(keep, valid=None, forward=1, seed=3):
    n = keep.numel()
    valid = torch.ones(n, dtype=torch.bool) if valid is None else valid
    position = torch.arange(n) % 32
    return Tokens(valid, keep & valid, position, torch.arange(n) // 32, torch.arange(n) % 7, forward, seed,
                  head_bound=-1)


def case(name: str, seed: int = 0):
    """A chunk ``x[N, D]`` and its tokens: three sequences of 32, massive values at the first
    token, values past |x| >= 6, and what each case adds."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g) * 2
    x[0, 3], x[32, 5], x[40, 1] = 900.0, -300.0, 7.5
    keep = torch.ones(N, dtype=torch.bool)
    valid = torch.ones(N, dtype=torch.bool)
    if name in ("head", "padded", "nan_dropped"):
        keep[::32] = False  # skip_first=1
    if name == "padded":
        valid[60:64] = False
        x[60:64] = 1e4
    if name == "nan_dropped":  # non-finite values only where no statistic of the kept tokens looks
        x[0, 0], x[32, 2] = float("nan"), float("inf")
    if name == "nan_kept":
        x[10, 4], x[11, 5], x[12, 6] = float("nan"), float("inf"), float("-inf")
    return x, keep, valid


CASES = ["plain", "head", "padded", "nan_dropped", "nan_kept"]
MAKERS = {"moments": Moments, "position": lambda: Position(40), "histogram": Histogram, "topk": lambda: TopK(8),
          "norm": lambda: Norm(max_positions=40)}


def fed(make, chunks, fast: bool, monkeypatch):
    """A statistic fed ``chunks`` of (x, tokens) through the two-phase CPU path."""
    monkeypatch.setattr(_base, "DENSE_CPU", fast)
    stat = make()
    for x, tk in chunks:
        part = type(stat).partial(stat, x.unsqueeze(0), tk)
        type(stat).fold([stat], [part])
    return {k: v.clone() for k, v in stat.state_dict().items()}


def assert_states_agree(a: dict, b: dict, rtol: float) -> None:
    assert a.keys() == b.keys()
    for f in a:
        u, v = a[f].numpy(), b[f].numpy()
        if u.dtype.kind in "iub":
            np.testing.assert_array_equal(u, v, err_msg=f)
        elif f in ("min", "max", "absmax", "value", "lossless"):
            np.testing.assert_array_equal(u, v, err_msg=f)
        else:  # signed sums (m3) cancel: their rounding scales with the field's largest entry
            scale = np.nanmax(np.abs(v), initial=0.0)
            np.testing.assert_allclose(u, v, rtol=rtol, atol=rtol * scale, err_msg=f)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("kind", list(MAKERS))
def test_fast_path_equals_masked_path(kind, name, monkeypatch):
    x, keep, valid = case(name)
    chunks = [(x, tokens(keep, valid)), (x[:50] * 0.5, tokens(keep[:50], valid[:50], forward=2))]
    fast = fed(MAKERS[kind], chunks, True, monkeypatch)
    masked = fed(MAKERS[kind], chunks, False, monkeypatch)
    # float32 powers and sums on both paths; the per-position squares are summed in float32 per
    # token on the fast path (float64 on the masked one): well within 1e-5 of each other
    assert_states_agree(fast, masked, rtol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_fast_path_is_taken_exactly_where_it_may_be(name, monkeypatch):
    """Not vacuous: the dense view exists for finite kept values, and only then."""
    monkeypatch.setattr(_base, "DENSE_CPU", True)
    x, keep, valid = case(name)
    view = _base.dense(x.unsqueeze(0), tokens(keep, valid))
    assert (view is None) == (name == "nan_kept")
    if view is not None:
        assert view.x.shape[-2] == int((keep & valid).sum())
        np.testing.assert_array_equal(view.x[0].numpy(), x[keep & valid].numpy())
        ref = x[keep & valid].double().sum(0)
        np.testing.assert_allclose(view.parts.colsum[0].numpy(), ref.numpy(), rtol=1e-12, atol=1e-9)
    monkeypatch.setattr(_base, "DENSE_CPU", False)
    assert _base.dense(x.unsqueeze(0), tokens(keep, valid)) is None


def test_fast_moments_against_float64(monkeypatch):
    """The fast path on its own against numpy: kept tokens only, |x| >= 6 counts, the absmax."""
    monkeypatch.setattr(_base, "DENSE_CPU", True)
    x, keep, valid = case("padded")
    st = fed(Moments, [(x, tokens(keep, valid))], True, monkeypatch)
    kept = x[keep & valid].double().numpy()
    np.testing.assert_array_equal(st["n"].numpy(), np.full(D, len(kept)))
    np.testing.assert_allclose(st["mean"].numpy(), kept.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(st["m2"].numpy(), ((kept - kept.mean(0)) ** 2).sum(0), rtol=1e-6)
    np.testing.assert_array_equal(st["large"].numpy(), (np.abs(kept) >= 6).sum(0))
    np.testing.assert_array_equal(st["min"].numpy(), kept.min(0).astype(np.float32))
    assert float(st["absmax"]) == np.abs(kept).max() < 300  # the 900 and -300 sit at dropped first tokens
    assert int(st["tokens"]) == len(kept)


@pytest.mark.parametrize("k", [500, 3000])  # fewer / more slots than one forward's kept elements
@pytest.mark.parametrize("fast", [True, False])
def test_sample_keys_are_the_smallest_of_uniform_keys(monkeypatch, fast, k):
    """The CPU draw of a forward's k smallest keys (order statistics, O(k)) and the accelerator's
    key per element + topk give the same law: after F forwards over M kept elements the reservoir
    holds the k smallest of M uniforms, so its largest key is near k / (M + 1) and the others,
    divided by it, are uniform on (0, 1)."""
    monkeypatch.setattr(_base, "DENSE_CPU", fast)
    forwards = 8
    st = Sample(k)
    kept = 0
    for f in range(forwards):
        x, keep, valid = case("head", seed=f)
        st.update(x, tokens(keep, valid, forward=f, seed=1000 + f))
        kept += int(keep.sum()) * D
    key = np.sort(st.state_dict()["key"].numpy())
    m = kept
    # the k-th smallest of m uniforms: mean k / (m + 1), sd sqrt(k (m - k + 1) / ((m + 1)^2 (m + 2)))
    sd = np.sqrt(k * (m - k + 1) / ((m + 1) ** 2 * (m + 2)))
    assert abs(key[-1] - k / (m + 1)) < 5 * sd, (key[-1], k / (m + 1), sd)
    u = key[:-1] / key[-1]
    grid = np.arange(1, u.size + 1) / u.size
    ks = max(np.abs(grid - u).max(), np.abs(grid - 1 / u.size - u).max())
    assert ks < 1.95 / np.sqrt(u.size), ks  # Kolmogorov-Smirnov at p = 0.001


def test_smallest_keys_follow_uniform_order_statistics():
    """One forward's CPU draw: the j-th smallest key has the mean of the j-th smallest of N
    uniforms, j / (N + 1), and the indices are distinct kept elements."""
    from probe.stats.sample import _smallest_keys

    gen = torch.Generator().manual_seed(1)
    keep = torch.ones(260, dtype=torch.bool)
    keep[::26] = False
    d, k, draws = 8, 50, 400
    n = int(keep.sum()) * d
    ranked = []
    for _ in range(draws):
        keys, index = _smallest_keys(keep, d, k, gen)
        assert index.unique().numel() == k and keep[index // d].all()
        ranked.append(np.sort(keys.numpy()))
    ranked = np.array(ranked)
    for j in (1, 10, k):
        mean = j / (n + 1)
        sd = np.sqrt(j * (n - j + 1) / ((n + 1) ** 2 * (n + 2)) / draws)
        assert abs(ranked[:, j - 1].mean() - mean) < 5 * sd, (j, ranked[:, j - 1].mean(), mean, sd)


def test_random_subset_is_uniform():
    """Every element is equally likely to be drawn, alone and in pairs with its neighbour."""
    from probe.stats.sample import _subset

    gen = torch.Generator().manual_seed(0)
    n, k, trials = 40, 6, 6000
    seen, pairs = np.zeros(n), np.zeros(n)
    for _ in range(trials):
        pick = _subset(n, k, gen).numpy()
        assert (np.diff(pick) > 0).all() and pick.min() >= 0 and pick.max() < n and pick.size == k
        seen[pick] += 1
        both = np.isin((pick + 1) % n, pick)
        pairs[pick[both]] += 1
    # P(i and i + 1 both drawn) = k (k - 1) / (n (n - 1)) for every i
    for counts, expected in ((seen, trials * k / n), (pairs, trials * k * (k - 1) / (n * (n - 1)))):
        stat = ((counts - expected) ** 2 / expected).sum()
        df = n - 1
        assert df - 5 * np.sqrt(2 * df) < stat < df + 5 * np.sqrt(2 * df), stat


def test_cross_clean_block_equals_masked(monkeypatch):
    def run(fast, cosines):
        monkeypatch.setattr(_base, "DENSE_CPU", fast)
        cross = Cross([f"s{i}" for i in range(3)], block_bytes=3 * 7 * D * 8, cosines=cosines)
        for f in range(2):
            xs = [case("head", seed=10 * f + i)[0] for i in range(3)]
            keep = case("head")[1]
            tk = tokens(keep, forward=f)
            tk = Tokens(tk.valid, tk.keep, tk.position, tk.row, tk.token, f, 3, head_bound=3)
            for i, x in enumerate(xs):
                cross.hold(i, x, tk)
            cross.finish()
        return cross.state_dict()

    for cosines in (False, True):
        fast, masked = run(True, cosines), run(False, cosines)
        for f in fast:
            np.testing.assert_allclose(fast[f].numpy(), masked[f].numpy(), rtol=1e-12, atol=1e-9, err_msg=f)


def test_capture_fast_equals_masked(tiny, monkeypatch):
    """The whole CPU path (two phases per forward) with padding and skip_first: every state."""
    model = tiny("llama")
    ids, mask = batch(3, 9, "left")

    def run(fast):
        monkeypatch.setattr(_base, "DENSE_CPU", fast)
        with probe.capture(model, skip_first=1, strict=True, seed=5, sample_size=30) as cap:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
                model(input_ids=ids[:, 2:], attention_mask=mask[:, 2:])
        return cap.result.total

    fast, masked = run(True), run(False)
    for site, stats in masked.sites.items():
        for kind, state in stats.items():
            if kind == "sample":  # drawn another way on each path: same law (tested above), other keys
                continue
            for f, ref in state.items():
                got = fast.sites[site][kind][f]
                if np.asarray(ref).dtype.kind in "iub" or f in ("min", "max", "absmax", "value"):
                    np.testing.assert_array_equal(got, ref, err_msg=f"{site} {kind} {f}")
                else:
                    scale = np.nanmax(np.abs(ref), initial=0.0)
                    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * scale, err_msg=f"{site} {kind} {f}")


@pytest.mark.parametrize("scale", [1e12, 1e25])
@pytest.mark.parametrize("name", ["head", "nan_kept"])
def test_huge_finite_values_do_not_overflow(scale, name, monkeypatch):
    """Fourth powers of |x| > ~1.8e9 overflow float32: a chunk whose float32 powers or norms are
    not finite is recomputed in float64 (CPU), so the moments, per-position spread and norms of
    huge but finite activations stay right."""
    from probe.results.run import combine_channels

    x, keep, valid = case(name)
    x = x * scale
    tk = tokens(keep, valid)
    st = {k: fed(MAKERS[k], [(x, tk)], True, monkeypatch) for k in ("moments", "position", "norm")}
    ok = (keep & valid).numpy()
    kept = x[keep & valid].double().numpy()
    finite = np.isfinite(kept)
    flat = kept[finite]
    m = st["moments"]
    n, mean, m2, m3, m4 = combine_channels(*(m[f].numpy() for f in ("n", "mean", "m2", "m3", "m4")))
    c = flat - flat.mean()
    assert n == flat.size
    np.testing.assert_allclose(m2 / n, (c**2).mean(), rtol=1e-6)
    np.testing.assert_allclose(n * m4 / m2**2, (c**4).mean() / (c**2).mean() ** 2, rtol=1e-5)
    np.testing.assert_allclose(np.sqrt(n) * m3 / m2**1.5, (c**3).mean() / (c**2).mean() ** 1.5, rtol=1e-4,
                               atol=1e-6)
    p = st["position"]
    rows = x.double().numpy()
    pos = (torch.arange(N) % 32).numpy()
    for q in (1, 5):  # positions with real, finite tokens in every case
        vals = rows[(pos == q) & valid.numpy()]
        vals = vals[np.isfinite(vals)]
        np.testing.assert_allclose(p["m2"][q].item() / p["n"][q].item(), vals.var(), rtol=1e-5)
    norms = np.linalg.norm(rows[ok], axis=1)
    good = np.isfinite(norms)
    nm = st["norm"]
    assert int(nm["n"]) == good.sum() and int(nm["nonfinite"]) == (~good).sum()
    np.testing.assert_allclose(nm["mean"].item(), norms[good].mean(), rtol=1e-6)


def test_scratch_buffers_go_with_the_capture(tiny):
    model = tiny("gpt2")
    ids, mask = batch(3, 9)
    with probe.capture(model, skip_first=1):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        assert _base._SCRATCH.pool  # the fast paths used them (not vacuous)
    assert not _base._SCRATCH.pool


def test_topk_candidate_tokens_give_the_same_top_k(monkeypatch):
    """CPU, full state: only tokens whose largest |x| beats the state's k-th are searched (or none,
    and the chunk is skipped); the result equals the masked path's, over forwards that exercise
    both the restricted search and the skip."""
    seen = {"restricted": 0, "skipped": 0}
    best = TopK._best

    def spy(x, tokens, k, tok=None):
        if tok is not None:
            seen["restricted"] += 1
        return best(x, tokens, k, tok)

    chunks = []
    for f, scale in enumerate([1.0, 3.0, 0.5, 1.2, 5.0, 0.1]):
        x, keep, valid = case("padded", seed=f)
        chunks.append((x * scale, tokens(keep, valid, forward=f)))
    masked = fed(lambda: TopK(8), chunks, False, monkeypatch)
    monkeypatch.setattr(TopK, "_best", staticmethod(spy))
    original = TopK.partial.__func__

    def partial(cls, stat, x, tk):
        part = original(cls, stat, x, tk)
        seen["skipped"] += part is None
        return part

    monkeypatch.setattr(TopK, "partial", classmethod(partial))
    fast = fed(lambda: TopK(8), chunks, True, monkeypatch)
    assert seen["restricted"] >= 1 and seen["skipped"] >= 1  # both shortcuts ran
    assert_states_agree(fast, masked, rtol=0.0)


def test_fast_paths_under_inference_mode_from_a_fresh_pool(tiny):
    """Buffers first made inside torch.inference_mode() are ordinary tensors: later forwards
    outside it update them in place without error, and the numbers equal no_grad's."""
    model = tiny("llama")
    ids, mask = batch(3, 9, "left")
    totals = []
    for mode in (torch.inference_mode, torch.no_grad):
        _base.release_scratch()
        with probe.capture(model, skip_first=1, strict=True, seed=1) as cap:
            with mode():
                model(input_ids=ids, attention_mask=mask)
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
        totals.append(cap.result.total)
    for site, stats in totals[1].sites.items():
        for kind, state in stats.items():
            for f, ref in state.items():
                np.testing.assert_array_equal(totals[0].sites[site][kind][f], ref, err_msg=f"{site} {kind} {f}")


def test_statistics_fed_directly_with_a_tensor_that_requires_grad():
    """Outside a capture (which detaches), a statistic updated with a tensor autograd records
    takes the masked path and gives the same numbers."""
    x, keep, valid = case("head")
    a, b = Moments(), Moments()
    a.update(x.clone().requires_grad_(True), tokens(keep, valid))
    b.update(x, tokens(keep, valid))
    assert_states_agree({k: v.detach() for k, v in a.state_dict().items()}, b.state_dict(), rtol=1e-6)


class _InPlace(torch.nn.Module):
    """Two linear layers; the first one's output is doubled in place after its hook has seen it."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(D, D)
        self.b = torch.nn.Linear(D, D)

    def forward(self, x):
        h = self.a(x)
        h.mul_(2.0)
        return self.b(h)


@pytest.mark.parametrize("fast", [True, False])
def test_site_changed_in_place_after_its_hook(monkeypatch, fast):
    """On CPU a site is copied at its hook into a reused buffer: a later in-place change by the
    model does not reach the statistics, and the forward counts with the values the hook saw.
    Held by reference (the accelerator path), the forward is left out with one warning."""
    import warnings

    monkeypatch.setattr(_base, "DENSE_CPU", fast)
    torch.manual_seed(0)
    net = _InPlace()
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        at_hook = net.a(x).double().reshape(-1, D).numpy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with probe.capture(net, sites=["a", "b"], stats=("moments",)) as run:
            with torch.no_grad():
                net(x)
                net(x)
    moved = [w for w in caught if "modified in place after their hook" in str(w.message)]
    if fast:
        assert not moved
        assert run["a"].tokens == 2 * at_hook.shape[0]
        np.testing.assert_allclose(run["a"].mean, at_hook.mean(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(run["a"].std, at_hook.std(), rtol=1e-6)
    else:
        assert len(moved) == 1
        assert run["a"].tokens == at_hook.shape[0]  # the first forward is left out, the second copied


def test_held_buffers_go_with_the_capture(tiny):
    model = tiny("llama")
    ids, mask = batch(2, 7, "right")
    with probe.capture(model) as cap:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        assert cap._forwards._held  # one reused buffer per CPU site while the capture is open
    assert not cap._forwards._held
