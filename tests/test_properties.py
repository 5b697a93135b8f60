"""Property tests: for every statistic, splitting a stream at any points and merging equals one
pass, and merge is commutative and associative; random shapes, dtypes, masks and skip_first."""

from __future__ import annotations

import os

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probe.stats import Cross, Histogram, Moments, Position, Sample, Tokens

# CI sees the same examples every run (derandomize); PROBE_EXAMPLES=400 explores fresh ones
SETTINGS = settings(max_examples=int(os.environ.get("PROBE_EXAMPLES", "30")), deadline=None,
                    derandomize=not os.environ.get("PROBE_EXAMPLES"),
                    suppress_health_check=[HealthCheck.too_slow])
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@st.composite
def streams(draw):
    n = draw(st.integers(1, 48))
    d = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3, size=(n, d)) * draw(st.sampled_from([0.01, 1.0, 50.0])) + draw(st.floats(-3, 3))
    x = torch.from_numpy(x).float().to(dtype).float()  # what the tap hands over: upcast chunks
    valid = torch.from_numpy(rng.random(n) > draw(st.floats(0, 0.5)))
    position = torch.from_numpy(np.tile(np.arange(draw(st.integers(1, 12))), n)[:n].copy())
    skip = draw(st.integers(0, 2))
    keep = valid & (position >= skip)
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=3)))
    return x, valid, keep, position, cuts


def tokens(valid, keep, position, forward=0, offset=0):
    n = len(valid)
    return Tokens(valid, keep, position, torch.arange(n) + offset, torch.full((n,), -1), forward,
                  1000 + forward)


def pieces(stream):
    x, valid, keep, position, cuts = stream
    bounds = [0, *cuts, len(x)]
    return [(x[a:b], valid[a:b], keep[a:b], position[a:b], a) for a, b in zip(bounds, bounds[1:])]


def fed(make, parts, first_forward=0):
    """One statistic fed every part, each as its own forward (so the sample draws fresh keys)."""
    stat = make()
    for i, (x, v, k, p, off) in enumerate(parts):
        stat.update(x, tokens(v, k, p, first_forward + i, off))
    return stat


def merged(make, parts):
    """Each part into its own statistic (forward i, as in a real run), then merged left to right."""
    stats = [fed(make, [part], first_forward=i) for i, part in enumerate(parts)]
    out = stats[0]
    for s in stats[1:]:
        out.merge(s)
    return out


def state(stat):
    return {k: v.numpy() for k, v in stat.state_dict().items()}


def assert_close(actual, desired, rtol: float, floor: float = 0.0, err_msg: str = "") -> None:
    """Equal non-finite entries exactly (NaN where NaN, the same signed infinity), finite entries
    within ``rtol`` relative plus ``rtol * max|finite desired| + floor`` absolute. The absolute
    tolerance is computed from finite values only, so it is itself always finite."""
    a = np.asarray(actual, dtype=np.float64)
    d = np.asarray(desired, dtype=np.float64)
    assert a.shape == d.shape, (err_msg, a.shape, d.shape)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(d), err_msg=f"{err_msg}: NaN positions")
    inf = np.isinf(d)
    np.testing.assert_array_equal(np.isinf(a), inf, err_msg=f"{err_msg}: infinity positions")
    np.testing.assert_array_equal(a[inf], d[inf], err_msg=f"{err_msg}: infinities")
    finite = np.isfinite(d)
    atol = rtol * (float(np.abs(d[finite]).max()) if finite.any() else 0.0) + floor
    assert np.isfinite(atol), err_msg
    np.testing.assert_allclose(a[finite], d[finite], rtol=rtol, atol=atol, err_msg=err_msg)


def moment_scale(x, keep, p):
    v = x[keep].double().numpy()
    if v.size == 0:
        return np.zeros(x.shape[1])
    c = v - v.mean(0)
    return (np.abs(c) ** p).sum(0) + 1e-30


