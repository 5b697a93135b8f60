"""What per-tensor FP8 E4M3 and INT8 quantization would do to a site, read from its histogram.

Recipe::

    from probe.present.quant import report
    r = probe.load("linear.h5")
    rows = report(r, "fp8")                        # at each site's per-tensor amax scale
    rows = report(r, "int8", scale=0.05)
    rows[0]["clip"], rows[0]["flush"], rows[0]["large"]

Symmetric per-tensor quantization with scale ``s`` maps ``x`` to ``round(x / s)`` on the format's
grid, saturating at ``±qmax``:

- **clip**: ``|x| > qmax · s`` (the value lies outside the representable range; FP8 E4M3
  ``qmax = 448``, INT8 symmetric ``qmax = 127``). At the default scale ``s = amax / qmax``
  nothing clips.
- **flush** to zero: ``0 < |x| <= t · s`` where ``t`` is half the smallest positive step
  (FP8 E4M3: half the smallest subnormal, ``t = 2**-10``; INT8: ``t = 0.5``). Round-half-to-even
  sends the tie ``|x| = t · s`` to zero in both formats, so it is included.
- **large**: ``|x| >= 6``, the outlier threshold of Dettmers et al. (LLM.int8(), 2022).

All three are counts of values above or below a threshold, read from the float-bit histogram
(``probe.stats.histogram``): a float32 ``|x|`` lies in a bucket ``[lo, hi)`` whose edges are
float32 numbers with their low ``23 - m`` mantissa bits zero. A comparison with a real threshold
``T`` is first turned into one with the float32 boundary ``U`` (the smallest float32 above
``T`` for ``> T`` and ``<= T``; ``U = T`` for ``>= 6``); then every bucket lies wholly on one
side of ``U`` except at most one, the bucket with ``lo < U < hi``. The count is therefore given
as a bound ``[low, high]`` whose width is that one bucket's count, and it is **exact** when

- ``U`` is a bucket edge (``U`` has no mantissa bits below the top ``m``; ``6 = 1.5 · 2**2`` is
  one for every ``m >= 1``), or the bucket holding ``U`` is empty;
- the histogram is ``lossless`` (every value had no mantissa bits below the top ``m``, e.g. bf16
  activations with ``m >= 7``): each bucket then holds the single value ``lo``;
- for clipping, ``U`` is above the site's exact ``absmax`` (so at the default amax scale the clip
  fraction is exactly 0).

Exact zeros and float32 subnormals below ``2**-(126 + m)`` share bucket 0; a flush count excludes
exact zeros, so bucket 0 widens the flush bound unless the histogram is lossless (where bucket 0
holds only zeros). Fractions are of the finite kept values the histogram counted (NaN and ±inf
are counted by the moments, never here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ..errors import ProbeError

__all__ = ["QuantFormat", "FORMATS", "LARGE", "Bound", "count_at_least", "fractions", "report"]

LARGE = 6.0


@dataclass(frozen=True)
class QuantFormat:
    """A symmetric per-tensor quantization format: largest magnitude ``qmax`` and flush
    threshold ``flush`` (half the smallest positive step), both in units of the scale."""

    name: str
    qmax: float
    flush: float


FORMATS: dict[str, QuantFormat] = {
    "fp8": QuantFormat("fp8_e4m3", 448.0, 2.0**-10),
    "int8": QuantFormat("int8", 127.0, 0.5),
}


@dataclass(frozen=True)
class Bound:
    """A count known to lie in ``[low, high]`` (``low == high``: exact)."""

    low: int
    high: int

    @property
    def exact(self) -> bool:
        return self.low == self.high


def _f32_above(t: float) -> np.float32:
    """The smallest float32 strictly greater than ``t`` (float64)."""
    f = np.float32(t)
    if float(f) <= t:
        f = np.nextafter(f, np.float32(np.inf))
    return f


def _magnitudes(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Magnitude buckets: counts folded over the sign, their float64 edges ``lo, hi`` and ``m``."""
    from ..stats._buckets import Buckets

    counts = np.asarray(counts, dtype=np.int64)
    buckets = Buckets.of(counts.shape[0], fix="pass SiteView.histogram_counts unchanged")
    half, m = buckets.half, buckets.m
    lo, hi = buckets.edges()
    mag = buckets.magnitudes(counts)
    finite = np.isfinite(lo[:half])
    return mag[finite], lo[:half][finite], hi[:half][finite], m


