"""Which tokens a captured tensor holds.

Recipe: at the start of each call of a stack (the model itself, or an encoder/decoder inside it;
or, when the model's ``forward`` is called directly, its first layer) :func:`read_call` keeps that
call's token inputs; when a site's tensor ``[batch, sequence, ...]`` arrives,
:meth:`TokenContext.tokens` turns them into :class:`probe.stats.Tokens` for that shape:

- **real tokens**: the stack's own 2-D ``attention_mask`` (1 = real), or ``src_key_padding_mask``
  (``True`` / ``-inf`` = padding) of ``torch.nn.Transformer*``; no mask: every token is real. A mask
  longer than the tensor is read from its end only when a KV cache explains the difference;
  otherwise probe refuses (the model changed the sequence length and cannot be followed).
  A 4-D mask ``[batch, 1 | heads, query, key]`` (boolean, True = attend; or additive, 0 = attend)
  — what ``generate`` passes with a static cache, what the layers receive, a user's own or packed
  block-diagonal mask — says it through its diagonal: query ``i`` is a real token exactly when it
  may attend to its own key, at key index ``cache_position[i]``, else ``past + i`` (``past``: the
  KV cache's length; without a cache, or a sliding-window cache that kept fewer keys, the queries'
  keys are the last ones). Every mask
  transformers builds (causal, sliding, chunked, bidirectional, padded, packed) lets a real token
  see itself and hides a padding token from everyone. A per-layer-type dict of them is read
  through one of its masks; a flex-attention ``BlockMask`` is refused.
  An audio model's sample-level mask is mapped to its frames before it gets here
  (:func:`probe.capture.forward._frames`).
- **absolute positions**: ``position_ids``, else the mask's running count of real tokens (4-D:
  the keys up to its own that the query attends, which restarts in a packed block-diagonal mask),
  else ``cache_position``, else ``arange`` offset by the KV cache's length. Inputs read from a
  layer's call rank the mask first: there ``position_ids`` may be the model's default ``arange``.
- **token ids** (``-1`` when unknown) and **rows** (the sequence's index since the capture began).

A **flattened** ``[batch·sequence, ...]`` tensor (a mixture-of-experts router's logits, an experts
module's input: transformers flattens the tokens before routing) has the same tokens as the
``[batch, sequence]`` grid of its stack's current call when its leading size is exactly
``batch · sequence`` (row ``b · sequence + t``, the order of ``view(-1, D)``):
:meth:`TokenContext.flat_tokens` finds that grid (a site of the stack already seen in this forward,
else the call's ``input_ids``, mask or ``position_ids``) and answers with its :class:`Tokens`;
any other leading size is refused with one line.

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

    mask: Tensor | None = None          # [b, m] bool, True = real token; or a 4-D mask as passed
    position_ids: Tensor | None = None
    cache_position: Tensor | None = None
    input_ids: Tensor | None = None
    past: int | None = None             # tokens already in the KV cache, None without a cache
    #: read from a layer's call, not the stack's: ``position_ids`` may be the model's default
    #: ``arange`` rather than the caller's, so the mask's count of real tokens comes first
    layer: bool = False
    #: why the mask cannot be read (a flex-attention ``BlockMask``), else ``None``
    unreadable: str | None = None
    #: a vision tower's ``[images, 3]`` (frames, height, width) patch grid (``grid_thw``): its
    #: flattened ``[patches, D]`` tensors are one sequence of every image's patches
    patches: Tensor | None = None


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


def _mask_of(mask: Any) -> tuple[Tensor | None, str | None]:
    """The mask tensor of a call's ``attention_mask``, or why it cannot be read."""
    if isinstance(mask, dict):  # per layer type (full / sliding attention): every one has the diagonal
        masks = [mask.get("full_attention"), *mask.values()]
        mask = next((m for m in masks if isinstance(m, Tensor)), next((m for m in masks if m is not None), None))
    if mask is None or isinstance(mask, Tensor):
        return mask, None
    if type(mask).__name__ == "BlockMask":
        return None, ("attention_mask is a flex-attention BlockMask, from which the real tokens cannot be read; "
                      "expected a 2-D or 4-D tensor mask; load the model with attn_implementation='sdpa' (or "
                      "'eager'), or call it with a 2-D attention_mask")
    return None, None


