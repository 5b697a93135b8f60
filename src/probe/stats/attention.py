"""Attention internals of one attention module, per head, over real query tokens only.

The site's tensor is the module's attention call reduced by :mod:`probe.capture.attention` to
``[n, F·H]`` float32 rows, one per query token (``n = batch · sequence``), laid out ``[n, F, H]``
with ``F = 4 + K``: per head the largest scaled logit ``q·k · scaling`` over the keys the query
may attend to, the key distance of that maximum (query index minus key index in cache
coordinates, exact as float32 below ``2**24``), the attention entropy ``-Σ p ln p`` (nats), that
entropy over ``ln(allowed keys)`` (0 for a query with one key), and the probability on the
query's first ``K`` allowed keys (:data:`~probe.stats._state.ATTENTION_SINKS`). From these, per
window and mergeable exactly:

- ``maxlogit[h]`` and ``maxlogit_at[h]`` = (row, query position, key position, query token id):
  QK-Clip's MaxLogit (Kimi K2, 2025: the largest pre-softmax logit of head ``h``), the raw
  ``q·k · scaling`` before any soft cap or additive mask bias; ties go to the earliest (row,
  query position), as the ``argmax`` reduction everywhere;
- moments (Pébay/Chan, float64) and a histogram (``R`` linear bins over ``[0, 1]`` of entropy /
  ``ln(allowed keys)``) of the per-query attention entropy, the quantity whose collapse Zhai et
  al. (2023, "Stabilizing transformer training by preventing attention entropy collapse") track;
- ``sink[h, j]``: the summed probability on the ``j``-th allowed key, i.e. the mass the "attention
  sink" (Xiao et al. 2023) takes; divided by ``entropy_n`` it is the mean share.

Padding queries are never counted (``tokens.valid``); ``skip_first`` does not apply. A query row
with a non-finite value (a non-finite logit, or no allowed key) is counted in ``nonfinite`` and
enters nothing else. No host sync.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ProbeError
from ._base import SPECS, StatBase, Tokens, merge_moments
from ._state import ATTENTION_BINS, ATTENTION_SINKS, argmax_better

__all__ = ["Attention", "FIELDS"]

#: values per head in a packed row: max logit, its key distance, entropy, normalized entropy, K sink masses
FIELDS = 4 + ATTENTION_SINKS


class Attention(StatBase):
    """Per-head attention statistics of one attention site (``H`` heads); fields in
    :data:`probe.stats._state.ATTENTION`."""

    name = "attention"
    chunked = True
    site_only = True
    spec = SPECS["attention"]

    def dims(self, x: Tensor) -> dict[str, int]:
        d = x.shape[-1]
        if d % FIELDS:
            raise ProbeError(f"attention rows have {d} values; expected a multiple of {FIELDS} (per head: max "
                             "logit, key distance, entropy, normalized entropy, sink masses); the site is not an "
                             "attention site of probe.capture.attention")
        return {"H": d // FIELDS, "R": ATTENTION_BINS, "K": ATTENTION_SINKS}

    @classmethod
    def update_group(cls, stats: list, x: Tensor, tokens: Tokens) -> None:
        """Fold ``x[G, n, F·H]``, ``G`` attention sites' packed rows, site by site (no host sync)."""
        if not cls._ready(stats, x):
            return
        for g, stat in enumerate(stats):
            stat._fold(x[g], tokens)

    def _fold(self, x: Tensor, tokens: Tokens) -> None:
        s = self.s
        f64 = torch.float64
        n = x.shape[0]
        h = x.shape[-1] // FIELDS
        v = x.reshape(n, FIELDS, h)
        logit, dist, ent, norm, sink = v[:, 0], v[:, 1], v[:, 2], v[:, 3], v[:, 4:]
        fin = torch.isfinite(v).all(1)  # [n, h]
        w = tokens.valid.unsqueeze(-1) & fin
        wf = w.to(f64)
        # MaxLogit: the first (row, position) holding each head's largest logit
        cand = torch.where(w, logit, float("-inf"))
        best = cand.amax(0)  # [h]
        order = torch.arange(n, device=x.device).unsqueeze(-1)
        first = torch.where((cand == best) & w, order, n).amin(0).clamp(max=n - 1)  # [h]
        hit = w.any(0)
        heads = torch.arange(h, device=x.device)
        pos = tokens.position[first]
        at = torch.stack((tokens.row[first], pos, pos - dist[first, heads].long(), tokens.token[first]), -1)
        at = torch.where(hit.unsqueeze(-1), at, -1)
        better = argmax_better(best, at, s["maxlogit"], s["maxlogit_at"])
        # entropy moments (float64) and histogram of entropy / ln(allowed keys)
        e = torch.where(w, ent, 0.0).to(f64)
        cn = wf.sum(0)
        mean = (e * wf).sum(0) / cn.clamp(min=1)
        dev = (e - mean) * wf
        d2 = dev * dev
        part = (cn, mean, d2.sum(0), (d2 * dev).sum(0), (d2 * d2).sum(0))
        moments = merge_moments((s["entropy_n"], s["entropy_mean"], s["entropy_m2"], s["entropy_m3"],
                                 s["entropy_m4"]), part)
        r = ATTENTION_BINS
        bins = torch.where(w, (norm.to(f64) * r).floor().clamp(0, r - 1).long(), r) + heads * (r + 1)
        hist = torch.zeros(h * (r + 1), dtype=torch.int64, device=x.device).index_add_(
            0, bins.reshape(-1), torch.ones(bins.numel(), dtype=torch.int64, device=x.device)).view(h, r + 1)[:, :r]
        mass = torch.where(w.unsqueeze(1), sink, 0.0).to(f64).sum(0).T  # [h, K]
        self._state = {
            "tokens": s["tokens"] + tokens.valid.sum(),
            "maxlogit": torch.where(better, best, s["maxlogit"]),
            "maxlogit_at": torch.where(better.unsqueeze(-1), at, s["maxlogit_at"]),
            "entropy_n": moments[0], "entropy_mean": moments[1], "entropy_m2": moments[2],
            "entropy_m3": moments[3], "entropy_m4": moments[4],
            "entropy_hist": s["entropy_hist"] + hist,
            "sink": s["sink"] + mass,
            "nonfinite": s["nonfinite"] + (tokens.valid.unsqueeze(-1) & ~fin).sum(0),
        }
