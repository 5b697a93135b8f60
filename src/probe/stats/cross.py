"""Layer × layer covariance and R² over matching (token, channel) elements, in float64.

Each site is one variable and each kept (token, channel) element one observation, so entry
``(i, j)`` compares site ``i`` and site ``j`` at the same place in the same forward. This needs
every site of a forward at once: the sites' tensors are held by reference (no copy; in training
autograd holds them anyway) until the forward ends, then folded in token blocks of at most
``block_bytes`` of float64 (8 MiB on CPU, where small blocks stay in cache; 256 MiB on an
accelerator, where each block costs a few kernel launches per site), which bounds the temporaries
and is exact (blocks merge with the co-moment formula). An element that is non-finite in any site
is left out for all sites.

Two views: ``keep`` (the first ``skip_first`` real tokens excluded) and ``all`` (every real
token). ``all`` is ``keep`` merged with the excluded head, so the big Gram is computed once.

If holding one forward's sites would pass ``budget`` bytes, that forward is left out of these
statistics (only these), ``skipped_tokens`` counts its tokens and a warning says how to fix it.

The same blocks give the per-token cosine similarity between sites: the Gram matrix of the
tokens' unit vectors ``h / ||h||`` sums ``cos(h_i[t], h_j[t])`` over tokens (one more ``[S, t·D]``
product per block), and ``1 - cos`` between consecutive sites is counted over float-bit buckets.
A token enters these only when it has a non-zero norm at every site.

State: for each view ``v`` in (``keep``, ``all``): ``v_n`` float64 scalar, ``v_mean`` ``[S]``,
``v_c`` ``[S, S]`` (co-moment sums), ``v_cos_n`` float64 scalar and ``v_cos`` ``[S, S]`` (sums
of cosines); ``keep_cos_hist`` int64 ``[S, 2**(8 + COS_BITS)]`` (row ``l``: sites ``l, l + 1``;
the last row stays 0); ``skipped_tokens`` int64
scalar.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from ._base import SPECS, StatBase, Tokens, host_reads, scratch
from ._buckets import Buckets

__all__ = ["Cross"]


def _comoments(x: Tensor, w: Tensor, inplace: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``(n, mean[S], C[S, S])`` of float64 ``x[S, t, D]`` over the tokens where the 0/1 float64
    ``w[t]`` is 1 (``x`` must be finite everywhere). ``inplace``: ``x`` is a scratch copy that
    may be overwritten by its centered values (no second block-sized buffer)."""
    s, _, d = x.shape
    n = w.sum() * d
    mean = (x.sum(2) @ w) / n.clamp(min=1)
    if inplace:
        xc = x.sub_(mean.view(s, 1, 1)).mul_(w.view(1, -1, 1)).view(s, -1)
    else:  # (x - mean) * w in one fused pass: -mean * w + x * w
        xc = torch.addcmul(-mean.view(s, 1, 1) * w.view(1, -1, 1), x, w.view(1, -1, 1)).view(s, -1)
    return n, mean, xc @ xc.T


#: mantissa bits of the float-bit buckets of ``1 - cos`` between consecutive sites
COS_BITS = 4
#: the buckets of ``1 - cos`` (in ``[0, 2]``: the positive half only)
COS_BUCKETS = Buckets(COS_BITS, signed=False)


