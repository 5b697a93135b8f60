"""The ``k`` largest magnitudes of a site, each with its value and location: exact and mergeable.

Massive activations (Sun et al. 2024, "Massive Activations in Large Language Models") are a
handful of values, often at the first token and a few fixed channels, thousands of times larger
than the median. Finding them needs the largest ``|x|`` *with where they sit*; this keeps the
``k`` largest finite ``|x|`` over every real token (padding never enters; ``skip_first`` does
not apply, since the first positions are where these values live) with their (row, position,
channel, token id).

Per chunk ``x[n, D]`` the update needs no host sync and no activation-sized temporary beyond the
magnitudes the other statistics share (:class:`~probe.stats._base.Finite`):

1. the ``min(k, n)`` tokens whose largest ``|x|`` rank first (one ``topk`` over ``n`` int64 keys):
   every element of the chunk's top ``k`` lies in one of them, since a token outside them has
   ``k`` tokens whose largest element beats all of its own;
2. the top ``k`` of those tokens' ``k × D`` elements (one ``topk`` over int64 keys);
3. merged with the state (one ``topk`` over ``2k`` keys).

Keys are the float32 bits of ``|x|`` (monotone for non-negative floats) above the complement of
the element's index, so ties go to the earlier element in stream order, which is (row, position,
channel) order: the same rule the merge of windows, files and ranks applies
(:func:`probe.stats._state.topk_order`), so the result is exactly the top ``k`` of the whole stream.

State, ``k`` slots: ``value`` float32 (signed; NaN = empty), ``row, position, channel, token``
int64 (-1 = empty), largest ``|value|`` first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ._base import SPECS, StatBase, Tokens, finite, host_reads, stacked

if TYPE_CHECKING:  # typing.Self is Python 3.11+
    from typing_extensions import Self

__all__ = ["TopK", "K"]

#: slots kept per site by default
K = 64
_LOW = (1 << 32) - 1


def _keys(mag: Tensor, ok: Tensor) -> Tensor:
    """int64 ``(bits(|x|) << 32) | (2**32 - 1 - index)`` along the last dim (``-1`` where not
    ``ok``): the larger magnitude first, then the smaller index. ``mag`` is float32 and >= 0."""
    index = torch.arange(mag.shape[-1], device=mag.device, dtype=torch.int64)
    key = (mag.contiguous().view(torch.int32).to(torch.int64) << 32) | (_LOW - index)
    return torch.where(ok, key, -1)


class TopK(StatBase):
    """The ``k`` largest finite ``|x|`` over the real tokens of one site.

    Fields (declared in :data:`probe.stats._state.TOPK`; all merge as one [``topk``]: largest
    ``|value|`` first, ties to the earliest (row, position, channel)): ``value`` f32 ``[k]``
    (activation units, signed; NaN where empty); ``row``, ``position``, ``channel``, ``token``
    i64 ``[k]`` (sequence index on its rank, absolute position, channel, token id; -1 where
    empty).
    """

    name = "topk"
    chunked = True
    spec = SPECS["topk"]

    def __init__(self, k: int = K) -> None:
        super().__init__()
        self.k = k

    def dims(self, x: Tensor) -> dict[str, int]:
        return {"k": self.k}

    def _adopt(self, dims: dict[str, int]) -> None:
        self.k = dims["k"]

    @classmethod
    def update_group(cls, stats: list, x: Tensor, tokens: Tokens) -> None:
        """Fold ``x[G, n, D]`` (float32) into ``G`` top-k states at once."""
        if not cls._ready(stats, x):
            return
        cls._merge(stats, cls._best(x, tokens, stats[0].k))

    @classmethod
    def partial(cls, stat: Self, x: Tensor, tokens: Tokens) -> dict | None:
        """Steps 1 and 2 for one site's chunk ``x[1, n, D]`` (see :meth:`StatBase.partial`);
        :meth:`fold` merges every site's with its state at once."""
        if not cls._ready([stat], x):
            return None
        if host_reads(x) and x.shape[0] == 1:
            # CPU, a full state: only tokens whose largest |x| beats the state's k-th largest can
            # contribute (ties go to the state, which is earlier in the stream); found on the host
            value = stat.s["value"]
            if not bool(value.isnan().any()):
                rowmax = finite(x, tokens).rowmax[0]
                tok = torch.nonzero((rowmax > value.abs().min()) & tokens.valid).view(1, -1)
                if tok.shape[1] == 0:
                    return None
                if tok.shape[1] < stat.k:
                    return cls._best(x, tokens, stat.k, tok)
        return cls._best(x, tokens, stat.k)

    @classmethod
    def fold(cls, stats: list, parts: list) -> None:
        pairs = [(stat, part) for stat, part in zip(stats, parts) if part is not None]
        if pairs:
            new = {f: torch.cat([part[f] for _, part in pairs]) for f in cls._fields}
            cls._merge([stat for stat, _ in pairs], new)

    @staticmethod
    def _best(x: Tensor, tokens: Tokens, k: int, tok: Tensor | None = None) -> dict[str, Tensor]:
        """Steps 1 and 2: the top ``k`` of chunk ``x[G, n, D]`` (fields ``[G, k]``, empty slots
        NaN / -1); ``tok`` (``[G, t]``, increasing): the candidate tokens, when already known."""
        g, n, d = x.shape
        valid = tokens.valid
        if tok is None:
            rowmax = finite(x, tokens).rowmax  # per-token largest |x| (non-finite values as 0), shared
            # 1. the tokens that can hold the chunk's top k
            _, tok = torch.topk(_keys(rowmax, valid.expand(g, n)), min(k, n), dim=-1)  # [G, kt]
            tok, _ = torch.sort(tok, dim=-1)  # index order = stream order, so element keys keep it
        kt = tok.shape[1]
        cx = x.gather(1, tok.unsqueeze(-1).expand(g, kt, d)).reshape(g, kt * d)
        ok = torch.isfinite(cx) & valid[tok].unsqueeze(-1).expand(g, kt, d).reshape(g, kt * d)
        # 2. the top k of their elements (ties: earlier token, then earlier channel)
        ke = min(k, kt * d)
        ckey, flat = torch.topk(_keys(torch.nan_to_num(cx, nan=0.0, posinf=0.0, neginf=0.0).abs(), ok), ke, dim=-1)
        t = tok.gather(1, flat // d)
        channel = flat % d
        value = cx.gather(1, flat)
        empty = ckey < 0
        new = {"value": torch.where(empty, float("nan"), value),
               "row": torch.where(empty, -1, tokens.row[t]),
               "position": torch.where(empty, -1, tokens.position[t]),
               "channel": torch.where(empty, -1, channel),
               "token": torch.where(empty, -1, tokens.token[t])}
        if ke < k:  # fewer candidates than slots: empty slots, so every site's chunk has k
            new = {f: torch.nn.functional.pad(v, (0, k - ke), value=float("nan") if f == "value" else -1)
                   for f, v in new.items()}
        return new

    @classmethod
    def _merge(cls, stats: list, new: dict[str, Tensor]) -> None:
        """Step 3: merge the chunks' top ``k`` (fields ``[G, k]``) with the ``G`` states."""
        k = stats[0].k
        # 3. merge with the state: state entries come earlier in the stream, so they go first
        old = {f: stacked([st.s[f] for st in stats]) for f in cls._fields}
        both = {f: torch.cat((old[f], new[f]), dim=1) for f in cls._fields}
        v = both["value"]
        filled = ~torch.isnan(v)
        bmag = torch.where(filled, v.abs(), 0.0)
        _, pick = torch.topk(_keys(bmag, filled), k, dim=-1)
        chosen = {f: both[f].gather(1, pick).unbind(0) for f in cls._fields}
        for i, st in enumerate(stats):
            st._state = {f: chosen[f][i] for f in cls._fields}
