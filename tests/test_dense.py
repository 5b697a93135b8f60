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


def test_sample_bound_keeps_the_same_reservoir(monkeypatch):
    """With a full reservoir, only keys below its largest are drawn as candidates (CPU): the
    merged sample is the same, key for key."""
    def run(fast):
        monkeypatch.setattr(_base, "DENSE_CPU", fast)
        st = Sample(40)
        for f in range(6):
            x, keep, valid = case("head", seed=f)
            st.update(x, tokens(keep, valid, forward=f, seed=100 + f))
        return st.state_dict()

    fast, full = run(True), run(False)
    assert np.isfinite(fast["key"].numpy()).all()
    for f in fast:
        np.testing.assert_array_equal(fast[f].numpy(), full[f].numpy(), err_msg=f)


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
    for site, stats in masked["sites"].items():
        for kind, state in stats.items():
            for f, ref in state.items():
                got = fast["sites"][site][kind][f]
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
    from probe.run import combine_channels

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
    for site, stats in totals[1]["sites"].items():
        for kind, state in stats.items():
            for f, ref in state.items():
                np.testing.assert_array_equal(totals[0]["sites"][site][kind][f], ref, err_msg=f"{site} {kind} {f}")


def test_statistics_fed_directly_with_a_tensor_that_requires_grad():
    """Outside a capture (which detaches), a statistic updated with a tensor autograd records
    takes the masked path and gives the same numbers."""
    x, keep, valid = case("head")
    a, b = Moments(), Moments()
    a.update(x.clone().requires_grad_(True), tokens(keep, valid))
    b.update(x, tokens(keep, valid))
    assert_states_agree({k: v.detach() for k, v in a.state_dict().items()}, b.state_dict(), rtol=1e-6)
