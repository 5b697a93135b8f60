"""Per-channel moments, extremes, non-finite counts and the location of the largest magnitude.

State (float64 unless noted), ``D`` channels:

- ``n, mean, m2, m3, m4`` ``[D]``: Pébay central moment sums of the finite kept values;
- ``min, max`` ``[D]`` float32 over finite kept values (``±inf`` where a channel saw none);
- ``nan, posinf, neginf`` int64 scalars; ``tokens`` int64 (kept tokens);
- ``absmax`` float32 scalar and ``absmax_at`` int64 ``[4]`` = (row, position, channel, token id);
- ``large`` int64 ``[D]``: values with ``|x| >= LARGE`` (6.0, the outlier-feature threshold of
  Dettmers et al., LLM.int8()).

Site-level moments are not stored separately: they are the exact k-way merge of the channels
(see :func:`probe.stats._state.kway_moments`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import (SPECS, BatchedStat, Dense, Finite, Tokens, central_sums, dense, finite_host, host_checks,
                    merge_moments, run_compiled, scaled_central_sums, scratch, shift_moments, tiny_spread, wide)

from ._state import argmax_better

__all__ = ["Moments", "LARGE"]

LARGE = 6.0


#: larger magnitude wins, ties to the earlier location (the declared ``argmax`` rule); elementwise
#: tensor logic over any leading dims: no host sync
_better = argmax_better


def _chunk(x: Tensor, xs: Tensor | None, fm: Tensor | None, mag: Tensor | None, rowmax: Tensor | None,
           keep: Tensor, row: Tensor, position: Tensor, token: Tensor, wide: bool = False,
           scaled: bool = True) -> tuple[Tensor, ...]:
    """The state (in ``Moments._fields`` order, each with a leading site dim ``G``) of the chunk
    ``x[G, n, D]`` alone: ``G`` sites that saw the same ``n`` tokens; :func:`_merge` folds it in.

    A pure function of tensors (no host reads, no Python branches on values), so it runs eagerly
    or as one ``torch.compile`` graph. ``xs, fm, mag, rowmax`` are :class:`Finite`'s parts of ``x``,
    or ``None`` to compute them here. ``wide`` forms the deviations and their powers in float64:
    free inside a fused graph (nothing float64 is materialised), a full-size copy when eager.
    Otherwise ``scaled`` scales each channel's float32 deviations by a power of two (one more
    pass) so that their powers neither overflow nor underflow; unscaled, the caller checks.
    """
    f64 = torch.float64
    if xs is None or fm is None or mag is None or rowmax is None:
        parts = Finite(x, ())
        xs, fm, mag, rowmax = parts.xs, parts.fm, parts.abs, parts.rowmax
    keep1 = keep.to(x.dtype)  # [n]
    kcol = keep1.unsqueeze(-1)  # [n, 1]: broadcasts over sites and channels
    w = fm * kcol  # 1 for kept finite values
    n32 = w.sum(-2)  # integer counts below 2**24: exact in float32
    n = n32.double()
    # the mean from a float64 sum of the float32 values (xs is 0 where x is not finite)
    mean = (xs * kcol).sum(-2, dtype=f64) / n.clamp(min=1)
    center = mean.to(x.dtype)

    # masked extremes by addition, not where(): +-BIG on excluded values (0 * BIG on kept ones)
    big = torch.mul(w, -3e38).add_(3e38)
    lo = (xs + big).amin(-2)
    hi = big.neg_().add_(xs).amax(-2)
    seen = n32 > 0
    lo = torch.where(seen, lo, float("inf"))
    hi = torch.where(seen, hi, float("-inf"))

    moments: tuple[Tensor, ...]
    if wide:  # deviations from the float64 mean, powers and sums in float64
        d = (xs.to(f64) - mean.unsqueeze(-2)) * w
        d2 = d * d
        moments = (n, mean, d2.sum(-2), (d2 * d).sum(-2), (d2 * d2).sum(-2))
    else:  # powers of the deviation from the float32 center; the float64 mean sits delta above it
        c64 = center.double()
        d = torch.sub(xs, center.unsqueeze(-2)).mul_(w)
        if scaled:  # each channel's deviations times the power of two that brings the largest near 1
            sums = scaled_central_sums(d, torch.maximum(hi.double() - c64, c64 - lo.double()))
        else:
            sums = central_sums(d)
        moments = (n, mean, *shift_moments(n, mean - c64, *sums))

    # non-finite kept values: all of them from the counts, +inf and -inf by clamping the distance
    # past the largest float to 0/1 (NaN stays NaN, which nansum skips)
    kept = keep.sum()
    bad = kept.double() * x.shape[-1] - n.sum(-1)
    biggest = torch.finfo(x.dtype).max
    pos = torch.sub(x, biggest).clamp_(0.0, 1.0).nansum(-1) @ keep1
    neg = torch.add(x, biggest).clamp_(-1.0, 0.0).nansum(-1) @ keep1
    nan = (bad - pos.double() + neg.double()).round().long()

    # |x| >= LARGE as 0/1: min(|x|, LARGE) / LARGE rounds down to below 1 for any |x| < LARGE
    large = (keep1 @ torch.clamp(mag, max=LARGE).div_(LARGE).floor_()).round().long()

    # the largest kept |x| of each site: the first token holding it, then the first channel in
    # that token (the first element in (row, position, channel) order, as a flat argmax would
    # give); t is [G], never 0-d, since indexing with a 0-d tensor would read it on the host
    value, t = (rowmax * keep1).max(-1)
    channel = mag.gather(-2, t.view(-1, 1, 1).expand(-1, 1, mag.shape[-1])).argmax(-1).view(-1)
    value = torch.where(seen.any(-1), value, -1.0)
    at = torch.stack((row[t], position[t], channel, token[t]), dim=-1)
    g = x.shape[0]
    return (*moments, lo, hi, nan, pos.round().long(), -neg.round().long(), kept.expand(g), value, at, large)


def _dense_chunk(view: Dense, wide: bool = False) -> tuple[Tensor, ...]:
    """:func:`_chunk` over the kept tokens of a chunk whose kept values are all finite (see
    :func:`probe.stats._base.dense`): the same quantities with the masks and the non-finite
    counts (all zero) left out, from the float64 column sums :class:`Finite` already holds, with
    two reused buffers as the only activation-sized temporaries. ``wide``: the deviations from the
    float64 mean, their powers and sums in float64 (two more float64 buffers)."""
    x = view.x
    g, t = x.shape[0], x.shape[-2]
    mean = view.parts.colsum / t
    n = torch.full_like(mean, float(t))
    moments: tuple[Tensor, ...]
    if wide:
        f64 = torch.float64
        d64 = torch.sub(x, mean.unsqueeze(-2), out=scratch("moments.d64", x.shape, f64))
        p64 = torch.mul(d64, d64, out=scratch("moments.p64", x.shape, f64))
        moments = (n, mean, p64.sum(-2), p64.mul_(d64).sum(-2), p64.mul_(d64).sum(-2))
        d = scratch("moments.d", x.shape, x.dtype)
    else:
        center = mean.to(x.dtype)
        d = torch.sub(x, center.unsqueeze(-2), out=scratch("moments.d", x.shape, x.dtype))
        p = torch.mul(d, d, out=scratch("moments.p", x.shape, x.dtype))
        # float32 powers and sums, as in central_sums
        s2 = p.sum(-2).double()
        s3 = p.mul_(d).sum(-2).double()
        s4 = p.mul_(d).sum(-2).double()
        moments = (n, mean, *shift_moments(n, mean - center.double(), s2, s3, s4))
    mag = torch.abs(x, out=d)
    rowmax = mag.amax(-1)  # [G, t]
    if view.parts._rowmax is None:  # the per-position statistic and the top-k read it too
        view.parts._rowmax = rowmax
    value, at_t = rowmax.max(-1)
    channel = mag.gather(-2, at_t.view(-1, 1, 1).expand(-1, 1, mag.shape[-1])).argmax(-1).view(-1)
    at = torch.stack((view.row[at_t], view.position[at_t], channel, view.token[at_t]), dim=-1)
    # |x| >= LARGE counted only in the tokens whose largest |x| reaches it (found on the host: CPU)
    rows = torch.nonzero((rowmax >= LARGE).any(0)).squeeze(1)
    large = (mag.index_select(-2, rows) >= LARGE).sum(-2)
    zero = torch.zeros(g, dtype=torch.int64)
    return (*moments, x.amin(-2), x.amax(-2), zero, zero, zero, torch.full_like(zero, t), value, at, large)


def _merge(state: tuple[Tensor, ...], chunk: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Two states in ``Moments._fields`` order (leading site dim ``G``) merged into one, by the
    declared reductions: Pébay moments, min, max, sums, and the larger absmax (ties: earlier)."""
    n, mean, m2, m3, m4 = merge_moments(state[:5], chunk[:5])
    lo = torch.minimum(state[5], chunk[5])
    hi = torch.maximum(state[6], chunk[6])
    nan, pos, neg, tokens = (a + b for a, b in zip(state[7:11], chunk[7:11]))
    better = _better(chunk[11], chunk[12], state[11], state[12])
    absmax = torch.where(better, chunk[11], state[11])
    at = torch.where(better.unsqueeze(-1), chunk[12], state[12])
    return (n, mean, m2, m3, m4, lo, hi, nan, pos, neg, tokens, absmax, at, state[13] + chunk[13])