def count_at_least(counts: np.ndarray, lossless: bool, u: float | np.floating) -> Bound:
    """Bound on the number of histogram values with ``|x| >= u`` (``u`` a float32 number).

    Exact when ``u`` is a bucket edge, the bucket holding ``u`` is empty, or ``lossless``.

    Args:
        counts: raw float-bit histogram counts ``[2**(9+m)]`` (``SiteView.histogram_counts``).
        lossless: the histogram's ``lossless`` flag.
        u: the threshold on ``|x|`` (activation units), taken as float32.

    Returns:
        A :class:`Bound` ``(low, high)`` on the count.

    Example:
        >>> b = count_at_least(run[0].histogram_counts, False, 0.0)
        >>> b.low == b.high == run[0].count
        True
    """
    mag, lo, hi, _ = _magnitudes(counts)
    u = float(np.float32(u))
    if lossless:
        n = int(mag[lo >= u].sum())
        return Bound(n, n)
    sure = int(mag[lo >= u].sum())
    inside = int(mag[(lo < u) & (u < hi)].sum())
    return Bound(sure, sure + inside)


def fractions(counts: np.ndarray, lossless: bool, *, clip_above: float, flush_at_or_below: float,
              absmax: float | None = None) -> dict[str, Any]:
    """Counts of values that would clip (``|x| > clip_above``), flush to zero
    (``0 < |x| <= flush_at_or_below``) and are large (``|x| >= 6``), as :class:`Bound`.

    Args:
        counts: raw float-bit histogram counts ``[2**(9+m)]`` (``SiteView.histogram_counts``).
        lossless: the histogram's ``lossless`` flag (bucket lower edges are the exact values).
        clip_above, flush_at_or_below: thresholds on ``|x|`` in the activations' units.
        absmax: the exact largest ``|x|`` (``SiteView.absmax``), which makes the clip count
            exact whenever the clip threshold is at or above it.

    Returns:
        ``{"total": int, "clip": Bound, "flush": Bound, "large": Bound}``.

    Example:
        >>> s = run[0]
        >>> f = fractions(s.histogram_counts, False, clip_above=s.absmax, flush_at_or_below=0.0, absmax=s.absmax)
        >>> f["total"] == s.count, f["clip"]
        (True, Bound(low=0, high=0))
    """
    mag, lo, hi, _ = _magnitudes(counts)
    total = int(mag.sum())
    u_clip = _f32_above(float(clip_above))
    if absmax is not None and np.isfinite(absmax) and float(u_clip) > absmax:
        clip = Bound(0, 0)
    else:
        clip = count_at_least(counts, lossless, u_clip)
    above = count_at_least(counts, lossless, _f32_above(float(flush_at_or_below)))
    zeros = int(mag[0])  # bucket 0: exact zeros and subnormals below 2**-(126+m)
    low = total - above.high - zeros
    high = total - above.low - (zeros if lossless else 0)
    flush = Bound(max(0, low), max(0, high))
    large = count_at_least(counts, lossless, np.float32(LARGE))
    return {"total": total, "clip": clip, "flush": flush, "large": large}


def _scale_for(name: str, scale, amax: float, qmax: float) -> float:
    if scale is None:
        return amax / qmax
    value = scale.get(name) if isinstance(scale, dict) else scale
    if value is None:
        return amax / qmax
    value = float(value)
    if not (np.isfinite(value) and value > 0):
        raise ProbeError(f"scale for {name!r} must be a finite number > 0; got {value!r}; "
                         "pass e.g. amax / 448 for FP8 E4M3")
    return value


