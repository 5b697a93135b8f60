"""A uniform sample of (row, position, channel, value) for scatter plots, by bottom-k keys.

Every kept element of a forward pass gets a float64 key from a generator seeded per forward (not
per site), so all sites of equal shape draw the same keys, keep the same (row, position, channel)
triples, and can be paired point by point. The ``k`` smallest keys seen so far are exactly a
uniform sample without replacement; merging two samples is concatenation plus bottom-k again.
The per-forward selection (one ``topk`` over the forward's keys) is memoised in ``Tokens.cache``
and shared by every site, so each site only pays a gather and a ``2k`` merge.

State, ``k = sample_size``: ``key`` float64 ``[k]`` (``inf`` = empty slot), ``row, position,
channel, token`` int64 ``[k]``, ``value`` float32 ``[k]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import StatBase, Tokens

__all__ = ["Sample"]

_FIELDS = ("key", "row", "position", "channel", "token", "value")


class Sample(StatBase):
    name = "sample"
    chunked = False
    _fields = _FIELDS

    def __init__(self, size: int = 20_000) -> None:
        super().__init__()
        self.size = size

    def _init(self, device: torch.device) -> None:
        k = self.size
        self._state = {
            "key": torch.full((k,), float("inf"), dtype=torch.float64, device=device),
            **{f: torch.full((k,), -1, dtype=torch.int64, device=device) for f in _FIELDS[1:5]},
            "value": torch.full((k,), float("nan"), dtype=torch.float32, device=device),
        }

    def _select(self, n: int, d: int, tokens: Tokens, device: torch.device) -> tuple[Tensor, Tensor]:
        memo = ("sample", n, d, self.size, str(device))
        if memo not in tokens.cache:
            gen = torch.Generator(device=device).manual_seed(tokens.seed)
            keys = torch.rand(n * d, dtype=torch.float64, device=device, generator=gen)
            keys = torch.where(tokens.keep.repeat_interleave(d), keys, float("inf"))
            if n * d > self.size:
                keys, index = torch.topk(keys, self.size, largest=False, sorted=False)
            else:
                index = torch.arange(n * d, device=device)
            tokens.cache[memo] = (keys, index)
        return tokens.cache[memo]

    def update(self, x: Tensor, tokens: Tokens) -> None:
        if x.numel() == 0:  # an empty chunk adds nothing (shape check: no sync)
            return
        if self._state is None:
            self._init(x.device)
        n, d = x.shape
        keys, index = self._select(n, d, tokens, x.device)
        t = index // d
        new = {
            "key": keys,
            "row": tokens.row[t],
            "position": tokens.position[t],
            "channel": index % d,
            "token": tokens.token[t],
            "value": x.reshape(-1)[index].float(),
        }
        self._merge(new)

    def _merge(self, o: dict[str, Tensor]) -> None:
        s = self.s
        keys = torch.cat((s["key"], o["key"]))
        _, best = torch.topk(keys, self.size, largest=False, sorted=True)
        merged = {f: torch.cat((s[f], o[f]))[best] for f in _FIELDS}
        empty = torch.isinf(merged["key"])  # masked elements and unfilled slots: one canonical form
        for f in _FIELDS[1:5]:
            merged[f] = merged[f].masked_fill(empty, -1)
        merged["value"] = merged["value"].masked_fill(empty, float("nan"))
        self._state = merged

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        if self._state is not None:
            self.size = self.s["key"].numel()
