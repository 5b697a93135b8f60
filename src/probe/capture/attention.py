"""Attention sites: per head MaxLogit, attention entropy and sink mass, without materialising attention.

Recipe::

    with probe.capture(model, "attn.h5", sites="attention"):    # or "model.layers.1?.*:attention"
        model(**batch)
    run = probe.load("attn.h5")
    run["model.layers.0.self_attn:attention"].attention.maxlogit   # [H] per head (QK-Clip's MaxLogit)

A transformers 5 attention module computes ``q``, ``k``, ``v`` and hands them to the function
its ``config._attn_implementation`` names (``eager``, ``sdpa``, ``flex_attention``, ...), looked up
through ``AttentionInterface.get_interface`` on every call; none of them returns the attention
probabilities except eager. For the length of the capture (installed in ``try``, restored in
``finally``), ``get_interface`` hands out the same function behind a thin wrapper that notes the
call's ``query [B, H, T, d]``, ``key [B, H_kv, S, d]``, 4-D ``attention_mask``, ``scaling`` and
``softcap`` (references only, and only for the modules captured while the forward is recorded),
then calls the model's function with the same arguments: the attention output is the model's
own, bitwise. The site's post-hook on the attention module then recomputes, under ``no_grad``, in
chunks of query rows (at most :data:`CHUNK_ELEMENTS` logits at a time, float32), per query and head:

- the largest ``q·k · scaling`` over the keys the query may attend to, and where;
- the entropy of ``softmax(logits + mask)`` (soft cap applied as the model does), and
- the probability on the query's first ``K`` allowed keys (the sink),

and packs them as ``[B·T, F·H]`` rows for :class:`probe.stats.attention.Attention`, which keeps
only the real query tokens. Grouped-query keys are repeated to the query heads (``repeat_kv``).

Which keys a query may attend to: a boolean mask's ``True``; a float (additive) mask's entries
above half its dtype's minimum (transformers writes the minimum where attention is not allowed);
a flex-attention ``BlockMask``'s ``mask_mod`` evaluated on the chunk's (batch, head, query, key)
indices; no mask: every key for ``eager``, and for the other functions the causal pattern
``key index <= query index`` when ``module.is_causal`` and ``T > 1`` (SDPA's ``is_causal``,
aligned top-left as torch does, the keys cut to ``T``, as transformers' SDPA path does). Flash
and paged attention (no 4-D mask) and learned sink logits (``s_aux``) are refused at their site
with one line; a flex ``score_mod`` other than the soft cap is not applied. The probabilities are those before dropout. Under gradient checkpointing the recompute of the
module (inside backward) is not noted, so nothing is counted twice.
"""

from __future__ import annotations

import fnmatch
import inspect
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import SiteError, closest
from ..stats._state import ATTENTION_SINKS
from .sites import Site

__all__ = ["SUFFIX", "CHUNK_ELEMENTS", "attention_modules", "attention_sites", "named_sites", "watch", "rows"]

SUFFIX = ":attention"
#: logits computed at once per chunk of query rows (``B · H · rows · S``): 4 Mi float32, 16 MiB per temporary
CHUNK_ELEMENTS = 1 << 22

#: (thread, module path) -> [captures yet to read it, the module's call in the running forward],
#: until the last recording capture's post-hook takes it (at once: attention modules do not nest).
#: Sites are shared by models of one structure (the capture remembers resolved sites), so they
#: name their module by path, not identity
_CALLS: dict[tuple[int, str], list] = {}
#: id(attention module) -> its path and, per capture watching it, whether its forward is recorded
_WATCHED: dict[int, tuple[str, list[Callable[[], bool]]]] = {}
#: the unpatched ``AttentionInterface.get_interface`` while any capture watches, and how many do
_PATCH: list[Any] = []
#: the wrapper handed out for each attention function (one per function, not per call)
_WRAPPED: dict[tuple[Any, str], Callable] = {}


def _recorders(model: nn.Module) -> list[tuple[type, str | None]]:
    """The ``(class, layer name)`` pairs transformers records as ``attentions`` (self-attention)."""
    found: list[tuple[type, str | None]] = []
    for m in model.modules():
        flags = getattr(type(m), "_can_record_outputs", None)
        spec = flags.get("attentions") if isinstance(flags, dict) else None
        for s in spec if isinstance(spec, list) else [spec]:
            cls = getattr(s, "target_class", s)
            if isinstance(cls, type) and (cls, getattr(s, "layer_name", None)) not in found:
                found.append((cls, getattr(s, "layer_name", None)))
    return found


