"""A uniform sample of (row, position, channel, value) for scatter plots, by bottom-k keys.

Every kept element of a forward pass gets a float64 key from a generator seeded per forward (not
per site), so all sites of equal shape draw the same keys, keep the same (row, position, channel)
triples, and can be paired point by point. The ``k`` smallest keys seen so far are exactly a
uniform sample without replacement; merging two samples is concatenation plus bottom-k again.
The per-forward selection is memoised in ``Tokens.cache`` and shared by every site: on an
accelerator one ``topk`` over the forward's keys; on CPU only the forward's ``k`` smallest keys are
drawn, in ``O(k)``, from the distribution of the ``k`` smallest of independent uniforms
(:func:`_smallest_keys`). So is the merge with the reservoir: sites that have seen the same
forwards hold the same keys (a host-side ``history`` hash says so without reading the device),
so the ``2k`` merge and the (row, position, channel, token) fields are computed once per forward
and shared; each site only gathers its ``k`` values.

State, ``k = sample_size``: ``key`` float64 ``[k]`` (``inf`` = empty slot), ``row, position,
channel, token`` int64 ``[k]``, ``value`` float32 ``[k]``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ._base import SPECS, StatBase, Tokens, host_reads, stacked

__all__ = ["Sample"]

#: the fields that say where a sampled value sits (all but ``value``)
_META = SPECS["sample"].names[:5]
_UNIQUE = itertools.count()


def _subset(n: int, k: int, gen: torch.Generator) -> Tensor:
    """A uniformly random ``k``-subset of ``range(n)`` (``k <= n``), in increasing order, in ``O(k)``
    draws when ``k`` is small against ``n``: the distinct values of independent uniform draws, topped
    up until there are ``k`` or more, less a random few. Every step treats all values alike, so
    every ``k``-subset is equally likely."""
    if 4 * k >= n:
        return torch.sort(torch.randperm(n, generator=gen)[:k]).values
    mark = torch.zeros(n, dtype=torch.bool)
    mark[torch.randint(n, (k + k // 16 + 16,), generator=gen)] = True
    pick = torch.nonzero(mark).squeeze(1)
    while pick.numel() < k:
        mark[torch.randint(n, (k - pick.numel() + 16,), generator=gen)] = True
        pick = torch.nonzero(mark).squeeze(1)
    if pick.numel() > k:
        keep = torch.ones(pick.numel(), dtype=torch.bool)
        keep[torch.randperm(pick.numel(), generator=gen)[:pick.numel() - k]] = False
        pick = pick[keep]
    return pick


def _smallest_keys(keep: Tensor, d: int, k: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """The ``k`` smallest of independent uniform keys over the ``N = kept tokens * d`` kept
    elements of a CPU chunk, and their flat indices, drawn in ``O(k)`` rather than ``O(N)``: the
    ``j``-th smallest of ``N`` uniforms is ``S_j / S_{N+1}``, ``S_j`` the sum of ``j`` independent
    standard exponentials (Rényi's representation of uniform order statistics; Devroye,
    "Non-Uniform Random Variate Generation", 1986, V.2), with ``S_{N+1} = S_k + G``, ``G ~
    Gamma(N + 1 - k)``; which elements hold them is a uniformly random ``k``-subset, in a
    uniformly random assignment. The draw depends only on the generator, so every path that takes
    this forward's bottom ``k`` gets the same keys."""
    rows = torch.nonzero(keep).squeeze(1)  # a host read: CPU
    n = rows.numel() * d
    if n <= k:
        keys = torch.rand(n, dtype=torch.float64, generator=gen)
        at = torch.arange(n)
    else:
        # standard exponentials as -log(1 - U), U uniform on [0, 1)
        sums = torch.rand(k, dtype=torch.float64, generator=gen).neg_().log1p_().neg_().cumsum_(0)
        rest = torch._standard_gamma(torch.tensor([float(n + 1 - k)], dtype=torch.float64), generator=gen)
        # the sorted keys go to the subset's elements in random order; the elements stay in
        # increasing order, so that each site's gather of values walks its memory forwards
        keys = (sums / (sums[-1] + rest))[torch.randperm(k, generator=gen)]
        at = _subset(n, k, gen)
    return keys, rows[at // d] * d + at % d


class Sample(StatBase):
    """A uniform sample without replacement of ``k = size`` kept (token, channel) elements.

    Fields (declared in :data:`probe.stats._state.SAMPLE`; all merge as one [``bottomk``]: the
    ``k`` smallest keys win): ``key`` f64 ``[k]`` uniform in [0, 1) (``inf`` = empty slot);
    ``row``, ``position``, ``channel``, ``token`` i64 ``[k]`` (sequence index on its rank,
    absolute position, channel, token id; −1 where empty); ``value`` f32 ``[k]`` (activation
    units, NaN where empty).
    """

    name = "sample"
    chunked = False
    spec = SPECS["sample"]

    def __init__(self, size: int = 20_000) -> None:
        super().__init__()
        self.size = size
        #: equal for two samples exactly when they hold the same keys (same forwards, from empty)
        self.history: int = hash(("empty", size))

    @classmethod
    def create(cls, *, histogram_bits: int, max_positions: int, sample_size: int) -> Sample:
        return cls(sample_size)

    def dims(self, x: Tensor) -> dict[str, int]:
        return {"k": self.size}

    def _adopt(self, dims: dict[str, int]) -> None:
        self.size = dims["k"]

    def _select(self, n: int, d: int, tokens: Tokens, device: torch.device) -> tuple[Tensor, Tensor]:
        """This forward's candidates: the keys and flat indices (into ``n * d``) of the ``k``
        smallest keys of its kept elements (fewer when it has fewer; ``inf`` keys are padding)."""
        memo = ("sample", id(tokens), n, d, self.size)
        if memo not in tokens.cache:
            gen = torch.Generator(device=device).manual_seed(tokens.seed)
            if host_reads(tokens.keep):
                tokens.cache[memo] = _smallest_keys(tokens.keep, d, self.size, gen)
            else:  # accelerators: a key for every element and one topk, sized without a host read
                keys = torch.rand(n * d, dtype=torch.float64, device=device, generator=gen)
                keys = torch.where(tokens.keep.repeat_interleave(d), keys, float("inf"))
                if n * d > self.size:
                    keys, index = torch.topk(keys, self.size, largest=False, sorted=False)
                else:
                    index = torch.arange(n * d, device=device)
                tokens.cache[memo] = (keys, index)
        return tokens.cache[memo]

    def _shared(self, n: int, d: int, tokens: Tokens) -> tuple:
        """This forward's merge for every sample with this one's history: the selected flat
        indices, the merge order, the merged metadata and the empty slots."""
        memo = ("sample-merge", self.history, id(tokens), n, d, self.size)
        shared = tokens.cache.get(memo)
        if shared is None:  # the first site of this forward with this history merges for all
            keys, index = self._select(n, d, tokens, self.s["key"].device)
            if host_reads(keys):  # CPU: only keys below the reservoir's largest can enter it
                bound = float(self.s["key"].max())
                if bound < float("inf"):
                    below = torch.nonzero(keys < bound).squeeze(1)
                    keys, index = keys[below], index[below]
            t = index // d
            new = {"key": keys, "row": tokens.row[t], "position": tokens.position[t],
                   "channel": index % d, "token": tokens.token[t]}
            shared = tokens.cache[memo] = (index, *self._best(new))
        return shared

    @classmethod
    def update_group(cls, stats: list, x: Tensor, tokens: Tokens) -> None:
        """Fold ``x[G, n, D]`` into ``G`` samples: one merge per history, one gather of values."""
        if not cls._ready(stats, x):
            return
        groups: dict[tuple, list[int]] = {}
        for g, stat in enumerate(stats):
            groups.setdefault((stat.history, stat.size), []).append(g)
        _, n, d = x.shape
        for members in groups.values():
            lead = stats[members[0]]
            index, best, meta, empty = lead._shared(n, d, tokens)
            xs = x if len(members) == len(stats) else x[members]
            new = xs.reshape(len(members), -1)[:, index].float()
            old = stacked([stats[g].s["value"] for g in members])
            values = torch.cat((old, new), 1)[:, best].masked_fill(empty, float("nan"))
            history = hash((lead.history, id(tokens), n, d, lead.size, tokens.seed, tokens.forward))
            rows = values.unbind(0)
            for j, g in enumerate(members):
                stats[g]._state = {**meta, "value": rows[j]}
                stats[g].history = history

    def _best(self, o: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """Merge order of this reservoir with ``o``: the ``k`` smallest keys of both, and the
        merged key/row/position/channel/token, with empty slots in one canonical form."""
        s = self.s
        _, best = torch.topk(torch.cat((s["key"], o["key"])), self.size, largest=False, sorted=True)
        meta = {f: torch.cat((s[f], o[f]))[best] for f in _META}
        empty = torch.isinf(meta["key"])  # masked elements and unfilled slots
        for f in _META[1:]:
            meta[f] = meta[f].masked_fill(empty, -1)
        return best, meta, empty

    def merge(self, other) -> None:
        super().merge(other)
        if other._state is not None:
            self.history = hash(("merged", next(_UNIQUE)))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.history = hash(("loaded", next(_UNIQUE)))
