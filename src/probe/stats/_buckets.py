"""Float-bit bucket geometry and quantiles from bucket counts (numpy only: the read side uses
this without importing torch). See :class:`probe.stats.histogram.Histogram` for the buckets."""

from __future__ import annotations

import numpy as np

__all__ = ["bucket_edges", "quantile", "render"]


def bucket_edges(mantissa_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper magnitude ``(lo, hi)`` of every bucket, float64, indexed like ``counts``.

    The sign bit is the top bit of the index; for negative buckets the value range is
    ``(-hi, -lo]``. Exponent 255 (inf/NaN) buckets get ``nan`` edges and are never counted.
    """
    m = mantissa_bits
    mag = np.arange(2 ** (8 + m), dtype=np.int64)
    exponent = mag >> m
    top = (mag & (2**m - 1)).astype(np.float64)
    with np.errstate(over="ignore"):
        scale = np.ldexp(1.0, (exponent - 127).astype(np.int64))
        lo = np.where(exponent == 0, np.ldexp(top, -126 - m), scale * (1 + top / 2**m))
        hi = np.where(exponent == 0, np.ldexp(top + 1, -126 - m), scale * (1 + (top + 1) / 2**m))
    lo = np.where(exponent == 255, np.nan, lo)
    hi = np.where(exponent == 255, np.nan, hi)
    return np.concatenate([lo, lo]), np.concatenate([hi, hi])


def _sorted_buckets(counts: np.ndarray, lossless: bool):
    """Non-empty buckets in increasing value order: (counts, lo, hi, representative value)."""
    size = counts.shape[0]
    m = int(np.log2(size)) - 9
    half = size // 2
    lo, hi = bucket_edges(m)
    lo, hi = lo[:half], hi[:half]
    if lossless:
        rep = lo
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            rep = np.where(lo > 0, 2 * lo * hi / (lo + hi), lo)
    neg = counts[half:][::-1]
    pos = counts[:half]
    c = np.concatenate([neg, pos]).astype(np.int64)
    # negative buckets span (-hi, -lo]; as intervals [a, b) for the CDF that is [-hi, -lo)
    a = np.concatenate([-hi[::-1], lo])
    b = np.concatenate([-lo[::-1], hi])
    v = np.concatenate([-rep[::-1], rep])
    nz = c > 0
    return c[nz], a[nz], b[nz], v[nz]


def quantile(counts: np.ndarray, lossless: bool, q):
    """Quantiles from bucket counts, with numpy's default (linear) interpolation."""
    qs = np.atleast_1d(np.asarray(q, dtype=np.float64))
    if np.any((qs < 0) | (qs > 1)) or np.any(np.isnan(qs)):
        from ..errors import ProbeError

        raise ProbeError(f"quantile q must lie in [0, 1]; got {q!r}; pass e.g. 0.999")
    c, _, _, v = _sorted_buckets(np.asarray(counts), lossless)
    n = int(c.sum())
    if n == 0:
        out = np.full(qs.shape, np.nan)
    else:
        cum = np.cumsum(c)
        virtual = (n - 1) * qs
        prev = np.floor(virtual).astype(np.int64)
        nxt = np.minimum(prev + 1, n - 1)
        gamma = virtual - prev
        a = v[np.searchsorted(cum, prev, side="right")]
        b = v[np.searchsorted(cum, nxt, side="right")]
        diff = b - a
        out = np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)
    return float(out[0]) if np.ndim(q) == 0 else out

def render(counts: np.ndarray, lossless: bool, bins, range=None,
           limits: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Histogram ``(counts float64 [B], edges [B + 1])`` from the bucket CDF.

    ``bins`` is a number of linear bins over ``range`` or, like ``numpy.histogram``, an increasing
    array of edges (then ``range`` is ignored). Values are spread uniformly within a bucket, or sit
    at the bucket's exact value when ``lossless``. ``limits``, the exact ``(min, max)`` of the
    data when known, cuts the first and last buckets to where values can lie, so that edges
    spanning ``[min, max]`` total the count exactly. Like ``numpy.histogram``, the last bin
    includes its right edge.
    """
    c, a, b, v = _sorted_buckets(np.asarray(counts), lossless)
    if limits is not None and len(c) and np.isfinite(limits[0]) and np.isfinite(limits[1]):
        # every value lies in [min, max]: a bucket reaching past them holds its mass inside
        lo_x, hi_x = float(limits[0]), float(limits[1])
        a, b = np.clip(a, lo_x, hi_x), np.clip(b, lo_x, hi_x)
        v = np.clip(v, lo_x, hi_x)
    if np.ndim(bins) == 1:
        edges = np.asarray(bins, dtype=np.float64)
        if edges.size < 2 or not np.all(np.isfinite(edges)) or np.any(np.diff(edges) <= 0):
            from ..errors import ProbeError

            raise ProbeError(f"histogram bins must be an int or 2+ finite increasing edges; got {bins!r}; "
                             "pass e.g. bins=100 or bins=numpy.linspace(-10, 10, 101)")
    else:
        if range is None:
            range = (float(a[0]), float(b[-1])) if len(c) else (0.0, 1.0)
        lo, hi = float(range[0]), float(range[1])
        if not (np.isfinite(lo) and np.isfinite(hi)) or hi < lo:
            from ..errors import ProbeError

            raise ProbeError(f"histogram range must be finite with low <= high; got {range!r}; pass e.g. (-10, 10)")
        if hi == lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, int(bins) + 1)
    if lossless:
        below = np.array([c[v < e].sum() for e in edges], dtype=np.float64)
        below[-1] = c[v <= edges[-1]].sum()
    else:
        point = b <= a  # a bucket cut to one value (or a zero-width bucket): all its mass sits at a
        width = np.where(point, 1.0, b - a)
        frac = np.clip((edges[:, None] - a[None, :]) / width[None, :], 0.0, 1.0)
        frac = np.where(point[None, :], (edges[:, None] > a[None, :]).astype(np.float64), frac)
        below = (frac * c[None, :]).sum(1)
        below[-1] += c[point & (a == edges[-1])].sum()
    return np.diff(below), edges