def attention_modules(model: nn.Module) -> list[str]:
    """The paths of ``model``'s self-attention modules, in module order: the classes transformers
    records as ``attentions`` (``_can_record_outputs``), else modules whose class name ends in
    ``Attention`` and that carry a ``config`` naming an attention implementation."""
    recorders = _recorders(model)
    out = []
    for name, m in model.named_modules():
        if not name:
            continue
        if recorders:
            for cls, layer in recorders:
                tail = (layer or "").lstrip(".")
                if isinstance(m, cls) and (not tail or name == tail or name.endswith("." + tail)):
                    out.append(name)
                    break
        elif (type(m).__name__.endswith("Attention") and "cross" not in name.rsplit(".", 1)[-1].lower()
              and hasattr(getattr(m, "config", None), "_attn_implementation")):
            out.append(name)
    return out


def _site(path: str) -> Site:
    return Site(path + SUFFIX, path, "output", None, stats=("attention",), pack=_pack(path))


def attention_sites(model: nn.Module) -> list[Site]:
    """``sites="attention"``: one site per self-attention module.

    Raises:
        SiteError: the model has no attention module of transformers' attention interface.
    """
    paths = attention_modules(model)
    if not paths:
        raise SiteError(f"sites='attention' found no attention module in {type(model).__name__}; expected a "
                        "transformers model whose attention calls AttentionInterface (eager, sdpa, flex); "
                        "pass module names or globs")
    return [_site(p) for p in paths]


def named_sites(spec: str, model: nn.Module) -> list[Site]:
    """The sites of ``"<attention module or glob>:attention"``.

    Raises:
        SiteError: the name or pattern matches no attention module.
    """
    pattern = spec[: -len(SUFFIX)]
    paths = attention_modules(model)
    hits = [p for p in paths if fnmatch.fnmatchcase(p, pattern)]
    if not hits:
        raise SiteError(f"site {spec!r} matches no attention module; expected a module path or glob before "
                        f"':attention'{closest(pattern, paths) if paths else ' (the model has none)'}")
    return [_site(p) for p in hits]


# ------------------------------------------------------------------------- the call, noted
def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _wrap(fn: Callable, implementation: str) -> Callable:
    key = (fn, implementation)
    wrapped = _WRAPPED.get(key)
    if wrapped is not None:
        return wrapped
    try:
        signature: inspect.Signature | None = inspect.signature(fn)
    except (TypeError, ValueError):
        signature = None

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        watched = _WATCHED.get(id(module))
        readers = sum(1 for w in watched[1] if w()) if watched is not None and not _in_backward() else 0
        if readers:  # the captures recording this forward: each site's post-hook takes the call once
            where = (threading.get_ident(), watched[0])
            try:
                extra = dict(kwargs)
                if args and signature is not None:
                    extra.update(signature.bind_partial(module, query, key, value, attention_mask, *args,
                                                        **kwargs).arguments)
                causal = extra.get("is_causal")
                if causal is None:  # as transformers' SDPA path: the call's flag, else the module's
                    causal = getattr(module, "is_causal", True)
                _CALLS[where] = [readers, (query.detach(), key.detach(), attention_mask, extra.get("scaling"),
                                      extra.get("softcap"), causal,
                                      extra.get("s_aux"),
                                      implementation)]
            except Exception as err:  # never into the model's forward
                _CALLS[where] = [readers, (f"the attention call could not be read ({type(err).__name__}: {err})",)]
        return fn(module, query, key, value, attention_mask, *args, **kwargs)

    _WRAPPED[key] = attention
    return attention


def watch(model: nn.Module, sites: list[Site], recorded: Callable[[], bool]) -> Callable[[], None]:
    """Note the attention calls of ``sites``' modules while ``recorded()`` says the forward is
    recorded; returns the undo (call it in ``finally``). The first watcher patches
    ``AttentionInterface.get_interface``; the last one to leave restores it."""
    from transformers.modeling_utils import AttentionInterface

    modules = dict(model.named_modules())
    paths = {id(modules[s.module]): s.module for s in sites if s.stats == ("attention",)}
    if not paths:
        return lambda: None
    if not _PATCH:
        original = AttentionInterface.__dict__["get_interface"]

        def get_interface(self, attn_implementation, default):
            return _wrap(original(self, attn_implementation, default), str(attn_implementation))

        AttentionInterface.get_interface = get_interface  # type: ignore[method-assign]
        _PATCH[:] = [original, 0]
    _PATCH[1] += 1
    for i, path in paths.items():
        _WATCHED.setdefault(i, (path, []))[1].append(recorded)

    def undo() -> None:
        for i, path in paths.items():
            left = [w for w in _WATCHED.get(i, (path, []))[1] if w is not recorded]
            if left:
                _WATCHED[i] = (path, left)
            else:
                _WATCHED.pop(i, None)
                for key in [k for k in _CALLS if k[1] == path]:
                    del _CALLS[key]
        if _PATCH:
            _PATCH[1] -= 1
            if _PATCH[1] <= 0:
                AttentionInterface.get_interface = _PATCH[0]  # type: ignore[method-assign]
                _PATCH.clear()
                _WRAPPED.clear()

    return undo


