"""A histogram over float-bit buckets: the quantile sketch with a relative-error guarantee.

A float32 value's bucket is its sign bit, its 8 exponent bits and the top ``m`` mantissa bits,
i.e. ``bits >> (23 - m)``. A bucket of a normal number spans ``[lo, lo * (1 + 2**-m))``, so
reporting ``2 lo hi / (lo + hi)`` is off by at most ``2**-m / (2 + 2**-m)`` of the true value
(0.39 % at ``m = 7``). When every value seen had no mantissa bits below the top ``m`` (bf16 data
at ``m >= 7``), ``lossless`` is set and the bucket's lower edge is the exact value.

State: ``counts`` int64 ``[2**(9 + m)]`` (exact far past 2**24: int64 and ``index_add_``, never
float ``histc``), ``lossless`` bool scalar. NaN and ±Inf are not counted here (the moments count
them). Zeros and subnormals are counted exactly.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._base import SPECS, StatBase, Tokens, dense, scratch
from ._buckets import bucket_edges, quantile, render  # noqa: F401 (re-exported)

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
    _fields = spec.names

    def __init__(self, mantissa_bits: int = 7) -> None:
        super().__init__()
        if not 0 <= mantissa_bits <= 10:
            from ..errors import ProbeError

            raise ProbeError(
                f"histogram_bits must be an int in 0..10 (2**(9+m) buckets); got {mantissa_bits!r}; "
                "use 7 (0.39 % quantile error) unless you need finer"
            )
        self.m = mantissa_bits

    def _init(self, device: torch.device) -> None:
        self._state = {
            # one spare bucket at the end swallows masked and non-finite values
            "counts": torch.zeros(2 ** (9 + self.m) + 1, dtype=torch.int64, device=device),
            "lossless": torch.ones((), dtype=torch.bool, device=device),
        }

    def _init_like(self, x: Tensor) -> None:
        self._init(x.device)

    def update(self, x: Tensor, tokens: Tokens) -> None:
        Histogram.update_group([self], x.unsqueeze(0), tokens)

    @classmethod
    def update_group(cls, stats: list, x: Tensor, tokens: Tokens) -> None:
        """Fold ``x[G, n, D]`` into ``G`` histograms of equal ``m`` with one ``index_add_``."""
        if not cls._ready(stats, x):
            return
        m = stats[0].m
        if any(stat.m != m for stat in stats):  # pragma: no cover - one capture uses one m
            for g, stat in enumerate(stats):
                cls.update_group([stat], x[g:g + 1], tokens)
            return
        size = 2 ** (9 + m)
        g = len(stats)
        if g == 1 and cls._dense_update(stats[0], x, tokens):
            return
        bits = x.contiguous().view(torch.int32)
        # NaN and +-inf land in exponent-255 buckets, which are dropped when the state is read;
        # excluded tokens go to the spare bucket at the end of each site's block
        index = torch.where(tokens.keep.unsqueeze(1), (bits >> (23 - m)) & (size - 1), size)
        if g == 1:
            counts = stats[0].s["counts"]
        else:
            index = index + (torch.arange(g, device=x.device, dtype=index.dtype) * (size + 1)).view(g, 1, 1)
            counts = torch.cat([stat.s["counts"] for stat in stats])
        # one shared int64 one, expanded: no activation-sized buffer of ones
        one = torch.ones((), dtype=torch.int64, device=x.device).expand(index.numel())
        counts.index_add_(0, index.flatten(), one)
        low = (1 << (23 - m)) - 1
        # lossless is judged on every value of the chunk (excluded ones too): conservative
        exact = torch.count_nonzero((bits & low).view(g, -1), dim=1) == 0
        for i, stat in enumerate(stats):
            if g > 1:
                stat.s["counts"] = counts[i * (size + 1):(i + 1) * (size + 1)]
            stat.s["lossless"] = stat.s["lossless"] & exact[i]

    @staticmethod
    def _dense_update(stat: Histogram, x: Tensor, tokens: Tokens) -> bool:
        """The update of one site through its :class:`~probe.stats._base.Dense` view (CPU, kept
        values all finite): ``bincount`` of the bucket indices in a reused int32 buffer, with no
        mask; the lossless test runs only while it still holds. ``False`` when the view is absent."""
        view = dense(x, tokens)
        if view is None:
            return False
        m = stat.m
        size = 2 ** (9 + m)
        bits = view.x.view(torch.int32)
        index = scratch("histogram.index", bits.shape, torch.int32)
        torch.bitwise_and(torch.bitwise_right_shift(bits, 23 - m, out=index), size - 1, out=index)
        counts = stat.s["counts"]
        counts[:size] += torch.bincount(index.view(-1), minlength=size)
        if bool(stat.s["lossless"]):  # a host read: free on CPU
            low = torch.bitwise_and(bits, (1 << (23 - m)) - 1, out=index)
            stat.s["lossless"] = stat.s["lossless"] & (torch.count_nonzero(low) == 0)
        return True

    def state_dict(self) -> dict[str, Tensor]:
        if self._state is None:
            return {}
        counts = self.s["counts"][:-1].clone()
        # NaN and +-inf (exponent 255: the top 2**m buckets of each sign) are counted by the
        # moments, not here
        half, top = counts.numel() // 2, 255 << self.m
        counts[top:half] = 0
        counts[half + top:] = 0
        return {"counts": counts, "lossless": self.s["lossless"]}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        if self._state is not None:
            counts = self.s["counts"].long()
            self.m = int(np.log2(counts.numel())) - 9
            self.s["counts"] = torch.cat((counts, counts.new_zeros(1)))
            self.s["lossless"] = self.s["lossless"].bool()
