"""Float-bit bucket geometry and quantiles from bucket counts (numpy only: the read side uses
this without importing torch). See :class:`probe.stats.histogram.Histogram` for the buckets."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

__all__ = ["Buckets", "MAX_BITS", "bucket_edges", "quantile", "render"]

#: the exponent of float32 infinities and NaNs: those buckets are never counted
_EXP_NONFINITE = 255
#: the most mantissa bits a capture keeps (``histogram_bits``: 0..10)
MAX_BITS = 10


@dataclass(frozen=True)
class Buckets:
    """The float-bit buckets of float32 values with ``m`` mantissa bits kept: the one place that
    knows their geometry.

    A value's bucket is its sign bit, its 8 exponent bits and its top ``m`` mantissa bits, i.e.
    ``bits >> (23 - m)`` of its float32 bit pattern. ``signed`` buckets (``2**(9 + m)``) hold the
    positive half first, then the negative half (the sign bit is the index's top bit); unsigned
    ones (``2**(8 + m)``, for values known to be ``>= 0`` such as norms) hold the positive half
    only. A device-side count array may carry one spare bucket past the end (index :attr:`spare`)
    that swallows excluded values and is never stored.

    Example::

        >>> b = Buckets(7)
        >>> b.count, b.half, b.shift
        (65536, 32768, 16)
    """

    m: int
    signed: bool = True
    #: buckets of one sign (``2**(8 + m)``)
    half: int = field(init=False, repr=False, compare=False)
    #: stored buckets: ``2**(9 + m)`` when signed, ``2**(8 + m)`` otherwise
    count: int = field(init=False, repr=False, compare=False)
    #: index of the device-only spare bucket (one past the stored ones)
    spare: int = field(init=False, repr=False, compare=False)
    #: right shift of a float32 bit pattern that leaves its bucket index (``23 - m``)
    shift: int = field(init=False, repr=False, compare=False)
    #: mask of the mantissa bits below the top ``m``: a value is exact at its bucket's lower edge
    #: when these are all zero (``lossless``)
    low: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # plain attributes, set once: the update reads them on every chunk
        half = 1 << (8 + self.m)
        count = half << 1 if self.signed else half
        for name, value in (("half", half), ("count", count), ("spare", count), ("shift", 23 - self.m),
                            ("low", (1 << (23 - self.m)) - 1)):
            object.__setattr__(self, name, value)

    def index(self, bits: Any) -> Any:
        """Bucket index of int32 float bit patterns ``bits`` (numpy array or torch tensor: operators
        only). Unsigned buckets take non-negative values' bits unmasked."""
        return (bits >> self.shift) & (self.count - 1) if self.signed else bits >> self.shift

    @property
    def nonfinite(self) -> tuple[slice, ...]:
        """The index ranges of the exponent-255 (inf/NaN) buckets of each sign."""
        top = _EXP_NONFINITE << self.m
        if not self.signed:
            return (slice(top, self.half),)
        return slice(top, self.half), slice(self.half + top, self.count)

    def edges(self) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper magnitude ``(lo, hi)`` of every bucket, float64, indexed like the counts.

        For negative buckets the value range is ``(-hi, -lo]``. Exponent-255 (inf/NaN) buckets get
        ``nan`` edges and are never counted.
        """
        lo, hi = _magnitude_edges(self.m)
        if self.signed:
            return np.concatenate([lo, lo]), np.concatenate([hi, hi])
        return lo.copy(), hi.copy()

    def signed_counts(self, counts: np.ndarray) -> np.ndarray:
        """Counts of one sign (``[half]``, e.g. unsigned buckets) in the signed layout (the
        negative half empty)."""
        c = np.asarray(counts, dtype=np.int64)
        return np.concatenate([c, np.zeros_like(c)])

    def magnitudes(self, counts: np.ndarray) -> np.ndarray:
        """Signed ``counts`` folded over the sign: counts per magnitude bucket, ``[half]``."""
        c = np.asarray(counts)
        return c[:self.half] + c[self.half:] if self.signed else c

    @classmethod
    def of(cls, size: int, signed: bool = True, fix: str = "pass the stored counts unchanged") -> Buckets:
        """The buckets that ``size`` counts hold.

        Raises:
            ProbeError: ``size`` is not ``2**(9 + m)`` (``2**(8 + m)`` unsigned), ``m`` in 0..23.
        """
        m = int(size).bit_length() - (10 if signed else 9)
        if not 0 <= m <= 23 or cls(m, signed).count != size:
            from ..errors import ProbeError

            raise ProbeError(f"histogram counts must have 2**({9 if signed else 8}+m) entries; got {size}; {fix}")
        return cls(m, signed)

    @staticmethod
    def is_count(size: int) -> bool:
        """Whether ``size`` counts are the signed or unsigned buckets of a capture (``m`` in
        0..:data:`MAX_BITS`)."""
        return any(Buckets(m, signed).count == size for m in range(MAX_BITS + 1) for signed in (True, False))

    def sorted(self, counts: np.ndarray, lossless: bool) -> tuple[np.ndarray, ...]:
        """Non-empty buckets of signed ``counts`` in increasing value order: ``(counts, lo, hi,
        representative value)``, each bucket as the interval ``[lo, hi)``."""
        half = self.half
        lo, hi = _magnitude_edges(self.m)
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


@lru_cache(maxsize=8)
def _magnitude_edges(m: int) -> tuple[np.ndarray, np.ndarray]:
    mag = np.arange(1 << (8 + m), dtype=np.int64)
    exponent = mag >> m
    top = (mag & (2**m - 1)).astype(np.float64)
    with np.errstate(over="ignore"):
        scale = np.ldexp(1.0, (exponent - 127).astype(np.int64))
        lo = np.where(exponent == 0, np.ldexp(top, -126 - m), scale * (1 + top / 2**m))
        hi = np.where(exponent == 0, np.ldexp(top + 1, -126 - m), scale * (1 + (top + 1) / 2**m))
    lo = np.where(exponent == _EXP_NONFINITE, np.nan, lo)
    hi = np.where(exponent == _EXP_NONFINITE, np.nan, hi)
    lo.flags.writeable = False
    hi.flags.writeable = False
    return lo, hi


def bucket_edges(mantissa_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper magnitude ``(lo, hi)`` of every signed bucket (:meth:`Buckets.edges`)."""
    return Buckets(mantissa_bits).edges()


def _sorted_buckets(counts: np.ndarray, lossless: bool) -> tuple[np.ndarray, ...]:
    """Non-empty buckets in increasing value order (:meth:`Buckets.sorted`)."""
    counts = np.asarray(counts)
    return Buckets.of(counts.shape[0]).sorted(counts, lossless)


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
