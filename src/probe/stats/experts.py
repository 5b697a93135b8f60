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
quantizer calibrates on every token). At a ``<experts>:down_proj`` site (configured ``per_slot``)
the rows are ``[n, k + k·I]``: the indices, then one ``I``-wide input per slot — the down
projection's input ``act(gate) · up`` of that (token, expert) pair. The update scatters each
top-k slot's rows into per-expert sums (``index_add_``): ``O(k · n · D)`` work, as much as reading
the rows each expert computes once — not ``E`` passes. No host sync.
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
        width = x.shape[-1] - k
        if width <= 0 or (self.per_slot and width % k):
            want = f"k + k·I = {k} + {k}·I (indices, one input per slot)" if self.per_slot else \
                f"k + D > {k} (indices, input)"
            raise ProbeError(f"expert rows have {x.shape[-1]} values; expected {want}; "
                             "the site is not an experts module packed by probe.capture.moe")
        return {"E": e, "D": width // k if self.per_slot else width}

    def _fold(self, x: Tensor, tokens: Tokens) -> None:
        e, k = self._layer()
        s = self.s
        f64 = torch.float64
        d = (x.shape[-1] - k) // k if self.per_slot else x.shape[-1] - k
        # one input per slot (down projection) or one shared by every slot (gate/up projections)
        parts = [x[:, k + j * d:k + (j + 1) * d] for j in range(k)] if self.per_slot else [x[:, k:]]
        fins = [torch.isfinite(v) for v in parts]
        v0s = [torch.where(fin, v, 0.0).to(f64) for v, fin in zip(parts, fins)]
        ffs = [fin.to(f64) for fin in fins]
        # an index outside [0, E) is a slot that holds no expert (experts held as modules)
        slots = [torch.where(tokens.valid & (x[:, j] >= 0) & (x[:, j] < e), x[:, j].long().clamp(0, e - 1), e)
                 for j in range(k)]
        at = (lambda j: j) if self.per_slot else (lambda j: 0)
        zeros = torch.zeros(e + 1, d, dtype=f64, device=x.device)
        cn, s1 = zeros.clone(), zeros.clone()
        for j, ix in enumerate(slots):  # a token is routed to an expert at most once
            cn.index_add_(0, ix, ffs[at(j)])
            s1.index_add_(0, ix, v0s[at(j)])
        mean = s1 / cn.clamp(min=1)
        m2 = zeros.clone()
        amax = torch.zeros(e + 1, d, dtype=torch.float32, device=x.device)
        mags = [torch.where(fin, v.abs(), 0.0).float() for v, fin in zip(parts, fins)]
        count = torch.zeros(e + 1, dtype=torch.int64, device=x.device)
        bad = torch.zeros(e + 1, dtype=torch.int64, device=x.device)
        nonfins = [(~fin).sum(-1) for fin in fins]
        for j, ix in enumerate(slots):
            dev = (v0s[at(j)] - mean[ix]) * ffs[at(j)]
            m2.index_add_(0, ix, dev * dev)
            amax.scatter_reduce_(0, ix.unsqueeze(-1).expand(-1, d), mags[at(j)], "amax")
            count.index_add_(0, ix, torch.ones_like(ix))
            bad.index_add_(0, ix, nonfins[at(j)])
        n1, mean1, m21 = merge_moments((s["n"], s["mean"], s["m2"]), (cn[:e], mean[:e], m2[:e]))
        self._state = {"tokens": s["tokens"] + count[:e], "n": n1, "mean": mean1, "m2": m21,
                       "absmax": torch.maximum(s["absmax"], amax[:e]), "nonfinite": s["nonfinite"] + bad[:e]}
