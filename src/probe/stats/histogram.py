"""A histogram over float-bit buckets: the quantile sketch with a relative-error guarantee.

A float32 value's bucket is its sign bit, its 8 exponent bits and the top ``m`` mantissa bits,
i.e. ``bits >> (23 - m)``. A bucket of a normal number spans ``[lo, lo * (1 + 2**-m))``, so
reporting ``2 lo hi / (lo + hi)`` is off by at most ``2**-m / (2 + 2**-m)`` of the true value
(0.39 % at ``m = 7``). When every value seen had no mantissa bits below the top ``m`` (bf16 data
at ``m >= 7``), ``lossless`` is set and the bucket's lower edge is the exact value.

State: ``counts`` int64 ``[2**(9 + m)]`` (exact far past 2**24: int64 and ``index_add_``, never
float ``histc``), ``lossless`` bool scalar. NaN and ±Inf are not counted here (the moments count
them). Zeros and subnormals are counted exactly, but the subnormals' buckets (exponent 0) are
linear, ``2**-(126 + m)`` wide: there the bound is that absolute width, not the relative one
(docs/statistics.md, "Histogram and quantiles").
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import SPECS, StatBase, Tokens, dense, scratch, stacked
from ._buckets import MAX_BITS, Buckets, bucket_edges, quantile, render  # noqa: F401 (re-exported)

__all__ = ["Histogram", "bucket_edges", "quantile", "render"]


class Histogram(StatBase):
    """Counts over float-bit buckets (``B = 2**(9 + m)``, ``m = mantissa_bits``).

    Fields (declared in :data:`probe.stats._state.HISTOGRAM`; reduction in brackets): ``counts``
    i64 ``[B]``: finite kept values per bucket (index = ``bits >> (23 - m)`` of the float32 value;
    the exponent-255 buckets are always 0) [``sum``]; ``lossless`` bool: no value had mantissa
    bits below the top ``m``, so bucket lower edges are exact values [``all``].
    """

    name = "histogram"
    chunked = True
    spec = SPECS["histogram"]

    def __init__(self, mantissa_bits: int = 7) -> None:
        super().__init__()
        if not 0 <= mantissa_bits <= MAX_BITS:
            from ..errors import ProbeError

            raise ProbeError(
                f"histogram_bits must be an int in 0..10 (2**(9+m) buckets); got {mantissa_bits!r}; "
                "use 7 (0.39 % quantile error) unless you need finer"
            )
        self.buckets = Buckets(mantissa_bits)

    @classmethod
    def create(cls, *, histogram_bits: int, max_positions: int, sample_size: int) -> Histogram:
        return cls(histogram_bits)

    @property
    def m(self) -> int:
        return self.buckets.m

    def dims(self, x: Tensor) -> dict[str, int]:
        return {"B": self.buckets.count}

    def _adopt(self, dims: dict[str, int]) -> None:
        self.buckets = Buckets.of(dims["B"])

    @classmethod
    def update_group(cls, stats: list, x: Tensor, tokens: Tokens) -> None:
        """Fold ``x[G, n, D]`` into ``G`` histograms of equal ``m`` with one ``index_add_``."""
        if not cls._ready(stats, x):
            return
        b = stats[0].buckets
        if any(stat.buckets != b for stat in stats):  # pragma: no cover - one capture uses one m
            for g, stat in enumerate(stats):
                cls.update_group([stat], x[g:g + 1], tokens)
            return
        span = b.spare + 1  # each site's block: the buckets and the spare
        g = len(stats)
        if g == 1 and cls._dense_update(stats[0], x, tokens):
            return
        bits = x.contiguous().view(torch.int32)
        # NaN and +-inf land in exponent-255 buckets, which are dropped when the state is read;
        # excluded tokens go to the spare bucket at the end of each site's block
        index = torch.where(tokens.keep.unsqueeze(1), b.index(bits), b.spare)
        if g == 1:
            counts = stats[0].s["counts"]
        else:
            index = index + (torch.arange(g, device=x.device, dtype=index.dtype) * span).view(g, 1, 1)
            counts = stacked([stat.s["counts"] for stat in stats]).view(-1)
        # one shared int64 one, expanded: no activation-sized buffer of ones
        one = torch.ones((), dtype=torch.int64, device=x.device).expand(index.numel())
        counts.index_add_(0, index.flatten(), one)
        # lossless is judged on every value of the chunk (excluded ones too): conservative
        exact = torch.count_nonzero((bits & b.low).view(g, -1), dim=1) == 0
        if g == 1:
            stats[0].s["lossless"] = stats[0].s["lossless"] & exact[0]
            return
        lossless = (stacked([stat.s["lossless"] for stat in stats]) & exact).unbind(0)
        for i, (stat, rows) in enumerate(zip(stats, counts.view(g, span).unbind(0))):
            stat.s["counts"] = rows
            stat.s["lossless"] = lossless[i]

    @staticmethod
    def _dense_update(stat: Histogram, x: Tensor, tokens: Tokens) -> bool:
        """The update of one site through its :class:`~probe.stats._base.Dense` view (CPU, kept
        values all finite): ``bincount`` of the bucket indices in a reused int32 buffer, with no
        mask; the lossless test runs only while it still holds. ``False`` when the view is absent."""
        view = dense(x, tokens)
        if view is None:
            return False
        b = stat.buckets
        size = b.count
        bits = view.x.view(torch.int32)
        index = scratch("histogram.index", bits.shape, torch.int32)
        torch.bitwise_and(torch.bitwise_right_shift(bits, b.shift, out=index), size - 1, out=index)
        counts = stat.s["counts"]
        counts[:size] += torch.bincount(index.view(-1), minlength=size)
        if bool(stat.s["lossless"]):  # a host read: free on CPU
            low = torch.bitwise_and(bits, b.low, out=index)
            stat.s["lossless"] = stat.s["lossless"] & (torch.count_nonzero(low) == 0)
        return True

    def state_dict(self) -> dict[str, Tensor]:
        out = super().state_dict()
        if out:
            # NaN and +-inf (exponent 255) are counted by the moments, not here
            for dead in self.buckets.nonfinite:
                out["counts"][dead] = 0
        return out
