"""Fold the fused kernel's partial results into the statistics' states, for all ``G`` sites at once.

The states written are exactly those of :class:`probe.stats.Moments`, :class:`probe.stats.Histogram`
and :class:`probe.stats.Position` (same fields, dtypes and shapes; see those modules). Blocks are
combined with the exact k-way form of Pébay's formulas (deviations of each block's mean from the
merged mean, float64), then merged into the running state with :func:`merge_moments`, as the eager
update does per chunk. A few small tensor ops per group of sites, none per site on the device side
except the final hand-back of views; no host synchronisation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...stats._base import Tokens, merge_moments
from ...stats.moments import Moments, _better
from ...stats.position import Position
from ._layout import Partials

__all__ = ["into_moments", "into_histogram", "into_position"]


def _stack(stats: list, fields: tuple[str, ...]) -> tuple[Tensor, ...]:
    if len(stats) == 1:
        return tuple(stats[0].s[f].unsqueeze(0) for f in fields)
    return tuple(torch.stack([stat.s[f] for stat in stats]) for f in fields)


def _hand_back(stats: list, fields: tuple[str, ...], values: tuple[Tensor, ...]) -> None:
    per_site = [v.unbind(0) for v in values]
    for g, stat in enumerate(stats):
        stat._state = {f: views[g] for f, views in zip(fields, per_site)}


def kway(nb: Tensor, mb: Tensor, m2b: Tensor, m3b: Tensor, m4b: Tensor, dim: int) -> tuple[Tensor, ...]:
    """``(n, mean, M2, M3, M4)`` of the union of disjoint blocks along ``dim`` (float64; Pébay 2008,
    the k-way form: each block's central sums shifted by ``delta = mean_b - mean``)."""
    n = nb.sum(dim)
    mean = (nb * mb).sum(dim) / n.clamp(min=1)
    delta = mb - mean.unsqueeze(dim)
    d2 = delta * delta
    m2 = (m2b + nb * d2).sum(dim)
    m3 = (m3b + 3 * delta * m2b + nb * d2 * delta).sum(dim)
    m4 = (m4b + 4 * delta * m3b + 6 * d2 * m2b + nb * d2 * d2).sum(dim)
    return n, mean, m2, m3, m4


def into_moments(stats: list, p: Partials, tokens: Tokens) -> None:
    fields = Moments._fields
    (n0, mean0, m20, m30, m40, lo0, hi0, nan0, pos0, neg0, tok0, absmax0, at0, large0) = _stack(stats, fields)
    nb, mb, m2b, m3b, m4b = p.mom.unbind(2)
    chunk = kway(nb, mb, m2b, m3b, m4b, dim=1)
    n1, mean1, m21, m31, m41 = merge_moments((n0, mean0, m20, m30, m40), chunk)
    lo1 = torch.minimum(lo0, p.ext[:, :, 0].amin(1))
    hi1 = torch.maximum(hi0, p.ext[:, :, 1].amax(1))
    large1 = large0 + p.large.sum(1, dtype=torch.int64)
    nan1, pos1, neg1 = nan0 + p.bad[:, 0], pos0 + p.bad[:, 1], neg0 + p.bad[:, 2]
    tok1 = tok0 + tokens.keep.sum()
    # the largest kept |x|, at the first (token, channel) holding it; blocks tie by flat index
    value = p.best.amax(1)
    none = tokens.keep.numel() * lo0.shape[-1]
    flat = torch.where(p.best == value.unsqueeze(1), p.best_at, none).amin(1)
    d = lo0.shape[-1]
    t = torch.div(flat, d, rounding_mode="floor").clamp_(max=tokens.keep.numel() - 1)
    at = torch.stack((tokens.row[t], tokens.position[t], flat % d, tokens.token[t]), dim=-1)
    better = _better(value, at, absmax0, at0)
    absmax1 = torch.where(better, value, absmax0)
    at1 = torch.where(better.unsqueeze(-1), at, at0)
    _hand_back(stats, fields, (n1, mean1, m21, m31, m41, lo1, hi1, nan1, pos1, neg1, tok1, absmax1, at1, large1))


def into_histogram(stats: list, p: Partials) -> None:
    counts = [stat.s["counts"] for stat in stats]
    torch._foreach_add_(counts, list(p.hist.unbind(0)))
    exact = p.lossy == 0
    for g, stat in enumerate(stats):
        stat.s["lossless"] = stat.s["lossless"] & exact[g]


def into_position(stats: list, p: Partials, tokens: Tokens) -> None:
    fields = Position._fields
    tokens0, n0, mean0, m20, absmax0, overflow0 = _stack(stats, fields)
    g, size = tokens0.shape
    # per token: the channel blocks merged (count, mean, M2 over every channel)
    c, mean_t, m2_t = kway(p.tok[:, :, 0], p.tok[:, :, 1], p.tok[:, :, 2],
                           torch.zeros_like(p.tok[:, :, 0]), torch.zeros_like(p.tok[:, :, 0]), dim=1)[:3]
    valid, position = tokens.valid, tokens.position
    inside = valid & (position >= 0) & (position < size)
    overflow1 = overflow0 + (valid & (position >= size)).sum()
    index = torch.where(inside, position, 0)
    c = c * inside
    zeros = torch.zeros(g, size, dtype=torch.float64, device=c.device)
    n = zeros.index_add(1, index, c)
    mean = zeros.index_add(1, index, c * mean_t) / n.clamp(min=1)
    dev = mean_t - mean.index_select(1, index)
    m2 = zeros.index_add(1, index, (m2_t + c * dev * dev) * inside)
    n1, mean1, m21 = merge_moments((n0, mean0, m20), (n, mean, m2))
    tokens1 = tokens0.index_add(1, index, inside.long().expand(g, -1))
    mag = torch.where(c > 0, p.rowmax.amax(1), float("-inf"))
    absmax1 = absmax0.scatter_reduce(1, index.expand(g, -1), mag, reduce="amax")
    _hand_back(stats, fields, (tokens1, n1, mean1, m21, absmax1, overflow1))