def _cosines(x: Tensor, w: Tensor, hist: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(n, Σ_t cos(x_i[t], x_j[t]) [S, S])`` over the tokens of float64 ``x[S, t, D]`` where
    ``w[t]`` is 1 and every site's vector is non-zero: the Gram matrix of the flattened unit
    vectors, since ``Σ_t Σ_d u_i[t, d] u_j[t, d] = Σ_t cos(x_i[t], x_j[t])``. With ``hist``
    (int64 ``[S, 2**(8 + COS_BITS) + 1]``), each counted token's ``1 - cos`` between sites ``l``
    and ``l + 1`` is added to its float-bit bucket in row ``l`` (in place; the last column is a
    spare)."""
    s, t, d = x.shape
    norm = torch.linalg.vector_norm(x, dim=-1)  # [S, t]
    good = w * (norm > 0).all(0).to(w.dtype)
    # 1 / norm where the token counts, 0 elsewhere: one scaled copy of the block
    scale = good / torch.where(good > 0, norm, 1.0)
    u = torch.mul(x, scale.unsqueeze(-1))
    if hist is not None and s > 1 and t > 0:
        dist = (1.0 - (u[:-1] * u[1:]).sum(-1)).clamp(min=0.0).float()  # [S - 1, t], in [0, 2]
        index = torch.where(good > 0, COS_BUCKETS.index(dist.view(torch.int32)), COS_BUCKETS.spare).long()
        index = index + (torch.arange(s - 1, device=x.device) * hist.shape[1]).unsqueeze(-1)
        one = torch.ones((), dtype=torch.int64, device=x.device).expand(index.numel())
        hist.view(-1).index_add_(0, index.view(-1), one)
    u = u.view(s, -1)
    return good.sum(), u @ u.T


def _merge(a: tuple, b: tuple) -> tuple:
    na, ma, ca = a
    nb, mb, cb = b
    n = na + nb
    delta = mb - ma
    mean = ma + delta * nb / n.clamp(min=1)
    c = ca + cb + torch.outer(delta, delta) * (na * nb / n.clamp(min=1))
    return n, mean, c


def _add(a: tuple, b: tuple) -> tuple:
    return a[0] + b[0], a[1] + b[1]


class Cross(StatBase):
    """Layer × layer co-moments of ``S`` sites over matching (token, channel) elements.

    Fields (declared in :data:`probe.stats._state.CROSS`; reduction in brackets), for each view
    ``v`` in (``keep``, ``all``): ``v_n`` f64 observations, ``v_mean`` f64 ``[S]`` (activation
    units), ``v_c`` f64 ``[S, S]`` co-moment sums Σ(x_i − mean_i)(x_j − mean_j) (units²)
    [``comoments``, one group per view]; ``v_cos_n`` f64 tokens and ``v_cos`` f64 ``[S, S]``
    Σ_t cos(h_i[t], h_j[t]) [``sum``]; ``keep_cos_hist`` i64 ``[S, 2**(8 + COS_BITS)]``: kept
    tokens per float-bit bucket of ``1 - cos(h_l, h_l+1)`` in row ``l`` (the last row stays 0) [``sum``]; ``skipped_tokens`` i64:
    tokens of forwards left out [``sum``].
    """

    name = "cross"
    chunked = False
    #: the cross-site kind: fed by :meth:`hold` per site and :meth:`finish` per forward
    per_site = False
    spec = SPECS["cross"]

    def __init__(self, sites: list[str], budget: int = 2 << 30, block_bytes: int | None = None,
                 cosines: bool = True) -> None:
        super().__init__()
        #: also accumulate the per-token cosines (``capture(stats=(..., "cross", "cos"))``); off,
        #: their fields stay empty (about doubles this statistic's cost)
        self.cosines = cosines
        self.candidates = list(sites)
        #: indices (into ``candidates``) of the sites in the matrices, fixed by the first forward:
        #: the largest group of its sites with one width and the same tokens (one stack's call and
        #: grid: not an encoder beside its decoder, nor feature maps of other sizes)
        self.members: list[int] | None = None
        self.budget = budget
        self.block_bytes = block_bytes
        self._held: dict[int, tuple[Tensor, int]] = {}
        self._widths: dict[int, int] = {}
        self._token_of: dict[int, Tokens] = {}
        self._held_bytes = 0
        self._over = False
        self._warned = False
        self._tokens: Tokens | None = None
        #: a pipeline stage's relay (:class:`probe.capture.parallel.Relay`): every forward's sites
        #: go on to the next stage, and the last stage folds all of them; ``None``: one model
        self.relay: Any = None
        #: with a relay, on the last stage: the earlier stages' sites, first in the matrices
        self.upstream = 0
        self._early = 0  # tokens skipped before the matrices could be sized (a pipeline's first forwards)

    @property
    def sites(self) -> list[str]:
        """Names of this process's sites in matrix order (a pipeline stage's own, after the
        earlier stages' ``upstream`` ones)."""
        return [self.candidates[i] for i in (self.members or [])]

    def dims(self, x: Tensor | None = None) -> dict[str, int]:
        # row l of keep_cos_hist: the pair (l, l + 1); S rows (the last stays 0) so that one
        # site gives no empty dim
        return {"S": self.upstream + len(self.sites), "C": COS_BUCKETS.count}

    def hold(self, index: int, x: Tensor, tokens: Tokens) -> None:
        """Keep a reference to site ``index``'s ``[n, D]`` tensor until :meth:`finish`."""
        if self._tokens is not None and self._tokens.forward != tokens.forward:
            self.finish()
        self._tokens = tokens
        self._widths[index] = x.shape[1]
        self._token_of[index] = tokens
        if self._over or (self.members is not None and index not in self.members):
            return
        size = x.numel() * x.element_size()
        if self._held_bytes + size > self.budget:
            self._over = True
            self._held.clear()
            self._held_bytes = 0
            return
        self._held[index] = (x, x._version)
        self._held_bytes += size

    def finish(self) -> None:
        """Fold the held forward in and release it."""
        tokens, held, over, widths, token_of = self._tokens, self._held, self._over, self._widths, self._token_of
        self._tokens, self._held, self._held_bytes, self._over, self._widths = None, {}, 0, False, {}
        self._token_of = {}
        if tokens is None:
            return
        device = tokens.keep.device
        if self.members is None and widths:
            drop = self.relay.drop if self.relay is not None else None
            self.members = self._group(widths, token_of, drop)
        if self.members and self.members[0] in token_of:  # the members' tokens, not the last site's
            tokens = token_of[self.members[0]]
        if self.relay is not None:  # a pipeline stage: every stage passes every forward on
            stale = [self.candidates[i] for i, (x, v) in held.items() if x._version != v]
            whole = self.members is not None and not over and not stale and all(i in held for i in self.members)
            xs = self.relay.pass_on([held[i][0] for i in self.members or ()] if whole else None, tokens,
                                    self.budget)
            if not self.relay.last:
                return
            if xs is not None:
                self.upstream = len(xs) - len(self.members or ())
                held = {i: (x, x._version) for i, x in enumerate(xs)}
            over, stale = xs is None, []
            members = list(range(len(xs or ())))
        elif self.members is None:
            return
        else:
            members = self.members
            stale = [self.candidates[i] for i, (x, v) in held.items() if x._version != v]
        if self._state is None:
            if self.relay is not None and over:  # nothing arrived whole yet: no matrix size to allocate
                self._early += int(tokens.keep.sum())
                self._warn_skip("a pipeline stage's sites of this forward did not reach the last stage whole "
                                "(one was over cross_budget, modified in place or did not fire)")
                return
            self._allocate(self.dims(), device)
            self.s["skipped_tokens"] += self._early
        s = self.s
        apart = [self.candidates[i] for i in members if i in token_of and token_of[i] is not tokens]
        if over or any(i not in held for i in members) or stale or apart:
            s["skipped_tokens"] += tokens.keep.sum().to(device)
            if not self._warned:
                if self.relay is not None:
                    why = ("a pipeline stage's sites of this forward did not reach the last stage whole (one "
                           "was over cross_budget, modified in place or did not fire)")
                elif over:
                    why = (f"holding {len(self.candidates)} sites of this forward needs more than "
                           f"cross_budget={self.budget} bytes; pass a larger cross_budget= or smaller batches")
                elif stale:
                    why = f"sites {stale} were modified in place during the forward; capture other sites"
                elif apart:
                    why = (f"sites {apart} saw other tokens than {self.candidates[members[0]]} in this forward "
                           "(another stack or grid); capture sites of one stack")
                else:
                    missing = [i for i in members if i not in held]
                    why = (f"sites {[self.candidates[i] for i in missing]} did not fire in this forward; "
                           "pass sites that run in every forward")
                self._warn_skip(why)
            return
        xs = [held[i][0] for i in members]
        n_tok, d = xs[0].shape
        if n_tok == 0 or d == 0:
            return
        per_token = len(xs) * d * 8
        block_bytes = self.block_bytes or ((8 << 20) if device.type == "cpu" else (256 << 20))
        block = max(1, block_bytes // per_token)
        bound = tokens.head_bound
        keep_acc: tuple[Tensor, Tensor, Tensor] | None = None
        head_acc: tuple[Tensor, Tensor, Tensor] | None = None
        f64 = torch.float64
        cos: dict[str, tuple[Tensor | float, Tensor | float]] = {"keep": (0.0, 0.0), "head": (0.0, 0.0)}
        # CPU, every value finite (read on the host, free there): one reused float64 block, no
        # finiteness masks, centered in place when nothing else reads the block
        clean = host_reads(xs[0]) and all(bool(torch.isfinite(x.sum())) for x in xs)
        inplace = clean and not self.cosines and bound >= 0
        for a in range(0, n_tok, block):
            b = min(n_tok, a + block)
            x, ok = self._stack(xs, slice(a, b), device, clean)
            part = _comoments(x, tokens.keep[a:b].to(f64) * ok, inplace)
            keep_acc = part if keep_acc is None else _merge(keep_acc, part)
            if self.cosines:
                cos["keep"] = _add(cos["keep"], _cosines(x, tokens.keep[a:b].to(f64) * ok, s["keep_cos_hist"]))
            if bound < 0:  # head tokens anywhere: a masked pass over the block
                head_w = (tokens.valid[a:b] & ~tokens.keep[a:b]).to(f64) * ok
                part = _comoments(x, head_w)
                head_acc = part if head_acc is None else _merge(head_acc, part)
                if self.cosines:
                    cos["head"] = _add(cos["head"], _cosines(x, head_w))
        if bound >= 0:  # at most `bound` head tokens: gather them (topk, no host sync) and fold them alone
            head = tokens.valid & ~tokens.keep
            bound = min(bound, n_tok)
            order = torch.arange(n_tok, device=device)
            _, index = torch.topk(torch.where(head, order, order + n_tok), bound, largest=False)
            x, ok = self._stack(xs, index, device)
            head_acc = _comoments(x, head[index].to(f64) * ok)
            if self.cosines:
                cos["head"] = _cosines(x, head[index].to(f64) * ok)
        assert keep_acc is not None and head_acc is not None  # n_tok > 0: both passes ran
        all_acc = _merge(keep_acc, head_acc)
        for v, acc in (("keep", keep_acc), ("all", all_acc)):
            n, mean, c = _merge((s[f"{v}_n"], s[f"{v}_mean"], s[f"{v}_c"]), acc)
            s[f"{v}_n"], s[f"{v}_mean"], s[f"{v}_c"] = n, mean, c
        cos["all"] = _add(cos["keep"], cos["head"])
        for v in ("keep", "all"):
            s[f"{v}_cos_n"] = s[f"{v}_cos_n"] + cos[v][0]
            s[f"{v}_cos"] = s[f"{v}_cos"] + cos[v][1]

    def _group(self, widths: dict[int, int], token_of: dict[int, Tokens], drop: int | None) -> list[int]:
        """The sites of the matrices: the largest group of the first forward's sites with one width
        and one tokens object (one stack's call and grid); a tie goes to the group holding a
        ``hidden_states.*`` site, then to the earliest."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i in sorted(widths):
            if i != drop:
                groups.setdefault((widths[i], id(token_of.get(i))), []).append(i)
        if not groups:
            return []

        def rank(members: list[int]) -> tuple[int, int, int]:
            main = any(self.candidates[i].startswith("hidden_states.") for i in members)
            return len(members), int(main), -members[0]

        return max(groups.values(), key=rank)

    def _warn_skip(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"probe: cross-layer statistics skip a forward: {why} "
                          "(skipped tokens are counted in cross.skipped_tokens)", stacklevel=3)

    @staticmethod
    def _stack(xs: list[Tensor], rows, device, clean: bool = False) -> tuple[Tensor, Tensor]:
        """float64 ``[S, t, D]`` of the held sites' ``rows`` (a slice or an index tensor), with
        non-finite values zeroed, and the float64 ``[t]`` mask of tokens finite in every site:
        one ``stack`` (one kernel, no per-site loop) into float64. ``clean`` (CPU, every value
        finite): into a reused buffer, with an all-ones mask."""
        parts = [x[rows] for x in xs]
        shape = (len(xs), *parts[0].shape)
        if clean:
            out = torch.stack(parts, out=scratch("cross.block", shape, torch.float64))
            return out, torch.ones(shape[1], dtype=torch.float64)
        out = torch.stack(parts, out=torch.empty(shape, dtype=torch.float64, device=device))
        # x - x is 0 for finite values and NaN otherwise: a cheap per-token finiteness test
        ok = torch.sub(out, out).sum((0, 2)).add_(1.0).nan_to_num_(nan=0.0)
        return torch.nan_to_num_(out, nan=0.0, posinf=0.0, neginf=0.0), ok