def read_call(call: dict[str, Any], prefix: str = "", layer: bool = False) -> CallInputs:
    """Token inputs from a call's bound arguments; ``prefix="decoder_"`` reads the decoder's
    (``decoder_attention_mask``, ``decoder_input_ids``, ...) when the stack is not called apart;
    ``layer``: the call is a layer's (see :attr:`CallInputs.layer`)."""
    mask, unreadable = _mask_of(call.get(prefix + "attention_mask"))
    if mask is None and not prefix and unreadable is None:
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
                      _cache_length(cache), layer, unreadable, _patch_grid(call))


def _patch_grid(call: dict[str, Any]) -> Tensor | None:
    grid = call.get("grid_thw")
    grid = call.get("image_grid_thw") if grid is None else grid
    return grid if isinstance(grid, Tensor) and grid.dim() == 2 and grid.shape[-1] == 3 else None


def _attends(mask: Tensor) -> Tensor:
    """A 4-D mask as booleans, True where the query attends the key."""
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        # additive: transformers hides a key with -inf, the dtype's minimum or -10000; 0 or a bias attends
        return mask > -5000.0
    return mask != 0


def _from_4d(mask: Tensor, inputs: CallInputs, b: int, t: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(valid, position)`` ``[b, t]`` of a 4-D mask's query rows (see the module docstring).

    Raises:
        SiteError: the mask's shape does not fit a ``[b, t]`` tensor, or the key of each query is unknown.
    """
    shape = tuple(mask.shape)
    q, kv = shape[2], shape[3]
    if shape[0] not in (1, b) or q not in (1, t):
        raise SiteError(f"the tensor holds {b} x {t} tokens but the 4-D attention_mask is {shape} "
                        "(expected [batch, 1 or heads, query, key]), so which tokens are real is unknown; "
                        "capture sites that keep the input's tokens, or call with a 2-D attention_mask")
    cache_pos = inputs.cache_position
    if cache_pos is not None and cache_pos.dim() == 1 and cache_pos.shape[0] == t:
        key = cache_pos.to(device).long().clamp(0, kv - 1)
    else:
        past = inputs.past
        # a sliding-window cache keeps fewer keys than it has seen: these queries' are its last ones
        start = past if past is not None and past + t <= kv else kv - t
        if start < 0:
            raise SiteError(f"the 4-D attention_mask {shape} has fewer keys than the {t} queries, so each query's "
                            "own key is unknown; expected a key per token; pass cache_position, or a 2-D mask")
        key = torch.arange(t, device=device) + start
    rows = _attends(mask[:, 0].to(device))  # [b | 1, q, kv]
    query = torch.arange(t, device=device) if q == t else torch.zeros(t, dtype=torch.long, device=device)
    valid = rows[:, query, key].expand(b, t)
    seen = (torch.arange(kv, device=device) <= key.unsqueeze(1))  # [t, kv]: keys up to the query's own
    position = ((rows[:, query, :] & seen).sum(-1) - 1).expand(b, t)
    return valid, position


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
                sequence length not explained by a KV cache, neither 2-D nor 4-D, a
                4-D mask whose queries' own keys are unknown, a flex-attention ``BlockMask``).
        """
        memo = (stack, b, t, device)
        found = self._memo.get(memo)
        if found is not None:
            return found
        # a site that fires outside its stack's call (a head's module) reads the model's call
        inputs = self.calls.get(stack) or self.calls.get("") or CallInputs()
        if inputs.unreadable is not None:
            raise SiteError(inputs.unreadable)
        mask = inputs.mask
        pos_ids, cache_pos = inputs.position_ids, inputs.cache_position
        given = pos_ids is not None and pos_ids.dim() == 2 and pos_ids.shape[-1] == t and pos_ids.shape[0] in (1, b)
        counted: Tensor | None = None  # positions counted over the mask
        head_bound = b * min(self.skip_first, t)  # at most skip_first head tokens per sequence...
        if mask is not None and mask.dim() == 4:
            valid, counted = _from_4d(mask, inputs, b, t, device)
            head_bound = -1  # ...unless the positions restart inside a sequence (packed, position_ids)
        elif mask is not None:
            if mask.dim() != 2:
                raise SiteError(f"attention_mask: expected [batch, sequence] with 1 for real tokens (or a 4-D "
                                f"[batch, heads, query, key] mask), got shape {tuple(mask.shape)}; pass a 2-D mask")
            m = mask.shape[1]
            if mask.shape[0] != b or (m != t and not (m > t and inputs.past is not None)):
                raise SiteError(f"the tensor holds {b} x {t} tokens but attention_mask is {mask.shape[0]} x {m}"
                                f"{'' if inputs.past is None else f' (KV cache: {inputs.past})'}, so which tokens "
                                "are real is unknown (the model regroups or shortens the sequence before this "
                                "site); capture sites that keep the input's tokens, or call without attention_mask")
            full = mask.to(device)
            valid = full[:, m - t:]
            if not given or inputs.layer:
                counted = (full.long().cumsum(-1) - 1)[:, m - t:]
        else:
            valid = torch.ones(b, t, dtype=torch.bool, device=device)
        if given and pos_ids is not None and not (inputs.layer and counted is not None):
            position = pos_ids.to(device).long().expand(b, t)
            head_bound = -1
        elif counted is not None:
            position = counted
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

    def grid(self, stack: str) -> tuple[int, int] | None:
        """The ``(batch, sequence)`` of ``stack``'s current call: of a ``[b, t, ...]`` site of it seen
        in this forward, else of its ``input_ids``, its mask's queries or its ``position_ids``, else
        ``(1, patches)`` of a vision tower's patch grid (:attr:`CallInputs.patches`); ``None`` when
        nothing says."""
        for key in self._memo:
            if key[0] == stack:
                return key[1], key[2]
        inputs = self.calls.get(stack) or self.calls.get("") or CallInputs()
        ids, mask, pos = inputs.input_ids, inputs.mask, inputs.position_ids
        if ids is not None and ids.dim() == 2:
            return ids.shape[0], ids.shape[1]
        if mask is not None and mask.dim() == 4:
            return mask.shape[0], mask.shape[2]
        if mask is not None and mask.dim() == 2:
            past = inputs.past if inputs.past is not None and inputs.past < mask.shape[1] else 0
            return mask.shape[0], mask.shape[1] - past
        if pos is not None and pos.dim() == 2:
            return pos.shape[0], pos.shape[1]
        if inputs.patches is not None and ids is None and mask is None:
            return 1, int(inputs.patches.prod(-1).sum())  # the tower reads its grid on the host too
        return None

    def flat_tokens(self, stack: str, n: int, device: torch.device) -> Tokens:
        """Tokens of a flattened ``[n, ...]`` tensor of ``stack``'s current call, ``n = batch ·
        sequence`` of its grid (:meth:`grid`): the same :class:`Tokens` as the ``[batch, sequence]``
        tensors of that call.

        Raises:
            SiteError: no grid is known, or ``n`` is not its ``batch · sequence`` (the module
                receives a subset of the tokens, e.g. one expert's), or :meth:`tokens` refuses.
        """
        grid = self.grid(stack)
        if grid is None or grid[0] * grid[1] != n:
            got = "no [batch, sequence] input" if grid is None else f"{grid[0]} x {grid[1]} = {grid[0] * grid[1]} tokens"
            raise SiteError(f"the tensor holds {n} rows but its forward has {got}, so which rows are real tokens "
                            "is unknown; expected [batch, sequence, ...] or [batch·sequence, ...] (flattened); "
                            "capture a module that sees every token of the batch (an expert's own layers: "
                            "sites='moe')")
        return self.tokens(stack, grid[0], grid[1], device)