def _step(state: tuple[Tensor, ...], *args) -> tuple[Tensor, ...]:
    """:func:`_merge` of ``state`` with :func:`_chunk` ``(*args)``: one pure graph to compile."""
    return _merge(state, _chunk(*args))


class Moments(BatchedStat):
    """Per-channel moments of the finite kept values of one site (``D`` channels).

    Fields (declared in :data:`probe.stats._state.MOMENTS`; reduction in brackets):

    - ``n`` f64 ``[D]``: finite kept values per channel; ``mean`` f64 ``[D]`` (activation units);
      ``m2``, ``m3``, ``m4`` f64 ``[D]``: central sums Σ(x − mean)^p (units^p) [``moments``: Pébay];
    - ``min``, ``max`` f32 ``[D]`` (units; ±inf where empty) [``min``, ``max``];
    - ``nan``, ``posinf``, ``neginf``, ``tokens`` i64 scalars: non-finite kept values and kept
      tokens [``sum``]; ``large`` i64 ``[D]``: values with ``|x| >= 6`` [``sum``];
    - ``absmax`` f32 scalar (units, −1 where empty) and ``absmax_at`` i64 ``[4]`` = (row,
      position, channel, token id) [``argmax``: ties go to the earliest location].
    """

    name = "moments"
    chunked = True
    spec = SPECS["moments"]

    def dims(self, x: Tensor) -> dict[str, int]:
        return {"D": x.shape[-1]}

    def share_key(self) -> tuple:
        return ()  # the chunk's state reads the chunk and its tokens only

    @staticmethod
    def _run(state: tuple[Tensor, ...], x: Tensor, parts, tokens: Tokens, compiled: bool) -> tuple[Tensor, ...]:
        meta = (tokens.keep, tokens.row, tokens.position, tokens.token)
        if compiled:  # one fused graph computes its own finite parts
            return run_compiled(_step, state, x, None, None, None, None, *meta, True)
        return _merge(state, Moments._chunk(x, parts, tokens))

    @staticmethod
    def _chunk(x: Tensor, parts, tokens: Tokens) -> tuple[Tensor, ...]:
        checks = host_checks(x)

        def masked(wide: bool = False) -> tuple[Tensor, ...]:
            return _chunk(x, parts.xs, parts.fm, parts.abs, parts.rowmax, tokens.keep, tokens.row, tokens.position,
                          tokens.token, wide, not checks)

        view = dense(x, tokens)
        if wide():  # a float64 site: deviations and power sums in float64 (see wide_sums)
            return _dense_chunk(view, True) if view is not None else masked(True)
        chunk = _dense_chunk(view) if view is not None else masked()
        if checks and (not finite_host(chunk[4]) or tiny_spread(chunk[5], chunk[6])):
            # float32 fourth powers overflow once |x - mean| passes ~1.8e9 and leave the normal
            # range when a channel's values lie within ~2e-7 of each other (tiny or subnormal
            # activations): this chunk's powers in float64 instead (read on the host: CPU only;
            # accelerators compile to float64, and their eager path scales the deviations)
            chunk = masked(True)
        return chunk

    _merge = staticmethod(_merge)