@SETTINGS
@given(streams())
def test_moments_split_merge_equals_one_pass(stream):
    x, valid, keep, position, _ = stream
    one = state(fed(Moments, [(x, valid, keep, position, 0)]))
    split = state(merged(Moments, pieces(stream)))
    if not one:
        assert not split or split["n"].sum() == 0
        return
    for k in ("n", "min", "max", "nan", "tokens", "absmax", "large"):
        np.testing.assert_array_equal(split[k], one[k], err_msg=k)
    assert_close(split["mean"], one["mean"], rtol=1e-12, err_msg="mean")
    for p, k in ((2, "m2"), (3, "m3"), (4, "m4")):
        # each chunk squares in float32 (6e-8 per term): bound by the sum of |x - mean|^p
        assert np.all(np.abs(split[k] - one[k]) <= 1e-6 * moment_scale(x, keep, p)), k


@SETTINGS
@given(streams())
def test_histogram_and_position_exact_merge(stream):
    x, valid, keep, position, _ = stream
    one = state(fed(Histogram, [(x, valid, keep, position, 0)]))
    split = state(merged(Histogram, pieces(stream)))
    np.testing.assert_array_equal(split["counts"], one["counts"])
    assert split["lossless"] == one["lossless"]
    assert one["counts"].sum() == int((keep[:, None] & torch.isfinite(x)).sum())
    one = state(fed(lambda: Position(16), [(x, valid, keep, position, 0)]))
    split = state(merged(lambda: Position(16), pieces(stream)))
    np.testing.assert_array_equal(split["tokens"], one["tokens"])
    np.testing.assert_array_equal(split["absmax"], one["absmax"])
    assert_close(split["mean"], one["mean"], rtol=1e-12, floor=1e-12, err_msg="mean")
    assert_close(split["m2"], one["m2"], rtol=1e-6, floor=1e-9, err_msg="m2")


@SETTINGS
@given(streams(), st.integers(1, 30))
def test_sample_split_merge_equals_one_pass_exactly(stream, k):
    parts = pieces(stream)
    one = state(fed(lambda: Sample(k), parts))  # sequential forwards into one sample
    split = state(merged(lambda: Sample(k), parts))
    for f in one:
        np.testing.assert_array_equal(split[f], one[f], err_msg=f)


def _three(stream, make):
    parts = pieces(stream)
    while len(parts) < 3:
        parts.append(parts[-1])
    return [fed(make, [part], first_forward=i) for i, part in enumerate(parts[:3])]


def _copy(stat, make):
    c = make()
    c.load_state_dict({k: v.clone() for k, v in stat.state_dict().items()})
    return c


@SETTINGS
@given(streams(), st.sampled_from(["moments", "histogram", "position", "sample"]))
def test_merge_commutative_and_associative(stream, kind):
    make = {"moments": Moments, "histogram": Histogram, "position": lambda: Position(16),
            "sample": lambda: Sample(8)}[kind]
    a, b, c = _three(stream, make)
    ab = _copy(a, make)
    ab.merge(b)
    ba = _copy(b, make)
    ba.merge(a)
    left = _copy(ab, make)
    left.merge(c)  # (a + b) + c
    bc = _copy(b, make)
    bc.merge(c)
    right = _copy(a, make)
    right.merge(bc)  # a + (b + c)
    for x, y in ((ab, ba), (left, right)):
        sx, sy = state(x), state(y)
        for f in sx:
            assert_close(sx[f], sy[f], rtol=1e-9, err_msg=f)


@SETTINGS
@given(streams())
def test_cross_split_equals_one_pass(stream):
    x, valid, keep, position, _ = stream
    xs = [x, x * 0.5 + 1, x.flip(0)]

    def run(parts):
        c = Cross(["a", "b", "c"], block_bytes=256)
        for i, (a, b) in enumerate(parts):
            t = tokens(valid[a:b], keep[a:b], position[a:b], i, a)
            for j, xj in enumerate(xs):
                c.hold(j, xj[a:b], t)
            c.finish()
        return state(c)

    n = len(x)
    one = run([(0, n)])
    bounds = [0, *stream[4], n]
    split = run(list(zip(bounds, bounds[1:])))
    for f in one:
        assert_close(split[f], one[f], rtol=1e-9, floor=1e-12, err_msg=f)
