"""Routing statistics of one mixture-of-experts router, over real tokens only.

The site's tensor is the router's call packed by :mod:`probe.capture.moe` as ``[n, E + 2k]``
float32 rows: the ``E`` router logits, then the ``k`` chosen experts' indices (exact as float32
for ``E < 2**24``), then their ``k`` routing weights, as the model's router returned them. From
these, per window (so collapse shows over training steps) and mergeable exactly (every field is a
sum, or moments merged by Pébay/Chan):

- ``counts[e]``: the (token, top-k slot) assignments of real tokens to expert ``e`` — the rows
  expert ``e`` computes, what llama.cpp's imatrix counts per expert; ``tokens``: real tokens;
- ``weight_sum[e]`` (sum of routing weights) and ``prob_sum[e]`` (sum of ``softmax(logits)[e]``,
  the router probability of Switch Transformer's load-balancing loss, Fedus et al. 2021, eq. 4);
- routing entropy ``H = -Σ p log p`` of ``p = softmax(logits)`` (nats, float64) per token: its
  moments and a histogram of ``H / ln E`` in ``R`` linear bins over ``[0, 1]``;
- a histogram of the top-k routing weights in ``R`` linear bins over ``[0, 1]`` (a weight of
  exactly 1 falls in the last bin);
- ``rank_counts[r, e]``: ``counts`` per capturing rank (one row in one process; under
  ``torch.distributed`` the rank merge gives rank ``r`` row ``r``, :func:`probe.capture.sync.per_rank`).

Padding is never counted (``tokens.valid``); ``skip_first`` does not apply (a quantizer calibrates
on every token, and the first token's routing is part of the load). A token with a non-finite
logit is counted in ``nonfinite`` and enters nothing else. No host sync.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import ProbeError
from ._base import SPECS, StatBase, Tokens, merge_moments
from ._state import ROUTER_BINS

__all__ = ["Router", "MoeConfigured"]


class MoeConfigured(StatBase):
    """A statistic that runs only at mixture-of-experts sites, told the layer's expert count ``E``
    and top-k ``k`` by the capture (:meth:`configure`) before its first update."""

    #: runs only at the sites that name it (MoE routers, experts), never at the others
    site_only = True

    def __init__(self) -> None:
        super().__init__()
        self.experts: int | None = None
        self.top_k: int | None = None
        self.per_slot = False

    def configure(self, experts: int, top_k: int, per_slot: int = 0) -> None:
        """The layer's number of experts and experts per token; ``per_slot``: each row holds one
        input per top-k slot (the down projection's input), not one shared by all slots."""
        self.experts, self.top_k, self.per_slot = int(experts), int(top_k), bool(per_slot)

    def _layer(self) -> tuple[int, int]:
        if self.experts is None or self.top_k is None:
            raise ProbeError(f"the {self.name!r} statistic runs at mixture-of-experts sites only; expected a site "
                             "found by sites='moe'; capture with sites='moe' (or 'linear_inputs')")
        return self.experts, self.top_k

    def _adopt(self, dims: dict[str, int]) -> None:
        if self.experts is None:
            self.experts = dims["E"]

    @classmethod
    def update_group(cls, stats: list, x: Tensor, tokens: Tokens) -> None:
        """Fold ``x[G, n, ...]``, ``G`` MoE sites' packed rows (``E + 2k`` values per row for a
        router: logits, indices, weights; ``k + D`` for experts: indices, input), into their
        states, site by site (each layer routes differently; no host sync)."""
        if not cls._ready(stats, x):
            return
        for g, stat in enumerate(stats):
            stat._fold(x[g], tokens)

    def _fold(self, x: Tensor, tokens: Tokens) -> None:
        raise NotImplementedError


class Router(MoeConfigured):
    """Routing statistics of one router (``E`` experts, ``R`` bins); fields in
    :data:`probe.stats._state.ROUTER`."""

    name = "router"
    chunked = True
    spec = SPECS["router"]

    def dims(self, x: Tensor) -> dict[str, int]:
        e, k = self._layer()
        if x.shape[-1] != e + 2 * k:
            raise ProbeError(f"router rows have {x.shape[-1]} values; expected E + 2k = {e + 2 * k} (logits, "
                             "indices, weights); the site is not a router packed by probe.capture.moe")
        return {"E": e, "R": ROUTER_BINS, "W": 1}  # W: one rank's row (widened at the rank merge)

    def _fold(self, x: Tensor, tokens: Tokens) -> None:
        e, k = self._layer()
        s = self.s
        f64 = torch.float64
        logits, idx, weights = x[:, :e], x[:, e:e + k], x[:, e + k:]
        fin = torch.isfinite(logits).all(-1)
        w = tokens.valid & fin  # [n]
        wf = w.to(f64)
        lp = torch.log_softmax(torch.where(fin.unsqueeze(-1), logits, 0.0).to(f64), -1)
        p = lp.exp()
        ent = -(p * lp).sum(-1)  # [n], nats
        # counts and weights per expert: excluded tokens go to a spare expert E
        ix = torch.where(w.unsqueeze(-1), idx.long().clamp(0, e - 1), e).reshape(-1)
        one = torch.ones_like(ix)
        counts = torch.zeros(e + 1, dtype=torch.int64, device=x.device).index_add_(0, ix, one)[:e]
        wsum = torch.zeros(e + 1, dtype=f64, device=x.device).index_add_(0, ix, weights.reshape(-1).to(f64))[:e]
        r = ROUTER_BINS
        wbin = torch.where(w.unsqueeze(-1), (weights.to(f64) * r).floor().clamp(0, r - 1).long(), r).reshape(-1)
        whist = torch.zeros(r + 1, dtype=torch.int64, device=x.device).index_add_(0, wbin, one)[:r]
        scale = 1.0 / math.log(e) if e > 1 else 0.0
        ebin = torch.where(w, (ent * scale * r).floor().clamp(0, r - 1).long(), r)
        ehist = torch.zeros(r + 1, dtype=torch.int64, device=x.device).index_add_(0, ebin, torch.ones_like(ebin))[:r]
        cn = wf.sum()
        mean = (ent * wf).sum() / cn.clamp(min=1)
        dev = (ent - mean) * wf
        n1, mean1, m21 = merge_moments((s["entropy_n"], s["entropy_mean"], s["entropy_m2"]), (cn, mean, (dev * dev).sum()))
        self._state = {
            "tokens": s["tokens"] + w.sum(), "counts": s["counts"] + counts, "weight_sum": s["weight_sum"] + wsum,
            "prob_sum": s["prob_sum"] + (p * wf.unsqueeze(-1)).sum(0),
            "entropy_n": n1, "entropy_mean": mean1, "entropy_m2": m21,
            "entropy_hist": s["entropy_hist"] + ehist, "weight_hist": s["weight_hist"] + whist,
            "nonfinite": s["nonfinite"] + (tokens.valid & ~fin).sum(),
            "rank_counts": s["rank_counts"] + counts.unsqueeze(0),
        }
