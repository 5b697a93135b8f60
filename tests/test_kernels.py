"""The fused statistics path (probe.capture.kernels) against the eager statistics and float64 numpy.

The Triton kernel runs in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set here
before Triton is imported); its tests skip, with the reason, when Triton is not installed. The
torch reference of the same partial results and the merge into the statistics' states are tested
either way. Shapes are small: the interpreter runs every program in numpy.
"""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import probe  # noqa: E402
from probe.capture import kernels  # noqa: E402
from probe.capture.kernels import _reference  # noqa: E402
from probe.capture.kernels._layout import Plan  # noqa: E402
from probe.stats import Histogram, Moments, Position, Tokens  # noqa: E402

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    """Triton's own @jit helpers (tl.zeros, ...) are interpreted only if TRITON_INTERPRET=1 was set
    before triton was first imported (tests/conftest.py sets it)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


if not HAVE_TRITON:
    needs_triton = pytest.mark.skip(reason="triton is not installed (pip install 'probe[gpu]'); "
                                           "the fused kernel's interpreter tests are skipped")
elif not _interpreting():
    needs_triton = pytest.mark.skip(reason="triton was imported before TRITON_INTERPRET=1 was set; "
                                           "run pytest with TRITON_INTERPRET=1 in the environment")
else:
    needs_triton = pytest.mark.skipif(False, reason="")
# small blocks, so that tiny tensors still span several row, channel and sub-tile blocks
PLAN = Plan(rows=8, sub=4, block_d=16, dense_bins=512)


def make_tokens(b: int, t: int, pad: int = 2, skip_first: int = 1, rows_seen: int = 0) -> Tokens:
    """Left padding of ``pad`` tokens in row 0, positions from the mask, token ids, keep as capture builds it."""
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, :pad] = 0
    valid = mask.bool()
    position = mask.cumsum(-1) - 1
    token = torch.arange(b * t).view(b, t) * 7 % 97
    row = (rows_seen + torch.arange(b)).unsqueeze(1).expand(b, t)
    keep = valid & (position >= skip_first)
    return Tokens(valid.reshape(-1), keep.reshape(-1), position.reshape(-1), row.reshape(-1),
                  token.reshape(-1), 1, 0, 0, -1, {})


def activations(g: int, n: int, d: int, dtype=torch.float32, special: bool = True, seed: int = 0) -> torch.Tensor:
    """Heavy-ish tailed data with a massive value, exact zeros, subnormals and (optionally) NaN/inf."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(g, n, d, generator=gen) * torch.linspace(0.05, 3.0, d)
    x[:, 3, 1] = 250.0  # a massive activation
    x[:, 5, :3] = 0.0
    x[:, 6, 2] = 1e-40  # float32 subnormal
    if special:
        x[0, 4, 0] = float("nan")
        x[0, 7, 3] = float("inf")
        x[-1, 8, 5] = float("-inf")
        x[-1, 9, :] = float("nan")  # a token with no finite value
    return x.to(dtype)


