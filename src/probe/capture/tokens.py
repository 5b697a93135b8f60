"""Which tokens a captured tensor holds.

Recipe: at the start of each call of a stack (the model itself, or an encoder/decoder inside it)
:func:`read_call` keeps that call's token inputs; when a site's tensor ``[batch, sequence, ...]``
arrives, :meth:`TokenContext.tokens` turns them into :class:`probe.stats.Tokens` for that shape:

- **real tokens**: the stack's own 2-D ``attention_mask`` (1 = real), or ``src_key_padding_mask``
  (``True`` / ``-inf`` = padding) of ``torch.nn.Transformer*``; no mask: every token is real. A mask
  longer than the tensor is read from its end only when a KV cache explains the difference;
  otherwise probe refuses (the model changed the sequence length and cannot be followed).
- **absolute positions**: ``position_ids``, else the mask's running count of real tokens, else
  ``cache_position``, else ``arange`` offset by the KV cache's length.
- **token ids** (``-1`` when unknown) and **rows** (the sequence's index since the capture began).

Nothing here reads a device value on the host; the only host read is the cache length, taken once
per call from the cache object (shapes for the dynamic caches of transformers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import SiteError
from ..stats import Tokens

__all__ = ["CallInputs", "read_call", "TokenContext"]


@dataclass(frozen=True)
class CallInputs:
    """The token inputs of one call of a stack."""

    mask: Tensor | None = None          # [b, m] bool, True = real token
    position_ids: Tensor | None = None
    cache_position: Tensor | None = None
    input_ids: Tensor | None = None
    past: int | None = None             # tokens already in the KV cache, None without a cache


def _cache_length(cache: Any) -> int | None:
    if cache is None:
        return None
    length = getattr(cache, "get_seq_length", None)
    if callable(length):
        try:
            return int(length())
        except (TypeError, ValueError, IndexError, AttributeError, RuntimeError):
            return None
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)) and cache[0]:
        first = cache[0][0]
        if isinstance(first, Tensor) and first.dim() >= 2:
            return first.shape[-2]  # legacy (key, value) tuples: [batch, heads, past, head_dim]
    return None


def read_call(call: dict[str, Any], prefix: str = "") -> CallInputs:
    """Token inputs from a call's bound arguments; ``prefix="decoder_"`` reads the decoder's
    (``decoder_attention_mask``, ``decoder_input_ids``, ...) when the stack is not called apart."""
    mask = call.get(prefix + "attention_mask")
    if mask is None and not prefix:
        pad = call.get("src_key_padding_mask")
        if isinstance(pad, Tensor):
            mask = ~pad if pad.dtype == torch.bool else pad == 0
    elif isinstance(mask, Tensor) and mask.dim() == 2:
        mask = mask.bool() if mask.dtype == torch.bool or not mask.is_floating_point() else mask != 0
    cache = call.get("past_key_values")
    if cache is None:
        cache = call.get("cache")
    ids = call.get(prefix + "input_ids")
    return CallInputs(mask if isinstance(mask, Tensor) else None,
                      call.get(prefix + "position_ids") if isinstance(call.get(prefix + "position_ids"), Tensor)
                      else None,
                      call.get("cache_position") if isinstance(call.get("cache_position"), Tensor) else None,
                      ids if isinstance(ids, Tensor) else None,
                      _cache_length(cache))


class TokenContext:
    """The tokens of one forward: per stack call and tensor shape, one :class:`Tokens` (memoised)."""

    def __init__(self, forward: int, rows_seen: int, skip_first: int, seed: int) -> None:
        self.forward = forward
        self.rows_seen = rows_seen
        self.skip_first = skip_first
        self.seed = seed
        self.calls: dict[str, CallInputs] = {}
        self._memo: dict[tuple, Tokens] = {}
        self._cache: dict = {}

    def rows(self) -> int:
        """Sequences in this forward, from the first stack that saw a batch (0 if none)."""
        for inputs in self.calls.values():
            for t in (inputs.input_ids, inputs.mask):
                if isinstance(t, Tensor) and t.dim() == 2:
                    return t.shape[0]
        return next(iter(self._memo))[1] if self._memo else 0

    def tokens(self, stack: str, b: int, t: int, device: torch.device) -> Tokens:
        """Tokens of a ``[b, t, ...]`` tensor of ``stack``'s current call.

        Raises:
            SiteError: the mask cannot describe this tensor's tokens (other batch size, other
                sequence length not explained by a KV cache, not 2-D).
        """
        memo = (stack, b, t, device)
        found = self._memo.get(memo)
        if found is not None:
            return found
        # a site that fires outside its stack's call (a head's module) reads the model's call
        inputs = self.calls.get(stack) or self.calls.get("") or CallInputs()
        mask = inputs.mask
        if mask is not None:
            if mask.dim() != 2:
                raise SiteError(f"attention_mask: expected [batch, sequence] with 1 for real tokens, got shape "
                                f"{tuple(mask.shape)}; pass a 2-D mask")
            m = mask.shape[1]
            if mask.shape[0] != b or (m != t and not (m > t and inputs.past is not None)):
                raise SiteError(f"the tensor holds {b} x {t} tokens but attention_mask is {mask.shape[0]} x {m}"
                                f"{'' if inputs.past is None else f' (KV cache: {inputs.past})'}, so which tokens "
                                "are real is unknown (the model regroups or shortens the sequence before this "
                                "site); capture sites that keep the input's tokens, or call without attention_mask")
            full = mask.to(device)
            valid = full[:, m - t:]
        else:
            full, valid = None, torch.ones(b, t, dtype=torch.bool, device=device)
        pos_ids, cache_pos = inputs.position_ids, inputs.cache_position
        head_bound = b * min(self.skip_first, t)  # at most skip_first head tokens per sequence...
        if pos_ids is not None and pos_ids.dim() == 2 and pos_ids.shape[-1] == t and pos_ids.shape[0] in (1, b):
            position = pos_ids.to(device).long().expand(b, t)
            head_bound = -1  # ...unless the caller's position_ids restart inside a sequence
        elif full is not None:
            position = (full.long().cumsum(-1) - 1)[:, full.shape[1] - t:]
        elif cache_pos is not None and cache_pos.dim() == 1 and cache_pos.shape[0] == t:
            position = cache_pos.to(device).long().expand(b, t)
        else:
            position = (torch.arange(t, device=device) + (inputs.past or 0)).expand(b, t)
        ids = inputs.input_ids
        if ids is not None and ids.dim() == 2 and ids.shape[0] == b and (
                ids.shape[1] == t or (ids.shape[1] > t and inputs.past is not None)):
            token = ids[:, ids.shape[1] - t:].to(device).long()
        else:
            token = torch.full((b, t), -1, dtype=torch.int64, device=device)
        row = (self.rows_seen + torch.arange(b, device=device)).unsqueeze(1).expand(b, t)
        keep = valid & (position >= self.skip_first)
        tokens = Tokens(valid.reshape(-1), keep.reshape(-1), position.reshape(-1), row.reshape(-1),
                        token.reshape(-1), self.forward, self.seed, 0, head_bound, self._cache)
        self._memo[memo] = tokens
        return tokens
