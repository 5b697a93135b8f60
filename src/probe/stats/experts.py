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

On CPU (:func:`~probe.stats._base.host_reads`) a chunk first takes a shifted one-pass path: the
float64 deviations ``y = x - c`` from each channel's mean ``c`` over a strided sample of the
chunk's rows, and their squares, summed per expert by one matrix product with the routing one-hot
(or one ``index_add_``): ``M2 = Σy² - (Σy)² / n`` (the shifted-data algorithm of Chan, Golub &
LeVeque 1983). It is kept where every routed value is finite and no expert's ``M2`` lost more than
four of float64's sixteen digits to the cancellation (``Σy² < 10⁴ · M2``: its mean within 100
standard deviations of ``c``); an expert past that (two nearly equal values, a channel offset far
from the rest) has its own rows redone in two passes, and a chunk with a non-finite routed value
takes the two-pass path above. The host reads cost nothing on CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ProbeError
from ._base import SPECS, Tokens, host_reads, merge_moments, scratch
from .router import MoeConfigured

__all__ = ["Experts"]


def _slots(x: Tensor, tokens: Tokens, e: int, k: int) -> Tensor:
    """The expert of each (token, top-k slot) of packed rows ``x`` as int64 ``[n, k]``: ``E`` (a
    spare row) for padding and for an index outside ``[0, E)``, a slot that holds no expert
    (experts held as modules)."""
    index = x[:, :k]
    return torch.where(tokens.valid.unsqueeze(-1) & (index >= 0) & (index < e), index.long().clamp(0, e - 1), e)


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
        d = (x.shape[-1] - k) // k if self.per_slot else x.shape[-1] - k
        chunk = self._shifted(x, tokens, e, k, d) if host_reads(x) else None
        count, cn, mean, m2, amax, bad = chunk if chunk is not None else self._two_pass(x, tokens, e, k, d)
        n1, mean1, m21 = merge_moments((s["n"], s["mean"], s["m2"]), (cn, mean, m2))
        self._state = {"tokens": s["tokens"] + count, "n": n1, "mean": mean1, "m2": m21,
                       "absmax": torch.maximum(s["absmax"], amax), "nonfinite": s["nonfinite"] + bad}

    #: the shifted path is kept where every expert's ``Σy²`` is below this many times its ``M2``
    CANCELLATION = 1e4

    def _shifted(self, x: Tensor, tokens: Tokens, e: int, k: int, d: int) -> tuple[Tensor, ...] | None:
        """The chunk's ``(tokens [E], n [E, D], mean, M2, absmax, nonfinite)`` by the shifted
        one-pass sums (a CPU chunk; see the module docstring), or ``None`` where the two-pass path
        must run (a non-finite value routed to an expert)."""
        f64 = torch.float64
        ix = _slots(x, tokens, e, k)
        n = x.shape[0]
        rows = x[:, k:].view(n, k, d) if self.per_slot else x[:, k:]  # [n, k, D] or [n, D]: views
        m = n * k if self.per_slot else n
        buf = scratch("experts.y", (m, 2 * d), f64)
        y, y2 = buf[:, :d], buf[:, d:]
        y.view(rows.shape).copy_(rows)
        c = y[::max(1, m // 128)].mean(0)  # any shift is exact; one near the means keeps the digits
        y.sub_(c)
        torch.mul(y, y, out=y2)
        flat = ix.reshape(-1)
        if self.per_slot:  # one expert a row: one scatter of the rows
            sums = torch.zeros(e + 1, 2 * d, dtype=f64).index_add_(0, flat, buf)[:e]
        elif e <= 16 * k:  # k experts a row: the routing multi-hot [m, E] times the rows (E·m·2D products)
            hot = torch.zeros(m, e + 1, dtype=f64).scatter_add_(1, ix, torch.ones(n, k, dtype=f64))
            sums = hot[:, :e].mT @ buf
        else:  # many experts: a scatter per slot (k·m·2D additions) costs less than the product
            sums = torch.zeros(e + 1, 2 * d, dtype=f64)
            for j in range(k):
                sums.index_add_(0, ix[:, j].contiguous(), buf)
            sums = sums[:e]
        count = torch.bincount(flat, minlength=e + 1)[:e]
        cn = count.to(f64).unsqueeze(-1)
        s1, s2 = sums[:, :d], sums[:, d:]
        dm = s1 / cn.clamp(min=1)
        m2 = s2 - s1 * dm
        one = cn < 2
        if not bool(torch.isfinite(sums).all()):
            return None
        mean = torch.where(cn > 0, c + dm, 0.0)
        poor = ~((m2 * self.CANCELLATION > s2) | (s2 == 0) | one).all(-1)  # [E]
        for ex in poor.nonzero().flatten().tolist():  # rare: redo these experts' rows in two passes
            picked = (flat == ex) if self.per_slot else (ix == ex).any(-1)
            v = (rows.reshape(m, d) if self.per_slot else rows)[picked].to(f64)
            mean[ex] = v.mean(0)
            m2[ex] = (v - mean[ex]).square().sum(0)
        mags = torch.abs(rows, out=scratch("experts.abs", tuple(rows.shape))).view(m, d)
        amax = torch.zeros(e + 1, d, dtype=torch.float32)
        if self.per_slot:
            amax.scatter_reduce_(0, flat.unsqueeze(-1).expand(-1, d), mags, "amax")
        else:
            for j in range(k):
                amax.scatter_reduce_(0, ix[:, j].contiguous().unsqueeze(-1).expand(-1, d), mags, "amax")
        m2 = torch.where(one, 0.0, m2)
        return count, cn.expand(-1, d), mean, m2, amax[:e], torch.zeros_like(count)

    def _two_pass(self, x: Tensor, tokens: Tokens, e: int, k: int, d: int) -> tuple[Tensor, ...]:
        """The chunk's ``(tokens, n, mean, M2, absmax, nonfinite)`` by two passes in float64 over
        each slot's rows, masking non-finite values (no host read)."""
        f64 = torch.float64
        # one input per slot (down projection) or one shared by every slot (gate/up projections)
        parts = [x[:, k + j * d:k + (j + 1) * d] for j in range(k)] if self.per_slot else [x[:, k:]]
        fins = [torch.isfinite(v) for v in parts]
        v0s = [torch.where(fin, v, 0.0).to(f64) for v, fin in zip(parts, fins)]
        ffs = [fin.to(f64) for fin in fins]
        slots = _slots(x, tokens, e, k).unbind(1)
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
        return count[:e], cn[:e], mean[:e], m2[:e], amax[:e], bad[:e]
