"""The fused kernel's partial results computed with plain torch ops (float64 throughout).

The same :class:`~probe.capture.kernels._layout.Partials` as :func:`probe.capture.kernels._triton.partials`, from
the same blocks: it states what the kernel must produce (its tests compare the two), and it lets
the merge into the statistics' states (:mod:`probe.capture.kernels._combine`) be tested where Triton is
not installed. It materialises float64 copies of the activations: a reference, not a fast path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._layout import Partials, Plan

__all__ = ["partials"]


def _pad(t: Tensor, dim: int, size: int, value) -> Tensor:
    if t.shape[dim] == size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_full(shape, value)], dim)


def partials(x: Tensor, keep: Tensor, plan: Plan) -> Partials:
    """Partial results of ``x[G, n, D]`` with token mask ``keep[n]`` (see :class:`Partials`)."""
    g, n, d = x.shape
    rb, cb = plan.row_blocks(n), plan.channel_blocks(d)
    out = Partials.empty(g, n, d, rb, cb, plan.mantissa_bits, x.device)
    x32 = x.float()
    keep = keep.bool()
    finite = torch.isfinite(x32)
    w = finite & keep.view(1, n, 1)
    x64 = torch.where(w, x32.double(), 0.0)

    # per row block and channel: moments of the kept finite values, two-pass in float64
    rows = rb * plan.rows
    wb = _pad(w, 1, rows, False).view(g, rb, plan.rows, d)
    xb = _pad(x64, 1, rows, 0.0).view(g, rb, plan.rows, d)
    cnt = wb.sum(2, dtype=torch.float64)
    mean = xb.sum(2) / cnt.clamp(min=1)
    dev = torch.where(wb, xb - mean.unsqueeze(2), 0.0)
    out.mom.copy_(torch.stack([cnt, mean, dev.pow(2).sum(2), dev.pow(3).sum(2), dev.pow(4).sum(2)], 2))
    x32b = _pad(x32, 1, rows, 0.0).view(g, rb, plan.rows, d)
    out.ext[:, :, 0] = torch.where(wb, x32b, float("inf")).amin(2)
    out.ext[:, :, 1] = torch.where(wb, x32b, float("-inf")).amax(2)
    out.large.copy_((wb & (x32b.abs() >= plan.large)).sum(2))

    # per channel block and token: count, mean and M2 of the finite values (every token)
    cols = cb * plan.block_d
    fin = _pad(finite, 2, cols, False).view(g, n, cb, plan.block_d)
    xf = _pad(torch.where(finite, x32.double(), 0.0), 2, cols, 0.0).view(g, n, cb, plan.block_d)
    tcnt = fin.sum(3, dtype=torch.float64)
    tmean = xf.sum(3) / tcnt.clamp(min=1)
    tm2 = torch.where(fin, xf - tmean.unsqueeze(3), 0.0).pow(2).sum(3)
    out.tok.copy_(torch.stack([tcnt, tmean, tm2], 2).permute(0, 3, 2, 1))
    absx = torch.where(fin, xf.abs(), float("-inf")).float()
    out.rowmax.copy_(absx.amax(3).transpose(1, 2))

    # per (row block, channel block): the largest kept |x| and its first flat index
    mag = torch.where(w, x32.abs(), -1.0)
    magb = _pad(_pad(mag, 1, rows, -1.0), 2, cols, -1.0).view(g, rb, plan.rows, cb, plan.block_d)
    magb = magb.permute(0, 1, 3, 2, 4).reshape(g, rb * cb, -1)
    best = magb.amax(-1)
    flat = (torch.arange(rows, device=x.device).view(rows, 1) * d
            + torch.arange(cols, device=x.device).view(1, cols))
    flatb = flat.view(rb, plan.rows, cb, plan.block_d).permute(0, 2, 1, 3).reshape(1, rb * cb, -1)
    none = n * d
    out.best.copy_(best)
    out.best_at.copy_(torch.where(magb == best.unsqueeze(-1), flatb, none).amin(-1).where(best >= 0, none))

    # non-finite kept values, histogram, lossless
    kept = keep.view(1, n, 1).expand(g, n, d)
    out.bad[:, 0] = (torch.isnan(x32) & kept).sum((1, 2))
    out.bad[:, 1] = ((x32 == float("inf")) & kept).sum((1, 2))
    out.bad[:, 2] = ((x32 == float("-inf")) & kept).sum((1, 2))
    buckets = plan.buckets
    bits = x32.contiguous().view(torch.int32)
    index = torch.where(kept, buckets.index(bits), buckets.spare)
    for i in range(g):
        out.hist[i] = torch.bincount(index[i].flatten(), minlength=buckets.spare + 1)
    out.lossy.copy_(((bits & buckets.low) != 0).flatten(1).any(1).int())
    return out
