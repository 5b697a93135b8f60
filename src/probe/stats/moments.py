"""Per-channel moments, extremes, non-finite counts and the location of the largest magnitude.

State (float64 unless noted), ``D`` channels:

- ``n, mean, m2, m3, m4`` ``[D]``: Pébay central moment sums of the finite kept values;
- ``min, max`` ``[D]`` float32 over finite kept values (``±inf`` where a channel saw none);
- ``nan, posinf, neginf`` int64 scalars; ``tokens`` int64 (kept tokens);
- ``absmax`` float32 scalar and ``absmax_at`` int64 ``[4]`` = (row, position, channel, token id);
- ``large`` int64 ``[D]``: values with ``|x| >= LARGE`` (6.0, the outlier-feature threshold of
  Dettmers et al., LLM.int8()).

Site-level moments are not stored separately: they are the exact k-way merge of the channels
(see :func:`probe.run.combine_channels`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import StatBase, Tokens, chunk_moments, finite_parts, merge_moments

__all__ = ["Moments", "LARGE"]

LARGE = 6.0


def _better(value: Tensor, at: Tensor, old: Tensor, old_at: Tensor) -> Tensor:
    """Larger magnitude wins; a tie goes to the earlier (row, position, channel), so merges
    commute. Elementwise tensor logic only: no host sync."""
    earlier = at[2] < old_at[2]
    for i in (1, 0):
        earlier = (at[i] < old_at[i]) | ((at[i] == old_at[i]) & earlier)
    return (value > old) | ((value == old) & (old_at[0] >= 0) & earlier)


class Moments(StatBase):
    name = "moments"
    chunked = True
    _fields = ("n", "mean", "m2", "m3", "m4", "min", "max", "nan", "posinf", "neginf", "tokens",
               "absmax", "absmax_at", "large")

    def _init(self, d: int, device: torch.device) -> None:
        f64 = dict(dtype=torch.float64, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        self._state = {
            "n": torch.zeros(d, **f64),
            "mean": torch.zeros(d, **f64),
            "m2": torch.zeros(d, **f64),
            "m3": torch.zeros(d, **f64),
            "m4": torch.zeros(d, **f64),
            "min": torch.full((d,), float("inf"), dtype=torch.float32, device=device),
            "max": torch.full((d,), float("-inf"), dtype=torch.float32, device=device),
            "nan": torch.zeros((), **i64),
            "posinf": torch.zeros((), **i64),
            "neginf": torch.zeros((), **i64),
            "tokens": torch.zeros((), **i64),
            "absmax": torch.full((), -1.0, dtype=torch.float32, device=device),
            "absmax_at": torch.full((4,), -1, **i64),
            "large": torch.zeros(d, **i64),
        }

    def update(self, x: Tensor, tokens: Tokens) -> None:
        if x.numel() == 0:  # an empty chunk adds nothing (shape check: no sync)
            return
        if self._state is None:
            self._init(x.shape[1], x.device)
        s = self.s
        inf = float("inf")
        keep = tokens.keep.to(x.dtype)
        xs, fm = finite_parts(x)
        w = fm * keep.unsqueeze(1)  # 1 for kept finite values
        # non-finite counts without bool kernels: each difference below is 1 exactly where x is
        # NaN (resp. +inf) and 0 elsewhere; -inf is what remains of the non-finite values
        nan = torch.nan_to_num(x, nan=1.0, posinf=0.0, neginf=0.0) - xs
        pos = torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=0.0) - xs
        bad = keep @ (1.0 - fm).sum(1)
        n_nan, n_pos = keep @ nan.sum(1), keep @ pos.sum(1)
        s["nan"] += n_nan.round().long()
        s["posinf"] += n_pos.round().long()
        s["neginf"] += (bad - n_nan - n_pos).round().long()
        s["tokens"] += tokens.keep.sum()

        chunk = chunk_moments(xs, w)
        state = (s["n"], s["mean"], s["m2"], s["m3"], s["m4"])
        for key, value in zip(("n", "mean", "m2", "m3", "m4"), merge_moments(state, chunk)):
            s[key] = value

        # masked extremes by addition, not where(): +-BIG on excluded values (0 * BIG on kept ones)
        big = (1.0 - w) * 3e38
        lo = (torch.nan_to_num(x, nan=inf, posinf=inf, neginf=inf) + big).amin(0)
        hi = (torch.nan_to_num(x, nan=-inf, posinf=-inf, neginf=-inf) - big).amax(0)
        seen = chunk[0] > 0
        torch.minimum(s["min"], torch.where(seen, lo, inf), out=s["min"])
        torch.maximum(s["max"], torch.where(seen, hi, -inf), out=s["max"])

        mag = xs.abs() * w
        # |x| >= LARGE as 0/1 floats: (mag - LARGE) * 2**100 + 1 is >= 1 there and hugely negative
        # below (the step is one ulp of LARGE, far above 2**-100)
        s["large"] += ((mag - LARGE) * 2.0**100 + 1.0).clamp_(0.0, 1.0).sum(0).round().long()
        value, flat = mag.flatten().max(0)
        value = torch.where(seen.any(), value, -1.0)
        d = x.shape[1]
        t = flat // d
        at = torch.stack((tokens.row[t], tokens.position[t], flat % d, tokens.token[t]))
        better = _better(value, at, s["absmax"], s["absmax_at"])
        s["absmax"] = torch.where(better, value, s["absmax"])
        s["absmax_at"] = torch.where(better, at, s["absmax_at"])

    def _merge(self, o: dict[str, Tensor]) -> None:
        s = self.s
        keys = ("n", "mean", "m2", "m3", "m4")
        merged = merge_moments(tuple(s[k] for k in keys), tuple(o[k] for k in keys))
        for key, value in zip(keys, merged):
            s[key] = value
        s["min"] = torch.minimum(s["min"], o["min"])
        s["max"] = torch.maximum(s["max"], o["max"])
        for key in ("nan", "posinf", "neginf", "tokens", "large"):
            s[key] = s[key] + o[key]
        better = _better(o["absmax"], o["absmax_at"], s["absmax"], s["absmax_at"])
        s["absmax"] = torch.where(better, o["absmax"], s["absmax"])
        s["absmax_at"] = torch.where(better, o["absmax_at"], s["absmax_at"])
