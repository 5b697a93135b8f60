"""Per-token L2 norms ``||h||`` of a site: their distribution, per position, and token anisotropy.

- **Norm distribution** over the kept tokens (``skip_first`` applies, as for the site's own
  moments): moments (``n``, mean, central sums to order 4, Pébay), min, max, and a float-bit
  histogram of the float32 norms (the buckets of :mod:`probe.stats.histogram`, positive half
  only: norms are >= 0), so quantiles carry the same ``2**-m / (2 + 2**-m)`` relative-error bound.
  The norm-scaling factor ``sqrt(D) / E||h||`` that sparse-autoencoder training divides
  activations by (Bricken et al. 2023; Gao et al. 2024) is derived from the mean.
- **Per position**: mean and variance of the norm at each absolute position over every real token
  (``skip_first`` does not apply, so the first-token norm stays visible), like
  :mod:`probe.stats.position`.
- **Anisotropy** (Ethayarajh 2019): the mean cosine similarity between two distinct kept tokens,
  ``(||Σ u||² - n) / (n (n - 1))`` with ``u = h / ||h||`` over the ``n`` tokens with a finite,
  non-zero norm, since ``||Σ u||² = n + Σ_{i≠j} cos(h_i, h_j)``. The state is ``Σ u`` and ``n``:
  sums, so windows, files and ranks merge exactly.

A token with any non-finite value has no norm: it is counted in ``nonfinite`` (kept tokens) and
enters none of these numbers. The norms are float32 (``torch.linalg.vector_norm``, ~1e-7 relative
error); everything accumulated from them is float64. ``Σ u`` is one float32 matrix-vector
product per chunk, accumulated in float64.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ._base import SPECS, StatBase, Tokens, finite, host_checks, merge_moments, stacked
from ._buckets import Buckets
from .position import in_window, position_window

if TYPE_CHECKING:  # typing.Self is Python 3.11+
    from typing_extensions import Self

__all__ = ["Norm"]


#: a float32 norm below this may have lost bits to underflow in its sum of squares (whose
#: largest terms then lie within 2**26 of float32's smallest normal): recomputed in float64 on CPU
TINY_NORM = 2.0**-50


class Norm(StatBase):
    """Per-token L2 norm statistics of one site (``D`` channels, ``P`` positions, ``H = 2**(8+m)``
    norm buckets).

    Fields (declared in :data:`probe.stats._state.NORM`; reduction in brackets): ``n, mean, m2,
    m3, m4`` f64 scalars: moments of the norms of kept tokens (units^p) [``moments``]; ``min``,
    ``max`` f32 [``min``, ``max``]; ``nonfinite`` i64: kept tokens without a finite norm
    [``sum``]; ``counts`` i64 ``[H]``: norms per float-bit bucket [``sum``]; ``pos_n, pos_mean,
    pos_m2`` f64 ``[P]``: norm moments per position over real tokens [``moments``]; ``unit_n`` f64
    and ``unit_sum`` f64 ``[D]``: count and sum of the unit vectors ``h / ||h||`` [``sum``].
    """

    name = "norm"
    chunked = True
    spec = SPECS["norm"]

    def __init__(self, mantissa_bits: int = 7, max_positions: int = 4096) -> None:
        super().__init__()
        #: the norms' buckets: non-negative values, so the positive half only
        self.buckets = Buckets(mantissa_bits, signed=False)
        self.max_positions = max_positions

    @classmethod
    def create(cls, *, histogram_bits: int, max_positions: int, sample_size: int) -> Norm:
        return cls(histogram_bits, max_positions)

    @property
    def m(self) -> int:
        return self.buckets.m

    def dims(self, x: Tensor) -> dict[str, int]:
        return {"D": x.shape[-1], "P": self.max_positions, "H": self.buckets.count}

    def _adopt(self, dims: dict[str, int]) -> None:
        self.buckets = Buckets.of(dims["H"], signed=False)
        self.max_positions = dims["P"]

    @classmethod
    def update_group(cls, stats: list, x: Tensor, tokens: Tokens) -> None:
        """Fold ``x[G, n, D]`` (float32) into ``G`` norm states at once (no host sync)."""
        if not cls._ready(stats, x):
            return
        cls._apply(stats, *cls._norms(x, tokens), tokens)

    @staticmethod
    def _norms(x: Tensor, tokens: Tokens) -> tuple[Tensor, Tensor]:
        """The per-token norms ``[G, n]`` of ``x[G, n, D]`` (NaN or inf where a value is not
        finite) and the sums ``[G, D]`` of the unit vectors of the kept tokens with a finite,
        non-zero norm: the two parts that read the activations."""
        norm = torch.linalg.vector_norm(x, dim=-1)
        xs = finite(x, tokens).xs
        if host_checks(x):
            # the float32 sum of squares overflows once a token's norm passes ~1.8e19 and loses
            # bits to underflow below TINY_NORM (a norm under 2**-126 is not even a normal
            # float32): those tokens' norms in float64 and the chunk's norms kept in float64 (CPU,
            # read on the host); a token with a non-finite value stays non-finite
            host = norm.detach().numpy()  # a host read, in numpy (cheaper on a few hundred values)
            if not host.min(initial=np.inf) >= TINY_NORM or np.isinf(host).any():  # NaN fails >=
                at = torch.nonzero(~(norm >= TINY_NORM) | torch.isinf(norm), as_tuple=True)
                norm = norm.double()
                norm[at] = torch.linalg.vector_norm(x.detach()[at], dim=-1, dtype=torch.float64)
                if bool(((norm > 0) & (norm < 2.0**-120)).any()):
                    xs = xs.double()  # 1 / norm would pass float32's largest value
        unit = torch.isfinite(norm) & tokens.keep & (norm > 0)
        coef = torch.where(unit, 1.0 / torch.where(unit, norm, 1.0), 0.0)  # [G, n]
        usum = torch.bmm(coef.to(xs.dtype).unsqueeze(1), xs).squeeze(1)
        return norm, usum

    @classmethod
    def partial(cls, stat: Self, x: Tensor, tokens: Tokens) -> tuple | None:
        """The norms and unit-vector sums of one site's chunk ``x[1, n, D]`` (see
        :meth:`StatBase.partial`); :meth:`fold` does the rest for every site at once."""
        if not cls._ready([stat], x):
            return None
        return (*cls._norms(x, tokens), tokens)

    @classmethod
    def fold(cls, stats: list, parts: list) -> None:
        pairs = [(stat, part) for stat, part in zip(stats, parts) if part is not None]
        if pairs:
            wide = any(part[0].dtype == torch.float64 for _, part in pairs)  # some sites' norms in float64
            norm = torch.cat([part[0].double() if wide else part[0] for _, part in pairs])
            usum = torch.cat([part[1].double() for _, part in pairs])
            cls._apply([stat for stat, _ in pairs], norm, usum, pairs[0][1][2])

    @classmethod
    def _apply(cls, stats: list, norm: Tensor, usum: Tensor, tokens: Tokens) -> None:
        """Fold the norms ``[G, n]`` and unit-vector sums ``[G, D]`` of ``G`` sites into their
        states (batched over the sites; no host sync)."""
        g, n = norm.shape
        f64 = torch.float64
        s = {f: stacked([st.s[f] for st in stats]) for f in cls._fields}
        fin = torch.isfinite(norm)
        zero = torch.zeros((), dtype=norm.dtype, device=norm.device)
        norm0 = torch.where(fin, norm, zero)
        kept = fin & tokens.keep
        w = kept.to(f64)
        v = norm0.to(f64)
        # moments of the kept norms: a two-pass chunk in float64 (n values per site, not n * D)
        cn = w.sum(-1)
        mean = (v * w).sum(-1) / cn.clamp(min=1)
        dev = (v - mean.unsqueeze(-1)) * w
        d2 = dev * dev
        chunk = (cn, mean, d2.sum(-1), (d2 * dev).sum(-1), (d2 * d2).sum(-1))
        n1, mean1, m21, m31, m41 = merge_moments(tuple(s[f] for f in ("n", "mean", "m2", "m3", "m4")), chunk)
        lo = torch.where(kept, norm0, float("inf")).amin(-1).float()
        hi = torch.where(kept, norm0, float("-inf")).amax(-1).float()
        nonfinite = s["nonfinite"] + (~fin & tokens.keep).sum(-1)
        # float-bit buckets of the (non-negative) float32 norms; excluded tokens to the spare bucket
        b = stats[0].buckets
        bits = norm0.float().contiguous().view(torch.int32)
        index = torch.where(kept, b.index(bits), b.spare).to(torch.int64)
        index = index + (torch.arange(g, device=norm.device) * (b.spare + 1)).unsqueeze(-1)
        one = torch.ones((), dtype=torch.int64, device=norm.device).expand(index.numel())
        counts = s["counts"].reshape(-1).index_add(0, index.reshape(-1), one).view(g, b.spare + 1)
        # per position, over every real token with a finite norm; on CPU over the window of
        # positions the chunk reaches (a decode step: one), the others left as they are
        p = s["pos_n"].shape[-1]
        window = position_window(tokens, p)
        start, stop = (0, p) if window is None else window
        position = tokens.position - start
        inside = fin & tokens.valid & (position >= 0) & (position < stop - start)
        where = torch.where(inside, position, 0).expand(g, n)
        wi = inside.to(f64)
        zeros = torch.zeros(g, stop - start, dtype=f64, device=norm.device)
        pn = zeros.scatter_add(1, where, wi)
        pmean = zeros.scatter_add(1, where, v * wi) / pn.clamp(min=1)
        pdev = (v - pmean.gather(1, where)) * wi
        pm2 = zeros.scatter_add(1, where, pdev * pdev)
        before = (s["pos_n"], s["pos_mean"], s["pos_m2"])
        pos = merge_moments(tuple(f[..., start:stop] for f in before), (pn, pmean, pm2))
        if window is not None:
            pos = tuple(in_window(f, start, stop, m) for f, m in zip(before, pos))
        # the sum of unit vectors h / ||h|| over kept tokens with a non-zero norm
        unit = kept & (norm0 > 0)
        new = {"n": n1, "mean": mean1, "m2": m21, "m3": m31, "m4": m41,
               "min": torch.minimum(s["min"], lo), "max": torch.maximum(s["max"], hi),
               "nonfinite": nonfinite, "counts": counts,
               "pos_n": pos[0], "pos_mean": pos[1], "pos_m2": pos[2],
               "unit_n": s["unit_n"] + unit.to(f64).sum(-1), "unit_sum": s["unit_sum"] + usum.to(f64)}
        rows = {f: new[f].unbind(0) for f in cls._fields}
        for i, st in enumerate(stats):
            st._state = {f: rows[f][i] for f in cls._fields}
