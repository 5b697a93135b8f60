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

from ._base import StatBase, Tokens, finite

__all__ = ["Position"]


class Position(StatBase):
    name = "position"
    chunked = True
    _fields = ("tokens", "n", "mean", "m2", "absmax", "overflow")

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

    def update(self, x: Tensor, tokens: Tokens) -> None:
        if x.numel() == 0:  # an empty chunk adds nothing (shape check: no sync)
            return
        if self._state is None:
            self._init(x.device)
        s = self.s
        p = s["tokens"].shape[0]
        pos = tokens.position
        inside = tokens.valid & (pos >= 0) & (pos < p)
        s["overflow"] += (tokens.valid & (pos >= p)).sum()
        index = torch.where(inside, pos, 0)
        f64 = torch.float64
        parts = finite(x, tokens)
        xs, fm = parts.xs, parts.fm
        inside64 = inside.to(f64)
        # per token first (row reductions), then per position (index_add_ over tokens)
        count = fm.sum(1, dtype=f64) * inside64
        total = xs.sum(1, dtype=f64) * inside64
        n = torch.zeros(p, dtype=f64, device=x.device).index_add_(0, index, count)
        mean = torch.zeros_like(n).index_add_(0, index, total) / n.clamp(min=1)
        d = torch.sub(xs, mean.to(x.dtype)[index].unsqueeze(1)).mul_(fm)
        m2 = torch.zeros_like(n).index_add_(0, index, d.mul_(d).sum(1, dtype=f64) * inside64)
        self._merge_moments(n, mean, m2)

        s["tokens"].index_add_(0, index, inside.long())
        # xs is 0 where x is not finite, so only tokens with no finite value need -inf
        mag = torch.where((count > 0), parts.rowmax.to(f64), float("-inf")).to(torch.float32)
        s["absmax"].scatter_reduce_(0, index, mag, reduce="amax")

    def _merge_moments(self, nb: Tensor, mb: Tensor, m2b: Tensor) -> None:
        s = self.s
        na, ma = s["n"], s["mean"]
        n = na + nb
        delta = mb - ma
        s["mean"] = ma + delta * nb / n.clamp(min=1)
        s["m2"] = s["m2"] + m2b + delta * delta * na * nb / n.clamp(min=1)
        s["n"] = n

    def _merge(self, o: dict[str, Tensor]) -> None:
        s = self.s
        if o["tokens"].shape != s["tokens"].shape:
            from ..errors import ProbeError

            raise ProbeError(
                f"position stats cover {o['tokens'].shape[0]} positions in one run and "
                f"{s['tokens'].shape[0]} in the other; expected equal max_positions; "
                "capture both with the same max_positions"
            )
        self._merge_moments(o["n"], o["mean"], o["m2"])
        s["tokens"] = s["tokens"] + o["tokens"]
        s["absmax"] = torch.maximum(s["absmax"], o["absmax"])
        s["overflow"] = s["overflow"] + o["overflow"]
