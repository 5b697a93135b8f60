"""Per-position statistics: how activations depend on the absolute token position.

Covers every real token, including the ones ``skip_first`` drops elsewhere, so the first-token
effect stays visible. Positions at or past ``max_positions`` are counted in ``overflow`` only.

State, ``P = max_positions``: ``tokens`` int64 ``[P]``; ``n, mean, m2`` float64 ``[P]`` over the
finite values of all channels at that position; ``absmax`` float32 ``[P]`` (``-inf`` where
empty); ``overflow`` int64 (tokens past ``P``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from . import _base
from ._base import (SPECS, BatchedStat, Finite, Tokens, host_checks, host_reads, merge_moments, pow2, power_of_two,
                    run_compiled, scratch, wide)

__all__ = ["Position", "position_window", "in_window"]


#: a mean square deviation below which float32 squares may have lost bits to underflow: the
#: squares that dominate such a sum lie within 2**24 of float32's smallest normal (2**-126)
TINY_SQUARE = 2.0**-100


def _chunk(x: Tensor, xs: Tensor | None, fm: Tensor | None, rowmax: Tensor | None, valid: Tensor, position: Tensor,
           p: int, wide: bool = False, scaled: bool = True) -> tuple[Tensor, ...]:
    """The state (in ``Position._fields`` order, leading site dim ``G``, ``P = p`` positions) of
    the chunk ``x[G, n, D]`` alone; pure, like the moments' chunk, so it runs eagerly or compiled
    (``wide``: deviations in float64; else ``scaled``: each token's float32 deviations times a
    power of two that keeps their squares in float32's normal range). :func:`_merge` folds it in."""
    if xs is None or fm is None or rowmax is None:
        parts = Finite(x, ())
        xs, fm, rowmax = parts.xs, parts.fm, parts.rowmax
    g = x.shape[0]
    f64 = torch.float64
    inside = valid & (position >= 0) & (position < p)
    overflow = (valid & (position >= p)).sum().expand(g)
    index = torch.where(inside, position, 0)
    inside64 = inside.to(f64)
    # per token first (row reductions), then per position (index_add over tokens)
    count = fm.sum(-1, dtype=f64) * inside64  # [G, n]
    total = xs.sum(-1, dtype=f64) * inside64
    zeros = torch.zeros(g, p, dtype=f64, device=x.device)
    n = zeros.index_add(1, index, count)
    mean = zeros.index_add(1, index, total) / n.clamp(min=1)
    mu = mean.index_select(1, index).unsqueeze(-1)  # each token's position mean, [G, n, 1]
    if wide:
        d = (xs.to(f64) - mu) * fm
        sq = d.mul_(d).sum(-1)
    else:
        d = torch.sub(xs, mu.to(x.dtype)).mul_(fm)
        if scaled:  # |x - mu| <= max|x| + |mu|: scaled below 1 (exactly), squares can't overflow
            e = power_of_two(rowmax.double() + mu.squeeze(-1).abs())
            sq = d.mul_(pow2(-e, x.dtype).unsqueeze(-1)).mul_(d).sum(-1, dtype=f64) * pow2(e, f64) ** 2
        else:
            sq = d.mul_(d).sum(-1, dtype=f64)
    m2 = zeros.index_add(1, index, sq * inside64)
    tokens = torch.zeros(g, p, dtype=torch.int64, device=x.device).index_add_(1, index, inside.long().expand(g, -1))
    # xs is 0 where x is not finite, so only tokens with no finite value need -inf
    mag = torch.where(count > 0, rowmax.to(f64), float("-inf")).to(torch.float32)
    absmax = torch.full((g, p), float("-inf"), device=x.device).scatter_reduce_(1, index.expand(g, -1), mag,
                                                                               reduce="amax")
    return tokens, n, mean, m2, absmax, overflow


def _dense_chunk(x: Tensor, parts: Finite, valid: Tensor, position: Tensor, p: int,
                 wide: bool = False) -> tuple[Tensor, ...] | None:
    """:func:`_chunk` of a CPU chunk whose tokens are all real and values all finite (read on the
    host, free on CPU), with reused buffers for the temporaries; ``None`` otherwise. Its per-token
    largest ``|x|`` is handed to ``parts`` (the top-k reads it), and ``parts`` learns that ``x``
    is finite. ``wide``: the deviations from the float64 means and their squares in float64."""
    if not host_reads(x) or not bool(valid.all()):
        return None
    f64 = torch.float64
    # [G, n] through a reused float64 copy; not finite exactly where a token holds a non-finite value
    total = parts.wide.sum(-1)
    if not bool(torch.isfinite(total).all()):
        return None
    parts.mark_clean()
    g, _, d = x.shape
    inside = (position >= 0) & (position < p)
    overflow = (position >= p).sum().expand(g)
    index = torch.where(inside, position, 0)
    inside64 = inside.to(f64)
    zeros = torch.zeros(g, p, dtype=f64)
    n = zeros.index_add(1, index, (inside64 * d).expand(g, -1))
    mean = zeros.index_add(1, index, total * inside64) / n.clamp(min=1)
    if wide:
        dev64 = torch.sub(x, mean.index_select(1, index).unsqueeze(-1), out=scratch("position.d64", x.shape, f64))
        m2 = zeros.index_add(1, index, dev64.mul_(dev64).sum(-1) * inside64)
        dev = scratch("position.d", x.shape, x.dtype)
    else:
        mu = mean.index_select(1, index).unsqueeze(-1).to(x.dtype)  # each token's position mean, [G, n, 1]
        dev = torch.sub(x, mu, out=scratch("position.d", x.shape, x.dtype))
        m2 = zeros.index_add(1, index, dev.mul_(dev).sum(-1).double() * inside64)  # float32 squares and sums
    tokens = torch.zeros(g, p, dtype=torch.int64).index_add_(1, index, inside.long().expand(g, -1))
    rowmax = parts.rowmax_into(dev)
    mag = torch.where(inside, rowmax, float("-inf"))
    absmax = torch.full((g, p), float("-inf")).scatter_reduce_(1, index.expand(g, -1), mag, reduce="amax")
    return tokens, n, mean, m2, absmax, overflow


def position_window(tokens: Tokens, p: int) -> tuple[int, int] | None:
    """``(lo, hi)``: the positions ``[lo, hi)`` of ``[0, p)`` that the chunk's real tokens reach
    (``(0, 1)`` when none does), read on the host; ``None`` where that would wait for a device
    (tokens not on the CPU, or :data:`probe.stats._base.DENSE_CPU` off) or the window is all of
    ``[0, p)``. A decode step reaches one position: its per-position states are built and merged
    over that window alone, the rest of the ``p`` positions left as they are (what merging an
    empty chunk into them gives)."""
    if not (_base.DENSE_CPU and tokens.position.device.type == "cpu"):  # the CPU fast paths' switch
        return None
    key = ("position_window", p)
    if key not in tokens.local:
        position = tokens.position.numpy()
        reached = position[tokens.valid.numpy() & (position >= 0) & (position < p)]
        lo, hi = (int(reached.min()), int(reached.max()) + 1) if reached.size else (0, 1)
        tokens.local[key] = None if (lo, hi) == (0, p) else (lo, hi)
    return tokens.local[key]


def in_window(state: Tensor, lo: int, hi: int, new: Tensor) -> Tensor:
    """``state[..., P]`` with ``[..., lo:hi]`` replaced by ``new`` (a fresh tensor: states are
    never changed in place, see :func:`probe.stats._base.stacked`)."""
    return torch.cat((state[..., :lo], new, state[..., hi:]), dim=-1)


def _merge(state: tuple[Tensor, ...], chunk: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Two states in ``Position._fields`` order (leading site dim ``G``) merged into one: counts
    add, moments merge (Chan et al.), maxima take the larger."""
    n, mean, m2 = merge_moments(state[1:4], chunk[1:4])
    return state[0] + chunk[0], n, mean, m2, torch.maximum(state[4], chunk[4]), state[5] + chunk[5]


def _step(state: tuple[Tensor, ...], x: Tensor, xs, fm, rowmax, valid: Tensor, position: Tensor,
          wide: bool = False) -> tuple[Tensor, ...]:
    """:func:`_merge` of ``state`` with the chunk's own state: one pure graph to compile."""
    return _merge(state, _chunk(x, xs, fm, rowmax, valid, position, state[0].shape[-1], wide))


class Position(BatchedStat):
    """Per-position statistics over every real token, ``P = max_positions``.

    Fields (declared in :data:`probe.stats._state.POSITION`; reduction in brackets): ``tokens``
    i64 ``[P]``: real tokens at each absolute position [``sum``]; ``n`` f64 ``[P]`` finite values
    over all channels, ``mean`` f64 ``[P]`` (activation units), ``m2`` f64 ``[P]`` Σ(x − mean)²
    (units²) [``moments``: Chan]; ``absmax`` f32 ``[P]`` (units, −inf where empty) [``max``];
    ``overflow`` i64: real tokens at positions ``>= P`` [``sum``].
    """

    name = "position"
    chunked = True
    spec = SPECS["position"]

    def __init__(self, max_positions: int = 4096) -> None:
        super().__init__()
        self.max_positions = max_positions

    @classmethod
    def create(cls, *, histogram_bits: int, max_positions: int, sample_size: int) -> Position:
        return cls(max_positions)

    def dims(self, x: Tensor) -> dict[str, int]:
        return {"P": self.max_positions}

    def share_key(self) -> tuple:
        return (self.max_positions,)

    def _adopt(self, dims: dict[str, int]) -> None:
        self.max_positions = dims["P"]

    @staticmethod
    def _run(state: tuple[Tensor, ...], x: Tensor, parts, tokens: Tokens, compiled: bool) -> tuple[Tensor, ...]:
        if compiled:
            return run_compiled(_step, state, x, None, None, None, tokens.valid, tokens.position, True)
        # over the positions the chunk reaches (a decode step: one) as positions 0 .. hi - lo; no
        # real token sits in [hi, P), so those past the window are exactly those past P (overflow)
        p = state[0].shape[-1]
        window = position_window(tokens, p)
        lo, hi = (0, p) if window is None else window
        chunk = _chunk(x, parts.xs, parts.fm, parts.rowmax, tokens.valid, tokens.position - lo, hi - lo, wide())
        merged = _merge((*(f[..., lo:hi] for f in state[:5]), state[5]), chunk)
        if window is None:
            return merged
        return (*(in_window(f, lo, hi, m) for f, m in zip(state[:5], merged[:5])), merged[5])

    def _chunk(self, x: Tensor, parts, tokens: Tokens) -> tuple[Tensor, ...]:
        checks = host_checks(x)

        def masked(wide: bool = False) -> tuple[Tensor, ...]:
            return _chunk(x, parts.xs, parts.fm, parts.rowmax, tokens.valid, tokens.position, self.max_positions,
                          wide, not checks)

        if wide():  # a float64 site: deviations and squares in float64 (see wide_sums)
            return _dense_chunk(x, parts, tokens.valid, tokens.position, self.max_positions, True) or masked(True)
        chunk = _dense_chunk(x, parts, tokens.valid, tokens.position, self.max_positions)
        if chunk is None:
            chunk = masked()
        if checks:
            # float32 squares overflow once |x - mean| passes ~1.8e19, and lose their precision
            # once a position's mean square deviation falls under 2**-100 (tiny or subnormal
            # activations): float64 for this chunk (CPU; accelerators compile to float64). A
            # position whose values are all 0 has M2 = 0 exactly and is not redone.
            _, n, _, m2, absmax, _ = (t.detach().numpy() for t in chunk)  # a host read, in numpy (cheaper)
            if not np.isfinite(m2).all() or ((m2 < n * TINY_SQUARE) & (absmax > 0)).any():
                chunk = masked(True)
        return chunk

    _merge = staticmethod(_merge)
