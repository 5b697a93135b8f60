"""Float-bit bucket geometry and quantiles from bucket counts (numpy only: the read side uses
this without importing torch). See :class:`probe.stats.histogram.Histogram` for the buckets."""

from __future__ import annotations

import numpy as np

__all__ = ["bucket_edges", "quantile"]


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
