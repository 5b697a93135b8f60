"""Per-position statistics: how activations depend on the absolute token position.

Covers every real token, including the ones ``skip_first`` drops elsewhere, so the first-token
effect stays visible. Positions at or past ``max_positions`` are counted in ``overflow`` only.

State, ``P = max_positions``: ``tokens`` int64 ``[P]``; ``n, mean, m2`` float64 ``[P]`` over the
finite values of all channels at that position; ``absmax`` float32 ``[P]`` (``-inf`` where
empty); ``overflow`` int64 (tokens past ``P``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import SPECS, BatchedStat, Finite, Tokens, run_compiled

__all__ = ["Position"]


def _merge_position(na: Tensor, ma: Tensor, m2a: Tensor, nb: Tensor, mb: Tensor, m2b: Tensor):
    n = na + nb
    delta = mb - ma
    mean = ma + delta * nb / n.clamp(min=1)
    m2 = m2a + m2b + delta * delta * na * nb / n.clamp(min=1)
    return n, mean, m2


def _step(state: tuple[Tensor, ...], x: Tensor, xs: Tensor | None, fm: Tensor | None, rowmax: Tensor | None,
          valid: Tensor, position: Tensor, wide: bool = False) -> tuple[Tensor, ...]:
    """The states (in ``Position._fields`` order, leading site dim ``G``) after folding in the chunk
    ``x[G, n, D]``; pure, like the moments' step, so it runs eagerly or compiled (``wide``:
    deviations in float64)."""
    tokens0, n0, mean0, m20, absmax0, overflow0 = state
    if xs is None or fm is None or rowmax is None:
        parts = Finite(x, ())
        xs, fm, rowmax = parts.xs, parts.fm, parts.rowmax
    g, p = tokens0.shape
    f64 = torch.float64
    inside = valid & (position >= 0) & (position < p)
    overflow = overflow0 + (valid & (position >= p)).sum()
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
    else:
        d = torch.sub(xs, mu.to(x.dtype)).mul_(fm)
    m2 = zeros.index_add(1, index, d.mul_(d).sum(-1, dtype=f64) * inside64)
    n1, mean1, m21 = _merge_position(n0, mean0, m20, n, mean, m2)
    tokens1 = tokens0.index_add(1, index, inside.long().expand(g, -1))
    # xs is 0 where x is not finite, so only tokens with no finite value need -inf
    mag = torch.where(count > 0, rowmax.to(f64), float("-inf")).to(torch.float32)
    absmax1 = absmax0.scatter_reduce(1, index.expand(g, -1), mag, reduce="amax")
    return tokens1, n1, mean1, m21, absmax1, overflow


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
    _fields = spec.names

    def __init__(self, max_positions: int = 4096) -> None:
        super().__init__()
        self.max_positions = max_positions

    def _init(self, device: torch.device) -> None:
        p = self.max_positions
        self._state = {
            "tokens": torch.zeros(p, dtype=torch.int64, device=device),
            "n": torch.zeros(p, dtype=torch.float64, device=device),
            "mean": torch.zeros(p, dtype=torch.float64, device=device),
            "m2": torch.zeros(p, dtype=torch.float64, device=device),
            "absmax": torch.full((p,), float("-inf"), dtype=torch.float32, device=device),
            "overflow": torch.zeros((), dtype=torch.int64, device=device),
        }

    def _init_like(self, x: Tensor) -> None:
        self._init(x.device)

    @staticmethod
    def _run(state: tuple[Tensor, ...], x: Tensor, parts, tokens: Tokens, compiled: bool) -> tuple[Tensor, ...]:
        if compiled:
            return run_compiled(_step, state, x, None, None, None, tokens.valid, tokens.position, True)
        return _step(state, x, parts.xs, parts.fm, parts.rowmax, tokens.valid, tokens.position)
