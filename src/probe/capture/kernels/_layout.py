"""The blocking plan and the partial results that the fused kernel (or its torch reference) writes.

Shapes, for ``G`` sites, ``n`` tokens, ``D`` channels, ``RB = ceil(n / rows)`` row blocks and
``CB = ceil(D / block_d)`` channel blocks:

- ``mom`` float64 ``[G, RB, 5, D]``: per row block and channel, ``(n, mean, M2, M3, M4)`` of the
  kept finite values;
- ``ext`` float32 ``[G, RB, 2, D]``: their min and max (``+inf`` / ``-inf`` when none);
- ``large`` int32 ``[G, RB, D]``: how many have ``|x| >= LARGE``;
- ``tok`` float64 ``[G, CB, 3, n]``: per channel block and token, ``(count, mean, M2)`` of the
  finite values (every token: the per-position statistic masks by validity itself);
- ``rowmax`` float32 ``[G, CB, n]``: their largest ``|x|`` (``-inf`` when none);
- ``best`` float32 ``[G, RB * CB]`` and ``best_at`` int64: per block, the largest kept finite
  ``|x|`` (``-1`` when none) and the first flat index ``token * D + channel`` holding it;
- ``bad`` int64 ``[G, 3]``: NaN, +inf, -inf among kept values;
- ``hist`` int64 ``[G, 2**(9+m) + 1]``: float-bit bucket counts of kept values, excluded tokens'
  values in the last (spare) bucket, exactly as :class:`probe.stats.Histogram` counts them;
- ``lossy`` int32 ``[G]``: 1 when some value had mantissa bits below the top ``m``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...stats._buckets import Buckets
from ...stats.moments import LARGE

__all__ = ["Plan", "Partials"]


@dataclass(frozen=True)
class Plan:
    """Block sizes and the histogram's dense window (exponents ``e0 .. e0 + nexp - 1``, both signs).

    The dense window holds ``2 * nexp * 2**m`` buckets (2,048 by default) privately per program;
    the default exponents 121..128 cover ``2**-6 <= |x| < 4`` at ``m = 7`` (hidden states' bulk;
    values outside it go through global atomics, exactly counted either way).
    """

    mantissa_bits: int = 7
    rows: int = 256
    sub: int = 32
    block_d: int = 128
    dense_bins: int = 2048
    large: float = LARGE
    e0: int = -1  # -1: three quarters of the window below 1.0 (see __post_init__)

    def __post_init__(self) -> None:
        if self.e0 < 0:
            object.__setattr__(self, "e0", max(0, 127 - self.nexp + self.nexp // 4))

    @property
    def buckets(self) -> Buckets:
        """The histogram's float-bit buckets."""
        return Buckets(self.mantissa_bits)

    @property
    def nexp(self) -> int:
        return max(1, self.dense_bins // (2 << self.mantissa_bits))

    def row_blocks(self, n: int) -> int:
        return max(1, -(-n // self.rows))

    def channel_blocks(self, d: int) -> int:
        return max(1, -(-d // self.block_d))


@dataclass
class Partials:
    """The fused kernel's per-block partial results (shapes in the module docstring)."""

    mom: Tensor
    ext: Tensor
    large: Tensor
    tok: Tensor
    rowmax: Tensor
    best: Tensor
    best_at: Tensor
    bad: Tensor
    hist: Tensor
    lossy: Tensor

    @classmethod
    def empty(cls, g: int, n: int, d: int, rb: int, cb: int, m: int, device) -> Partials:
        f64 = dict(dtype=torch.float64, device=device)
        f32 = dict(dtype=torch.float32, device=device)
        # every per-block buffer is written in full by its program; only the atomics' targets start at 0
        return cls(
            mom=torch.empty(g, rb, 5, d, **f64),
            ext=torch.empty(g, rb, 2, d, **f32),
            large=torch.empty(g, rb, d, dtype=torch.int32, device=device),
            tok=torch.empty(g, cb, 3, n, **f64),
            rowmax=torch.empty(g, cb, n, **f32),
            best=torch.empty(g, rb * cb, **f32),
            best_at=torch.empty(g, rb * cb, dtype=torch.int64, device=device),
            bad=torch.zeros(g, 3, dtype=torch.int64, device=device),
            hist=torch.zeros(g, Buckets(m).spare + 1, dtype=torch.int64, device=device),
            lossy=torch.zeros(g, dtype=torch.int32, device=device),
        )
