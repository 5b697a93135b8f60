"""A uniform sample of (row, position, channel, value) for scatter plots, by bottom-k keys.

Every kept element of a forward pass gets a float64 key from a generator seeded per forward (not
per site), so all sites of equal shape draw the same keys, keep the same (row, position, channel)
triples, and can be paired point by point. The ``k`` smallest keys seen so far are exactly a
uniform sample without replacement; merging two samples is concatenation plus bottom-k again.
The per-forward selection (one ``topk`` over the forward's keys; on CPU, once the reservoir is
full, just the keys below its largest, since no other key can enter it) is memoised in
``Tokens.cache`` and shared by every site. So is the merge with the reservoir: sites that have seen the same
forwards hold the same keys (a host-side ``history`` hash says so without reading the device),
so the ``2k`` merge and the (row, position, channel, token) fields are computed once per forward
and shared; each site only gathers its ``k`` values.

State, ``k = sample_size``: ``key`` float64 ``[k]`` (``inf`` = empty slot), ``row, position,
channel, token`` int64 ``[k]``, ``value`` float32 ``[k]``.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from ._base import SPECS, StatBase, Tokens, host_reads

__all__ = ["Sample"]

_FIELDS = ("key", "row", "position", "channel", "token", "value")
_META = _FIELDS[:5]
_UNIQUE = itertools.count()


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
    _fields = _FIELDS

    def __init__(self, size: int = 20_000) -> None:
        super().__init__()
        self.size = size
        #: equal for two samples exactly when they hold the same keys (same forwards, from empty)
        self.history: int = hash(("empty", size))

    def _init(self, device: torch.device) -> None:
        k = self.size
        self._state = {
            "key": torch.full((k,), float("inf"), dtype=torch.float64, device=device),
            **{f: torch.full((k,), -1, dtype=torch.int64, device=device) for f in _FIELDS[1:5]},
            "value": torch.full((k,), float("nan"), dtype=torch.float32, device=device),
        }

    def _select(self, n: int, d: int, tokens: Tokens, device: torch.device, bound: float) -> tuple[Tensor, Tensor]:
        """This forward's candidate keys and their flat indices: the ``k`` smallest kept keys, or,
        with a finite ``bound`` (the reservoir's largest key), the kept keys below it. Keys at or
        above the bound could never enter the reservoir, so both give the same merged sample; the
        bound only saves the ``topk`` over every key of the forward."""
        memo = ("sample", id(tokens), n, d, self.size, bound)
        if memo not in tokens.cache:
            gen = torch.Generator(device=device).manual_seed(tokens.seed)
            keys = torch.rand(n * d, dtype=torch.float64, device=device, generator=gen)
            if bound < float("inf"):  # sized on the host: CPU only (see _bound)
                index = torch.nonzero(keys < bound).squeeze(1)
                keys = torch.where(tokens.keep[index // d], keys[index], float("inf"))
                if index.numel() > self.size:
                    keys, pick = torch.topk(keys, self.size, largest=False, sorted=False)
                    index = index[pick]
            else:
                keys = torch.where(tokens.keep.repeat_interleave(d), keys, float("inf"))
                if n * d > self.size:
                    keys, index = torch.topk(keys, self.size, largest=False, sorted=False)
                else:
                    index = torch.arange(n * d, device=device)
            tokens.cache[memo] = (keys, index)
        return tokens.cache[memo]

    def _bound(self) -> float:
        """The reservoir's largest key (``inf`` until it is full), read on the host where that
        costs nothing (CPU); ``inf`` on accelerators, whose path never syncs."""
        key = self.s["key"]
        return float(key.max()) if host_reads(key) else float("inf")

    def _init_like(self, x: Tensor) -> None:
        self._init(x.device)

    def update(self, x: Tensor, tokens: Tokens) -> None:
        Sample.update_group([self], x.unsqueeze(0), tokens)

    def _shared(self, n: int, d: int, tokens: Tokens) -> tuple:
        """This forward's merge for every sample with this one's history: the selected flat
        indices, the merge order, the merged metadata and the empty slots."""
        memo = ("sample-merge", self.history, id(tokens), n, d, self.size)
        shared = tokens.cache.get(memo)
        if shared is None:  # the first site of this forward with this history merges for all
            keys, index = self._select(n, d, tokens, self.s["key"].device, self._bound())
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
            old = torch.stack([stats[g].s["value"] for g in members])
            values = torch.cat((old, new), 1)[:, best].masked_fill(empty, float("nan"))
            history = hash((lead.history, id(tokens), n, d, lead.size, tokens.seed, tokens.forward))
            for j, g in enumerate(members):
                stats[g]._state = {**meta, "value": values[j]}
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

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        self.history = hash(("loaded", next(_UNIQUE)))
        if self._state is not None:
            self.size = self.s["key"].numel()
