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

from ._base import StatBase, Tokens, central_sums, finite, merge_moments, shift_moments

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
        f64 = torch.float64
        p = finite(x, tokens)
        xs = p.xs
        keep1 = tokens.keep.to(x.dtype)
        keep = keep1.unsqueeze(1)
        w = p.fm * keep  # 1 for kept finite values
        n32 = w.sum(0)  # integer counts below 2**24: exact in float32
        n = n32.double()
        safe = n.clamp(min=1)
        # the mean from a float64 sum of the float32 values (xs is 0 where x is not finite)
        mean = (xs * keep).sum(0, dtype=f64) / safe
        center = mean.to(x.dtype)
        # powers of the deviation from the float32 center; the float64 mean sits delta above it
        s2, s3, s4 = central_sums(torch.sub(xs, center).mul_(w))
        chunk = (n, mean, *shift_moments(n, mean - center.double(), s2, s3, s4))
        state = (s["n"], s["mean"], s["m2"], s["m3"], s["m4"])
        for key, value in zip(("n", "mean", "m2", "m3", "m4"), merge_moments(state, chunk)):
            s[key] = value

        # non-finite kept values: all of them from the counts, +inf and -inf by clamping the
        # distance past the largest float to 0/1 (NaN stays NaN, which nansum skips)
        kept = tokens.keep.sum()
        bad = kept.double() * x.shape[1] - n.sum()
        biggest = torch.finfo(x.dtype).max
        pos = torch.sub(x, biggest).clamp_(0.0, 1.0).nansum(1) @ keep1
        neg = torch.add(x, biggest).clamp_(-1.0, 0.0).nansum(1) @ keep1
        s["posinf"] += pos.round().long()
        s["neginf"] -= neg.round().long()
        s["nan"] += (bad - pos.double() + neg.double()).round().long()
        s["tokens"] += kept

        # masked extremes by addition, not where(): +-BIG on excluded values (0 * BIG on kept ones)
        big = torch.mul(w, -3e38).add_(3e38)
        lo = (xs + big).amin(0)
        hi = big.neg_().add_(xs).amax(0)
        inf = float("inf")
        seen = n32 > 0
        torch.minimum(s["min"], torch.where(seen, lo, inf), out=s["min"])
        torch.maximum(s["max"], torch.where(seen, hi, -inf), out=s["max"])

        # |x| >= LARGE as 0/1: min(|x|, LARGE) / LARGE rounds down to below 1 for any |x| < LARGE
        mag = p.abs
        large = torch.clamp(mag, max=LARGE).div_(LARGE).floor_()
        s["large"] += (keep1 @ large).round().long()

        # the largest kept |x|: the first token holding it, then the first channel in that token
        # (the first element in (row, position, channel) order, as a flat argmax would give)
        # (1-element index tensors: indexing with a 0-d tensor would read it on the host)
        value, t = (p.rowmax * keep1).max(0)
        t = t.view(1)
        channel = mag.index_select(0, t).argmax(1)
        value = torch.where(seen.any(), value, -1.0)
        at = torch.cat((tokens.row[t], tokens.position[t], channel, tokens.token[t]))
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