def eager(kind: str, x: torch.Tensor, tokens: Tokens, chunks: int = 1, **kw):
    cls = {"moments": Moments, "histogram": Histogram, "position": Position}[kind]
    stats = [cls(**kw) for _ in range(x.shape[0])]
    n = x.shape[1]
    step = -(-n // chunks)
    for a in range(0, n, step):
        cls.update_group(stats, x[:, a:a + step].float(), tokens.slice(a, a + step))
    return stats


def fused_all(x: torch.Tensor, tokens: Tokens, partials, chunks: int = 1, mantissa_bits: int = 7,
              max_positions: int = 10) -> dict[str, list]:
    """The fused path, as capture runs it: per chunk one ``partials(x, keep, plan)`` call, merged
    into fresh moments, histogram and position statistics of every site."""
    pers = [{"moments": Moments(), "position": Position(max_positions), "histogram": Histogram(mantissa_bits),
             "sample": None} for _ in range(x.shape[0])]
    n = x.shape[1]
    step = -(-n // chunks)
    original = kernels._partials
    plan = Plan(mantissa_bits=mantissa_bits, rows=8, sub=4, block_d=16, dense_bins=512)
    kernels._partials = lambda xc, keep, _plan: partials(xc, keep, plan)
    try:
        for a in range(0, n, step):
            rest = kernels.update(pers, x[:, a:a + step], tokens.slice(a, a + step))
            assert rest == ["sample"]
    finally:
        kernels._partials = original
    return {k: [per[k] for per in pers] for k in ("moments", "position", "histogram")}


def fused(kind: str, x: torch.Tensor, tokens: Tokens, partials, chunks: int = 1, **kw):
    return fused_all(x, tokens, partials, chunks, **kw)[kind]


def triton_partials(x, keep, plan):
    from probe.capture.kernels import _triton

    return _triton.partials(x, keep, plan)


EXACT_MOMENTS = ("n", "min", "max", "nan", "posinf", "neginf", "tokens", "absmax", "absmax_at", "large")


def assert_moments_match(got: list, want: list, rtol: float = 1e-6) -> None:
    for a, b in zip(got, want):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for f in sa:
            assert sa[f].dtype == sb[f].dtype and sa[f].shape == sb[f].shape, f
        for f in EXACT_MOMENTS:
            torch.testing.assert_close(sa[f], sb[f], rtol=0, atol=0, msg=f)
        scale = sb["m2"].clamp(min=1e-30)
        torch.testing.assert_close(sa["mean"], sb["mean"], rtol=1e-12, atol=1e-12 * sb["m2"].div(sb["n"].clamp(min=1)).sqrt().max().item())
        torch.testing.assert_close(sa["m2"], sb["m2"], rtol=rtol, atol=0)
        for f, p in (("m3", 1.5), ("m4", 2.0)):  # relative to M2 ** p / n ** (p - 1): skew/kurt units
            ref = scale.pow(p) / sb["n"].clamp(min=1).pow(p - 1)
            assert torch.all((sa[f] - sb[f]).abs() <= rtol * 10 * ref), f


def numpy_moments(x: torch.Tensor, keep: torch.Tensor) -> dict:
    """Float64 numpy truth for one site ``x[n, D]``: per-channel over kept finite values."""
    a = x.double().numpy()[keep.numpy()]
    out = {"n": [], "mean": [], "m2": [], "m3": [], "m4": [], "min": [], "max": []}
    for c in range(a.shape[1]):
        v = a[:, c][np.isfinite(a[:, c])]
        mu = v.mean()
        out["n"].append(len(v))
        out["mean"].append(mu)
        for p in (2, 3, 4):
            out[f"m{p}"].append(((v - mu) ** p).sum())
        out["min"].append(v.min())
        out["max"].append(v.max())
    return {k: np.array(v) for k, v in out.items()}


# --------------------------------------------------------------------------- the torch reference
def assert_states_match(got: dict, x, tok, chunks: int, rtol: float, max_positions: int = 10) -> None:
    assert_moments_match(got["moments"], eager("moments", x, tok, chunks), rtol=rtol)
    for a, b in zip(got["histogram"], eager("histogram", x, tok, chunks)):
        assert torch.equal(a.s["counts"], b.s["counts"]) and torch.equal(a.s["lossless"], b.s["lossless"])
    for a, b in zip(got["position"], eager("position", x, tok, chunks, max_positions=max_positions)):
        for f in ("tokens", "n", "absmax", "overflow"):
            assert torch.equal(a.s[f], b.s[f]), f
        torch.testing.assert_close(a.s["mean"], b.s["mean"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a.s["m2"], b.s["m2"], rtol=rtol, atol=0)


@pytest.mark.parametrize("chunks", [1, 3])
def test_reference_path_equals_eager(chunks):
    x = activations(3, 26, 37)
    tok = make_tokens(2, 13)
    assert_states_match(fused_all(x, tok, _reference.partials, chunks), x, tok, chunks, rtol=1e-6)


def test_numpy_reference_of_moments():
    x = activations(2, 26, 37)
    tok = make_tokens(2, 13)
    stats = fused("moments", x, tok, _reference.partials)
    for g, stat in enumerate(stats):
        want = numpy_moments(x[g], tok.keep)
        s = {k: v.numpy() for k, v in stat.state_dict().items()}
        np.testing.assert_array_equal(s["n"], want["n"])
        np.testing.assert_array_equal(s["min"], want["min"].astype(np.float32))
        np.testing.assert_array_equal(s["max"], want["max"].astype(np.float32))
        np.testing.assert_allclose(s["mean"], want["mean"], rtol=1e-12, atol=1e-13)
        for p in (2, 3, 4):
            np.testing.assert_allclose(s[f"m{p}"], want[f"m{p}"], rtol=1e-9, atol=1e-9 * want["m2"].max() ** (p / 2))


def test_dispatch_stays_eager_on_cpu_by_default():
    assert not kernels.wanted(torch.zeros(1, 2, 3))
    kernels._FORCE = True
    try:
        assert kernels.wanted(torch.zeros(1, 2, 3)) == (HAVE_TRITON and os.environ.get("TRITON_INTERPRET") == "1")
    finally:
        kernels._FORCE = False


# ----------------------------------------------------------------------- the kernel (interpreter)
@needs_triton
@pytest.mark.parametrize("dtype, shape", [(torch.float32, (2, 18, 21)), (torch.bfloat16, (1, 18, 21)),
                                          (torch.float16, (1, 5, 16)), (torch.float32, (1, 1, 5))])
def test_kernel_partials_equal_reference(dtype, shape):
    x = activations(*shape, dtype=dtype) if shape[1] > 9 else torch.randn(*shape).to(dtype)
    tok = make_tokens(2, shape[1] // 2) if shape[1] % 2 == 0 else make_tokens(1, shape[1], pad=1)
    got = triton_partials(x, tok.keep, PLAN)
    want = _reference.partials(x, tok.keep, PLAN)
    for f in ("ext", "large", "best", "best_at", "bad", "hist", "lossy", "rowmax"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f
    # block counts exact; means and central sums within float32 rounding of the powers
    torch.testing.assert_close(got.mom[:, :, 0], want.mom[:, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(got.tok[:, :, 0], want.tok[:, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(got.mom[:, :, 1], want.mom[:, :, 1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.tok[:, :, 1], want.tok[:, :, 1], rtol=1e-12, atol=1e-12)
    for k in (2, 3, 4):
        scale = want.mom[:, :, 2].clamp(min=1e-30).pow(k / 2)
        assert torch.all((got.mom[:, :, k] - want.mom[:, :, k]).abs() <= 1e-5 * scale + 1e-30), k
    assert torch.all((got.tok[:, :, 2] - want.tok[:, :, 2]).abs() <= 1e-5 * want.tok[:, :, 2] + 1e-30)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_states_equal_eager(dtype):
    x = activations(2, 18, 21, dtype=dtype)
    tok = make_tokens(2, 9, pad=3, skip_first=2)
    got = fused_all(x, tok, triton_partials, chunks=2, max_positions=6)  # positions past 6 overflow
    assert_states_match(got, x, tok, 2, rtol=1e-5, max_positions=6)
    assert all(bool(h.s["lossless"]) == (dtype == torch.bfloat16) for h in got["histogram"])


@needs_triton
def test_kernel_histogram_mantissa_bits_and_outliers():
    # values far outside the dense window (atomics) and inside it, several m
    x = torch.tensor([1e-30, -3e-20, 0.3, -0.3, 0.01, 7.0, -1e6, 3e38, 0.0, -0.0], dtype=torch.float32)
    x = x.view(1, 2, 5)
    tok = Tokens(torch.ones(2, dtype=torch.bool), torch.tensor([True, True]), torch.arange(2),
                 torch.arange(2), torch.zeros(2, dtype=torch.long), 1)
    for m in (0, 10):
        h_fused = fused("histogram", x, tok, triton_partials, mantissa_bits=m)[0]
        h_eager = eager("histogram", x, tok, mantissa_bits=m)[0]
        assert torch.equal(h_fused.s["counts"], h_eager.s["counts"]), m
        assert int(h_fused.s["counts"].sum()) == 10


@needs_triton
def test_capture_through_the_fused_path_equals_eager(tiny):
    """The dispatch in StatEngine._run_stats: a forced fused capture equals an eager one."""
    model = tiny("llama")
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with probe.capture(model, stats=("moments", "histogram", "position"), skip_first=1, strict=True) as ref:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    kernels._FORCE, kernels._PLAN = True, dict(rows=8, sub=4, block_d=16, dense_bins=512)
    launches = []
    original = kernels._partials
    kernels._partials = lambda *a: (launches.append(a[0].shape), original(*a))[1]
    try:
        with probe.capture(model, stats=("moments", "histogram", "position"), skip_first=1, strict=True) as run:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
    finally:
        kernels._FORCE, kernels._PLAN, kernels._partials = False, {}, original
    assert len(launches) == len(ref.sites)  # one launch per site on CPU (no grouping there)
    for site in ref.sites:
        a, b = run.result.total.sites[site], ref.result.total.sites[site]
        np.testing.assert_array_equal(a["histogram"]["counts"], b["histogram"]["counts"])
        for f in EXACT_MOMENTS:
            np.testing.assert_array_equal(a["moments"][f], b["moments"][f], err_msg=f)
        for f in ("tokens", "n", "absmax", "overflow"):
            np.testing.assert_array_equal(a["position"][f], b["position"][f], err_msg=f)
        np.testing.assert_allclose(run[site].std, ref[site].std, rtol=1e-6)
        np.testing.assert_allclose(a["position"]["m2"], b["position"]["m2"], rtol=1e-5)