# --------------------------------------------------------------------------- the statistics
def _pack(path: str):
    def pack(args: tuple, kwargs: dict, output: Any) -> Tensor | str:
        where = (threading.get_ident(), path)
        entry = _CALLS.get(where)
        call = None
        if entry is not None:
            entry[0] -= 1
            call = entry[1]
            if entry[0] <= 0:  # the last capture recording it: the references go now
                del _CALLS[where]
        if _in_backward():  # a gradient-checkpointing recompute: dropped by the capture
            return "recompute"
        if call is None:
            return ("the attention module did not call transformers' attention interface in this forward (a "
                    "custom attention path, e.g. GPT-2's reorder_and_upcast_attn); expected a call through "
                    "AttentionInterface; capture the module's output with sites='<module>' instead")
        if len(call) == 1:
            return call[0]
        query, key, mask, scaling, softcap, is_causal, s_aux, implementation = call
        if s_aux is not None:
            return "the attention has learned sink logits (s_aux), which these statistics do not model"
        if "flash" in implementation or "paged" in implementation:
            return (f"attention implementation {implementation!r} passes no 4-D mask (packed or paged sequences); "
                    "expected eager or sdpa; load the model with attn_implementation='sdpa' for these statistics")
        if isinstance(mask, Tensor) and mask.dim() != 4:
            return (f"the attention mask has shape {tuple(mask.shape)}; expected a 4-D [batch, 1 or heads, queries, "
                    "keys] mask; load the model with attn_implementation='sdpa'")
        if mask is not None and not isinstance(mask, Tensor) and not callable(getattr(mask, "mask_mod", None)):
            return (f"the attention mask is a {type(mask).__name__}; expected a 4-D tensor or flex attention's "
                    "BlockMask; load the model with attn_implementation='sdpa'")
        try:
            causal = mask is None and implementation != "eager" and bool(is_causal)
            with torch.no_grad():
                return rows(query, key, mask, scaling, softcap, causal)
        except Exception as err:  # never into the model's forward
            return f"the attention statistics could not be computed ({type(err).__name__}: {err})"

    return pack


def _allowed(mask: Any, b: int, h: int, t0: int, t1: int, s: int, offset: int, causal: bool,
             device: torch.device) -> tuple[Tensor, Tensor | None]:
    """Which keys the query rows ``t0:t1`` may attend to (bool, broadcastable to ``[B, H, c, S]``)
    and the additive bias of a float mask (``None`` otherwise)."""
    keys = torch.arange(s, device=device)
    queries = torch.arange(t0, t1, device=device).unsqueeze(-1)
    if mask is None:
        if causal:
            return (keys <= queries + offset).expand(1, 1, t1 - t0, s), None
        return torch.ones(1, 1, t1 - t0, s, dtype=torch.bool, device=device), None
    if not isinstance(mask, Tensor):  # flex attention's BlockMask: its mask_mod, on local indices
        allowed = mask.mask_mod(torch.arange(b, device=device).view(-1, 1, 1, 1),
                                torch.arange(h, device=device).view(1, -1, 1, 1),
                                queries.view(1, 1, -1, 1), keys.view(1, 1, 1, -1))
        return allowed.to(torch.bool), None
    m = mask[..., t0:t1, :s]
    if m.dtype == torch.bool:
        return m, None
    return m > torch.finfo(m.dtype).min / 2, m.float()


#: what a logit becomes where the key is not allowed: exp() of it is 0. -inf rather than a large
#: finite value: torch's CPU exp takes a slow path for finite arguments below its range (3x slower)
_NEG = float("-inf")
#: the shifted logits are clamped to this before ``p · z``, so that a not-allowed key's ``0 · -inf``
#: is 0, not NaN (an allowed key this far below the maximum has ``p < 1e-4000``: it adds nothing)
_FLOOR = -1e4