def _first_token(site) -> dict[str, Any] | None:
    """Whether the first token holds the site's largest |x|, and by how much it leads the rest."""
    at = site.absmax_at
    if at.get("position") != 0:
        return None
    out: dict[str, Any] = {"channel": at.get("channel"), "absmax": site.absmax, "ratio": None}
    if not site.has("position"):
        return out
    absmax = site.position.absmax
    rest = absmax[1:][np.isfinite(absmax[1:])]
    if len(rest) and rest.max() > 0:
        out["ratio"] = float(absmax[0] / rest.max())
    return out


def report(run, fmt: Literal["fp8", "int8"] = "fp8", *, scale: float | dict[str, float] | None = None,
           sites: list[str] | None = None) -> list[dict[str, Any]]:
    """Per-site clip, flush-to-zero and ``|x| >= 6`` fractions for per-tensor quantization.

    Args:
        run: a :class:`probe.results.run.Run` (or a finished capture) with ``histogram`` and ``moments``.
        fmt: ``"fp8"`` (E4M3, ``qmax = 448``) or ``"int8"`` (symmetric, ``qmax = 127``).
        scale: the quantization scale, one for all sites or ``{site: scale}``; by default each
            site's own ``absmax / qmax``.
        sites: the sites to report (default: every site with a histogram).

    Returns:
        One dict per site: ``site, module, format, count, amax, scale, clip, flush, large``
        (each ``[low, high]`` fractions), ``clip_exact, flush_exact, large_exact`` and
        ``first_token`` (``None``, or the channel and lead ratio when the first token holds
        the site's largest magnitude).

    Raises:
        ProbeError: an unknown format, a bad scale, or a site without a histogram.

    Example:
        >>> row = report(run, "int8")[0]
        >>> row["format"], row["clip"], row["count"] == run[0].count
        ('int8', [0.0, 0.0], True)
    """
    if fmt not in FORMATS:
        raise ProbeError(f"quantization format must be one of {sorted(FORMATS)}; got {fmt!r}; pass 'fp8' or 'int8'")
    q = FORMATS[fmt]
    run = run.result if getattr(run, "result", None) is not None else run
    names = list(sites) if sites is not None else [n for n in run.sites if run[n].has("histogram")]
    rows = []
    for name in names:
        s = run[name]
        counts = s.histogram_counts
        lossless = bool(_lossless(run, name))
        amax = float(s.absmax)
        if not s.count or not np.isfinite(amax) or amax <= 0:
            rows.append({"site": name, "module": s.module, "format": q.name, "count": int(s.count),
                         "amax": None, "scale": None, "clip": None, "flush": None, "large": None,
                         "clip_exact": None, "flush_exact": None, "large_exact": None, "first_token": None})
            continue
        sc = _scale_for(name, scale, amax, q.qmax)
        f = fractions(counts, lossless, clip_above=q.qmax * sc, flush_at_or_below=q.flush * sc, absmax=amax)
        n = f["total"]
        rows.append({
            "site": name, "module": s.module, "format": q.name, "count": n, "amax": amax, "scale": sc,
            "clip": [f["clip"].low / n, f["clip"].high / n], "clip_exact": f["clip"].exact,
            "flush": [f["flush"].low / n, f["flush"].high / n], "flush_exact": f["flush"].exact,
            "large": [f["large"].low / n, f["large"].high / n], "large_exact": f["large"].exact,
            "first_token": _first_token(s),
        })
    return rows


def _lossless(run, name: str) -> bool:
    """The histogram's ``lossless`` flag; ``False`` (always a valid bound) when unavailable."""
    s = run[name]
    return s.histogram_lossless if s.has("histogram") else False
