"""Per-expert statistics of a mixture-of-experts layer's expert input: each expert's own tokens.

The site's tensor is the experts module's call packed by :mod:`probe.capture.moe` as
``[n, k + D]`` float32 rows: the ``k`` experts each token is routed to (indices, exact as float32
for ``E < 2**24``), then the token's ``D`` input channels (what every expert's gate and up
projections read). Expert ``e``'s input is the rows routed to it; for each expert and channel:
the count of finite values, mean and ``M2`` (two passes over the chunk in float64, merged by
Chan et al. 1979), the largest finite ``|x|``, and per expert the real tokens routed and the
non-finite values left out. ``Σ x² = M2 + n · mean²`` (what llama.cpp's imatrix stores per expert)
and ``Σ x = n · mean`` follow exactly.

Padding routed to an expert never counts (``tokens.valid``); ``skip_first`` does not apply (a
quantizer calibrates on every token). The update scatters each top-k slot's rows into per-expert
sums (``index_add_``): ``O(k · n · D)`` work, as much as reading the rows each expert computes once
— not ``E`` passes. No host sync.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ProbeError
from ._base import SPECS, Tokens, merge_moments
from .router import MoeConfigured

__all__ = ["Experts"]


class Experts(MoeConfigured):
    """Per-expert input statistics (``E`` experts, ``D`` channels); fields in
    :data:`probe.stats._state.EXPERTS`."""

    name = "experts"
    chunked = True
    spec = SPECS["experts"]

    def dims(self, x: Tensor) -> dict[str, int]:
        e, k = self._layer()
        if x.shape[-1] <= k:
            raise ProbeError(f"expert rows have {x.shape[-1]} values; expected k + D > {k} (indices, input); "
                             "the site is not an experts module packed by probe.capture.moe")
        return {"E": e, "D": x.shape[-1] - k}

    def _fold(self, x: Tensor, tokens: Tokens) -> None:
        e, k = self._layer()
        s = self.s
        f64 = torch.float64
        v = x[:, k:]
        d = v.shape[-1]
        fin = torch.isfinite(v)
        v0 = torch.where(fin, v, 0.0).to(f64)
        ff = fin.to(f64)
        slots = [torch.where(tokens.valid, x[:, j].long().clamp(0, e - 1), e) for j in range(k)]
        zeros = torch.zeros(e + 1, d, dtype=f64, device=x.device)
        cn, s1 = zeros.clone(), zeros.clone()
        for ix in slots:  # a token is routed to an expert at most once
            cn.index_add_(0, ix, ff)
            s1.index_add_(0, ix, v0)
        mean = s1 / cn.clamp(min=1)
        m2 = zeros.clone()
        amax = torch.zeros(e + 1, d, dtype=torch.float32, device=x.device)
        mag = torch.where(fin, v.abs(), 0.0).float()
        count = torch.zeros(e + 1, dtype=torch.int64, device=x.device)
        bad = torch.zeros(e + 1, dtype=torch.int64, device=x.device)
        nonfin = (~fin).sum(-1)
        for ix in slots:
            dev = (v0 - mean[ix]) * ff
            m2.index_add_(0, ix, dev * dev)
            amax.scatter_reduce_(0, ix.unsqueeze(-1).expand(-1, d), mag, "amax")
            count.index_add_(0, ix, torch.ones_like(ix))
            bad.index_add_(0, ix, nonfin)
        n1, mean1, m21 = merge_moments((s["n"], s["mean"], s["m2"]), (cn[:e], mean[:e], m2[:e]))
        self._state = {"tokens": s["tokens"] + count[:e], "n": n1, "mean": mean1, "m2": m21,
                       "absmax": torch.maximum(s["absmax"], amax[:e]), "nonfinite": s["nonfinite"] + bad[:e]}
