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

from ._base import StatBase, Tokens, chunk_moments, merge_moments

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
        keep = tokens.keep.unsqueeze(1)
        finite = torch.isfinite(x)
        w = keep & finite
        s["nan"] += (keep & torch.isnan(x)).sum()
        s["posinf"] += (keep & (x == float("inf"))).sum()
        s["neginf"] += (keep & (x == float("-inf"))).sum()
        s["tokens"] += tokens.keep.sum()

        chunk = chunk_moments(x, w, 0)
        state = (s["n"], s["mean"], s["m2"], s["m3"], s["m4"])
        for key, value in zip(("n", "mean", "m2", "m3", "m4"), merge_moments(state, chunk)):
            s[key] = value

        torch.minimum(s["min"], torch.where(w, x, float("inf")).amin(0), out=s["min"])
        torch.maximum(s["max"], torch.where(w, x, float("-inf")).amax(0), out=s["max"])

        mag = torch.where(w, x.abs(), -1.0)
        s["large"] += (mag >= LARGE).sum(0)
        value, flat = mag.flatten().max(0)
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