def rows(query: Tensor, key: Tensor, mask: Any, scaling: float | None = None,
         softcap: float | None = None, causal: bool = False) -> Tensor:
    """Per query token and head, what :class:`probe.stats.attention.Attention` folds in.

    Args:
        query: ``[B, H, T, d]``.
        key: ``[B, H_kv, S, d]`` (``H`` a multiple of ``H_kv``: grouped-query keys are repeated).
        mask: ``[B or 1, 1 or H, T, S]`` boolean (``True``: may attend) or additive float, a
            flex-attention ``BlockMask`` (its ``mask_mod``), or ``None``.
        scaling: the logits' scale (``d ** -0.5`` when ``None``, as transformers' functions do).
        softcap: ``logits = softcap · tanh(logits / softcap)`` before the mask (Gemma 2), or ``None``.
        causal: with ``mask=None``, key ``j`` is allowed for query ``t`` iff ``j <= t`` (keys cut to ``T``).

    Returns:
        float32 ``[B·T, F·H]`` laid out ``[B·T, F, H]``: max logit (raw ``q·k · scaling``), the query
        index minus the key index of that maximum (cache coordinates), entropy (nats), entropy /
        ``ln(allowed keys)``, and the probability on each of the first ``K`` allowed keys. Rows
        with no allowed key hold ``-inf`` and NaN.

    Cost per chunk of ``c`` query rows: one ``[B, H, c, S]`` matmul and six elementwise passes
    over it (mask, max, shift, exp, clamp, product); the sink keys are found on the mask's own
    shape (``searchsorted`` on its running count) and gathered, not summed over all keys.
    """
    b, h, t, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    if h % hkv or key.shape[0] not in (b, 1) or key.shape[-1] != d:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} do not pair up")
    scale = float(scaling) if scaling is not None else d ** -0.5
    q = query.float() * scale  # scaled once here rather than each chunk's logits
    k = key.float()
    if hkv != h:
        k = k[:, :, None].expand(k.shape[0], hkv, h // hkv, s, d).reshape(k.shape[0], h, s, d)
    causal = causal and t > 1  # one query (decoding) attends to every key, as SDPA's is_causal rule
    if causal and s > t:
        k, s = k[:, :, :t], t
    offset = 0 if causal or mask is None else s - t
    kt = k.transpose(-1, -2)
    nk = ATTENTION_SINKS
    out = torch.empty(b, t, 4 + nk, h, dtype=torch.float32, device=q.device)
    step = max(1, CHUNK_ELEMENTS // max(1, b * h * s))
    targets = torch.arange(1, nk + 1, device=q.device)
    for t0 in range(0, t, step):
        t1 = min(t, t0 + step)
        c = t1 - t0
        allowed, bias = _allowed(mask, b, h, t0, t1, s, offset, causal, q.device)
        z = torch.matmul(q[:, :, t0:t1], kt)  # [B, H, c, S]: the raw logits, (q · scaling) · k
        # not allowed: + _NEG, which absorbs any logit (an add broadcast from the mask's shape is
        # several times cheaper than masked_fill with a broadcast mask)
        off = torch.zeros(allowed.shape, dtype=torch.float32, device=q.device).masked_fill_(~allowed, _NEG)
        if softcap is None and bias is None:
            top = z.add_(off).max(-1)
            shift = top.values
        else:
            top = (z + off).max(-1)
            if softcap is not None:
                z = torch.tanh(z / softcap) * softcap
            if bias is not None:
                z = z + bias
            z = z.add_(off)
            shift = z.amax(-1)
        shift = torch.where(torch.isfinite(shift), shift, 0.0)  # a row with no allowed key stays -inf
        zs = z.sub_(shift.unsqueeze(-1))
        e = zs.exp()
        total = e.sum(-1)  # [B, H, c]
        ent = torch.log(total) - torch.linalg.vecdot(e, zs.clamp_(min=_FLOOR)) / total  # -Σ p ln p, p = e / total
        count = allowed.sum(-1)
        norm = torch.where(count > 1, ent / torch.log(count.clamp(min=2).float()), torch.zeros_like(ent))
        # the index of each query's j-th allowed key: the first where the running count reaches j + 1
        running = torch.cumsum(allowed, -1)
        first = torch.searchsorted(running.contiguous(), targets.expand(*running.shape[:-1], nk).contiguous())
        first = first.expand(b, h, c, nk)
        sink = e.gather(-1, first.clamp(max=s - 1)) / total.unsqueeze(-1)
        sink = sink.masked_fill_(first >= s, 0.0)
        none = (count == 0).expand(b, h, c)
        o = out[:, t0:t1]  # [B, c, F, H]
        o[:, :, 0] = top.values.masked_fill(none, float("-inf")).transpose(1, 2)
        o[:, :, 1] = (torch.arange(t0, t1, device=q.device) + offset - top.indices).float().transpose(1, 2)
        o[:, :, 2] = ent.masked_fill(none, float("nan")).transpose(1, 2)
        o[:, :, 3] = norm.masked_fill(none, float("nan")).transpose(1, 2)
        o[:, :, 4:] = sink.masked_fill_(none.unsqueeze(-1), float("nan")).permute(0, 2, 3, 1)
        del z, zs, e
    return out.reshape(b * t, (4 + nk) * h)
