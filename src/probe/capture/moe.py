"""Mixture-of-experts sites: each router's routing and each experts module's input, per expert.

Recipe::

    with probe.capture(model, "moe.h5", sites="moe"):          # or "linear_inputs": experts included
        model(**batch)
    run = probe.load("moe.h5")
    run["model.layers.0.mlp.gate:router"].router.counts      # tokens per expert
    run["model.layers.0.mlp.experts:experts"].experts.absmax   # [E, D] per expert and channel
    run["model.layers.0.mlp.experts:down_proj"].experts.absmax # [E, I]: the down projection's input

A mixture-of-experts layer, as transformers 5 builds them (Mixtral, Qwen3-MoE, DeepSeek-V3,
OLMoE, ...: ``@use_experts_implementation``), holds its experts as fused 3-D parameters
(``gate_up_proj [E, 2I, D]`` or ``up_proj``, and ``down_proj [E, D, I]``) in one module called
as ``experts(hidden_states [n, D], top_k_index [n, k], top_k_weights [n, k])`` on the flattened
tokens, after a router module that returns ``(router_logits [n, E], top_k_weights, top_k_index)``.
There is no ``nn.Linear`` per expert to hook. Found here, per layer:

- **``<router>:router``** (post-hook on the router): the router's returned logits, indices and
  weights packed as ``[n, E + 2k]`` float32 rows for :class:`probe.stats.router.Router`;
- **``<experts>:experts``** (pre-hook on the experts module): the chosen experts and the input
  rows packed as ``[n, k + D]`` float32 for :class:`probe.stats.experts.Experts` — expert ``e``'s
  gate/up input is exactly the rows routed to it;
- **``<experts>:down_proj``** (the experts call followed by :class:`_DownMode`, a
  ``TorchFunctionMode`` pushed by a pre-hook and popped by an always-called post-hook): the down
  projection's input ``act(gate) · up`` of each (token, slot), packed as ``[n, k + k·I]`` for the
  same statistic (``per_slot``). It recognises transformers' eager loop (``F.linear`` by
  ``down_proj[e]``), ``batched_mm`` (``bmm`` by ``down_proj[ids]``) and ``grouped_mm`` (a grouped
  matmul by ``down_proj`` with offsets); every function runs as called.

Each site runs only its own statistic (``Site.stats``); ``n`` is the forward's ``batch ·
sequence`` and its tokens are the forward's (:meth:`probe.capture.tokens.TokenContext.flat_tokens`),
so padding is never counted. A router found is one child of the experts module's parent that is
transformers' ``router_logits`` recorder class, or else a child with a ``[E, D]`` ``weight`` (``gate``,
``router``). A call that does not look as described (a router returning only logits, a custom
experts signature) is refused at its site with one line; the model's forward goes on.

Experts held as modules (a ``ModuleList``/``ModuleDict`` named ``*expert*``: Switch
Transformers, NLLB-MoE) get both expert sites from the container's call followed by
:class:`_ListMode` (each expert's first and last ``nn.Linear`` input, by weight identity); their
routers are not read (each expert's own ``nn.Linear`` input holds only its tokens, and is
refused by the token check when named alone).
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import SiteError, closest
from ..stats._base import host_reads
from .sites import Site

__all__ = ["MoeLayer", "moe_layers", "moe_sites", "expert_sites", "named_sites", "SUFFIXES",
           "ROUTER_SUFFIX", "EXPERTS_SUFFIX", "DOWN_SUFFIX"]

ROUTER_SUFFIX = ":router"
EXPERTS_SUFFIX = ":experts"
DOWN_SUFFIX = ":down_proj"
SUFFIXES = (ROUTER_SUFFIX, EXPERTS_SUFFIX, DOWN_SUFFIX)


class MoeLayer:
    """One mixture-of-experts layer: its experts module, its router (if found), ``E`` and ``k``."""

    def __init__(self, experts: str, router: str | None, n_experts: int, top_k: int,
                 linears: list[tuple[nn.Linear, nn.Linear]] | None = None) -> None:
        self.experts = experts
        self.router = router
        self.n_experts = n_experts
        self.top_k = top_k
        #: experts held as modules: each expert's first and last ``nn.Linear`` (``None``: fused)
        self.linears = linears

    def __repr__(self) -> str:
        kind = "" if self.linears is None else ", modules"
        return f"MoeLayer({self.experts!r}, router={self.router!r}, E={self.n_experts}, k={self.top_k}{kind})"


def _module_experts(name: str, module: nn.Module) -> list[tuple[nn.Linear, nn.Linear]] | None:
    """Each expert's first and last ``nn.Linear`` of an experts container (a ``ModuleList`` /
    ``ModuleDict`` named ``*expert*`` of at least two modules of one class (its children that hold
    an ``nn.Linear``), each with a first
    ``Linear`` reading ``D`` and a last one writing ``D``: Switch Transformers, NLLB-MoE), else ``None``."""
    if not isinstance(module, (nn.ModuleList, nn.ModuleDict)) or "expert" not in name.rsplit(".", 1)[-1].lower():
        return None
    # the experts: the children holding Linear layers (NLLB-MoE's container also holds a Dropout)
    members = [m for m in module.children() if any(isinstance(x, nn.Linear) for x in m.modules())]
    if len(members) < 2 or len({type(m) for m in members}) != 1:
        return None
    out = []
    for m in members:
        lin = [x for x in m.modules() if isinstance(x, nn.Linear)]
        if len(lin) < 2 or lin[0].in_features != lin[-1].out_features:
            return None
        out.append((lin[0], lin[-1]))
    return out


def _router_k(router: nn.Module | None) -> int | None:
    """Experts per token of a router that says it only in its class name (``...Top2Router``)."""
    found = re.search(r"Top(\d+)", type(router).__name__) if router is not None else None
    return int(found.group(1)) if found else None


def _fused(module: nn.Module) -> int | None:
    """The expert count of a fused 3-D experts module, else ``None``."""
    down = getattr(module, "down_proj", None)
    up = getattr(module, "gate_up_proj", None)
    if up is None:
        up = getattr(module, "up_proj", None)
    if not (isinstance(down, Tensor) and isinstance(up, Tensor) and down.dim() == 3 and up.dim() == 3):
        return None
    if down.shape[0] != up.shape[0]:
        return None
    return int(down.shape[0])


def _router_classes(model: nn.Module) -> tuple[type, ...]:
    """The classes transformers records as ``router_logits`` (``_can_record_outputs``)."""
    found: list[type] = []
    for m in model.modules():
        flags = getattr(type(m), "_can_record_outputs", None)
        spec = flags.get("router_logits") if isinstance(flags, dict) else None
        for s in spec if isinstance(spec, list) else [spec]:
            cls = getattr(s, "target_class", s)
            if isinstance(cls, type) and cls not in found:
                found.append(cls)
    return tuple(found)


def _top_k(model: nn.Module, router: nn.Module | None, experts: nn.Module) -> int | None:
    for obj in (router, experts, getattr(experts, "config", None), getattr(model, "config", None)):
        for attr in ("top_k", "num_experts_per_tok"):
            v = getattr(obj, attr, None) if obj is not None else None
            if isinstance(v, int) and v > 0:
                return v
    text = getattr(getattr(model, "config", None), "get_text_config", None)
    v = getattr(text(), "num_experts_per_tok", None) if callable(text) else None
    return v if isinstance(v, int) and v > 0 else None


def moe_layers(model: nn.Module) -> list[MoeLayer]:
    """Every fused-experts layer of ``model``, in module order (see the module docstring)."""
    modules = dict(model.named_modules())
    routers = _router_classes(model)
    out = []
    for name, module in modules.items():
        e = _fused(module) if name else None
        linears = _module_experts(name, module) if name and e is None else None
        if linears is not None:
            e = len(linears)
        if e is None:
            continue
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        router = None
        for child, m in modules[parent].named_children():
            path = f"{parent}.{child}" if parent else child
            if path == name:
                continue
            weight = getattr(m, "weight", None)
            if linears is not None:  # a router of its own kind (one-hot masks): found by name, never read
                if "router" in child or "gate" in child:
                    router = path
                    break
            elif (routers and isinstance(m, routers)) or (
                    not routers and isinstance(weight, Tensor) and weight.dim() == 2 and weight.shape[0] == e):
                router = path
                break
        k = _top_k(model, modules.get(router) if router else None, module)
        if k is None and linears is not None:
            k = _router_k(modules.get(router) if router else None)
        if k is None:
            continue
        out.append(MoeLayer(name, None if linears is not None else router, e, k, linears))
    return out


def _pack_router(e: int, k: int):
    def pack(args: tuple, kwargs: dict, output: Any) -> Tensor | str:
        try:
            if not (isinstance(output, (tuple, list)) and len(output) >= 3):
                return (f"the router returned {type(output).__name__}, not (logits, weights, indices); expected "
                        "transformers' TopKRouter output; capture its logits with sites='<router>' instead")
            logits, weights, index = output[0], output[1], output[2]
            if weights.dtype in (torch.int64, torch.int32):  # (logits, indices, weights) order
                weights, index = index, weights
            if logits.shape[-1] != e or index.shape[-1] != k or weights.shape[-1] != k:
                return (f"the router returned logits {tuple(logits.shape)}, weights {tuple(weights.shape)} and "
                        f"indices {tuple(index.shape)}; expected [n, {e}], [n, {k}], [n, {k}]")
            with torch.no_grad():
                n = logits.shape[:-1].numel()
                return torch.cat((logits.detach().reshape(n, e).float(), index.detach().reshape(n, k).float(),
                                  weights.detach().reshape(n, k).float()), -1)
        except Exception as err:  # never into the model's forward
            return f"the router's output could not be read ({type(err).__name__}: {err})"

    return pack


def _pack_experts(k: int):
    def pack(args: tuple, kwargs: dict, output: Any) -> Tensor | str:
        try:
            x = args[0] if args else kwargs.get("hidden_states")
            index = args[1] if len(args) > 1 else kwargs.get("top_k_index")
            if not isinstance(x, Tensor) or not isinstance(index, Tensor) or index.is_floating_point():
                return ("the experts module was called without (hidden_states, top_k_index, top_k_weights); "
                        "expected transformers' fused experts call; capture its input with '<experts>:input'")
            if x.dim() != 2 or index.shape != (x.shape[0], k):
                return (f"the experts module received hidden_states {tuple(x.shape)} and top_k_index "
                        f"{tuple(index.shape)}; expected [n, D] and [n, {k}]")
            with torch.no_grad():
                return torch.cat((index.detach().float(), x.detach().float()), -1)
        except Exception as err:  # never into the model's forward
            return f"the experts module's input could not be read ({type(err).__name__}: {err})"

    return pack


def _linear_funcs() -> tuple[set, set, set]:
    """The torch functions a fused experts forward multiplies by its down projection with:
    ``F.linear`` (transformers' eager loop), ``bmm`` (``batched_mm``) and the grouped matmuls
    (``grouped_mm``: ``F.grouped_mm``, ``torch._grouped_mm`` or transformers' fallback op)."""
    import torch.nn.functional as F

    linear = {F.linear, torch._C._nn.linear}
    bmm = {torch.bmm, Tensor.bmm}
    grouped = {f for f in (getattr(F, "grouped_mm", None), getattr(torch, "_grouped_mm", None)) if f is not None}
    try:
        op = torch.ops.transformers.grouped_mm_fallback
        grouped |= {op, op.default}
    except (AttributeError, RuntimeError):
        pass
    return linear, bmm, grouped


_VIEWS = {Tensor.transpose, torch.transpose, Tensor.t, torch.t, Tensor.contiguous, Tensor.to,
          getattr(Tensor.mT, "__get__"), getattr(Tensor.T, "__get__"), Tensor.permute, torch.permute}
_GATHERS = {Tensor.__getitem__}
_REPEATS = {Tensor.repeat_interleave, torch.repeat_interleave}


class _DownMode(torch.overrides.TorchFunctionMode):
    """Follows one fused experts call (between its pre- and post-hook) and keeps, for every
    multiplication by ``down_proj``, its other operand — the down projection's input — with the
    token of each row (the last gather of ``hidden_states``: ``hidden_states[token_idx]``, ``[perm //
    k]`` or ``repeat_interleave(k)``) and its expert (the index of ``down_proj[...]``, or the group
    of a grouped matmul from its offsets). Every function runs as called: the output is unchanged."""

    def __init__(self, down: Tensor, hidden: Tensor, n_experts: int) -> None:
        super().__init__()
        self.down, self.hidden, self.e = down, hidden, n_experts
        self.rows: Tensor | None = None
        self.tags: list[tuple[Tensor, Any]] = []  # tensors made from down_proj -> their experts
        self.parts: list[tuple[Tensor, Tensor, Tensor]] = []  # (input [R, I], token [R], expert [R])
        self.error: str | None = None
        self.linear, self.bmm, self.grouped = _linear_funcs()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.error is None and args:
            try:
                self._see(func, args, kwargs, out)
            except Exception as err:  # never into the model's forward
                self.error = f"{type(err).__name__}: {err}"
        return out

    def _tag(self, t: Any) -> Any:
        if t is self.down:
            return "grouped"
        return next((tag for u, tag in self.tags if u is t), None)

    def _see(self, func, args: tuple, kwargs: dict, out: Any) -> None:
        a = args[0]
        if func in _GATHERS:
            if a is self.hidden:
                idx = args[1]
                if isinstance(idx, tuple):
                    idx = [i for i in idx if i is not None]
                    idx = idx[0] if len(idx) == 1 else None
                ok = isinstance(idx, Tensor) and idx.dim() == 1 and not idx.is_floating_point() \
                    and idx.dtype != torch.bool
                self.rows = idx.long() if ok else None
            elif a is self.down:
                idx = args[1]
                if isinstance(idx, int):
                    idx = torch.tensor(idx, device=a.device)
                if isinstance(idx, Tensor) and idx.dim() <= 1 and not idx.is_floating_point():
                    self.tags.append((out, idx.long()))
            return
        if func in _REPEATS and a is self.hidden:
            r = args[1] if len(args) > 1 else kwargs.get("repeats")
            dim = args[2] if len(args) > 2 else kwargs.get("dim")
            if isinstance(r, int) and dim == 0:
                self.rows = torch.arange(a.shape[0], device=a.device).repeat_interleave(r)
            return
        if func in _VIEWS:
            tag = self._tag(a)
            if tag is not None and isinstance(out, Tensor):
                self.tags.append((out, tag))
            return
        if func in self.linear:
            w: Any = args[1] if len(args) > 1 else kwargs.get("weight")
            tag = self._tag(w)
            if isinstance(tag, Tensor) and tag.dim() == 0:
                self._keep(a, tag.expand(a.shape[0]) if a.dim() == 2 else None)
                self._drop(w)
        elif func in self.bmm:
            b: Any = args[1] if len(args) > 1 else kwargs.get("mat2")
            ta, tb = self._tag(a), self._tag(b)
            if isinstance(ta, Tensor) and ta.dim() == 1 and b.dim() == 3 and b.shape[-1] == 1:
                self._keep(b.squeeze(-1), ta)  # weight [S, D, I] @ x [S, I, 1]
                self._drop(a)
            elif isinstance(tb, Tensor) and tb.dim() == 1 and a.dim() == 3 and a.shape[1] == 1:
                self._keep(a.squeeze(1), tb)  # x [S, 1, I] @ weight [S, I, D]
                self._drop(b)
        elif func in self.grouped:
            w = args[1] if len(args) > 1 else kwargs.get("mat_b", kwargs.get("weight"))
            offs = args[2] if len(args) > 2 else kwargs.get("offs")
            if self._tag(w) == "grouped" and isinstance(offs, Tensor) and a.dim() == 2:
                rows = torch.arange(a.shape[0], device=a.device)
                self._keep(a, torch.searchsorted(offs.to(torch.int64), rows, right=True))  # past offs[-1]: E

    def _keep(self, x: Tensor, experts: Tensor | None) -> None:
        if experts is None or self.rows is None or x.dim() != 2 or self.rows.shape[0] != x.shape[0]:
            self.error = (f"a down projection's input {tuple(x.shape)} does not line up with the last gather of "
                          f"hidden_states ({None if self.rows is None else tuple(self.rows.shape)})")
            return
        self.parts.append((x.detach(), self.rows, experts))

    def _drop(self, t: Any) -> None:
        self.tags = [(u, tag) for u, tag in self.tags if u is not t]


def _empty_rows(chosen: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """The packed ``[n, k + k·I]`` float32 rows of an experts site with the chosen experts
    ``[n, k]`` written, and the view ``[n, k, I]`` of its slots' inputs, still to be written."""
    n, k = chosen.shape
    out = torch.empty(n, k + k * width, dtype=torch.float32, device=chosen.device)
    out[:, :k] = chosen
    return out, out[:, k:].view(n, k, width)


def _rows(chosen: Tensor, inputs: Tensor) -> Tensor:
    """The packed rows (:func:`_empty_rows`) from each slot's input ``[n, k, I]``: one copy."""
    out, body = _empty_rows(chosen, inputs.shape[-1])
    body.copy_(inputs)
    return out


class _DownTap:
    """The ``<experts>:down_proj`` site of one fused experts module: :meth:`arm` (pre-hook) starts a
    :class:`_DownMode` over the call, :meth:`pack` (post-hook) ends it and packs ``[n, k + k·I]``
    float32 rows: the ``k`` chosen experts, then each slot's down-projection input (``I`` values;
    NaN where no multiplication was seen for that slot, so a miss shows as non-finite values, never
    as data). :meth:`disarm` ends a call whose output was not read. None of them raises."""

    def __init__(self, n_experts: int, top_k: int) -> None:
        self.e, self.k = n_experts, top_k
        self.mode: _DownMode | None = None
        self.index: Tensor | None = None
        self.why: str | None = None
        self.impl: str | None = None

    def arm(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.disarm()
        try:
            x = args[0] if args else kwargs.get("hidden_states")
            index = args[1] if len(args) > 1 else kwargs.get("top_k_index")
            down = getattr(module, "down_proj", None)
            if not (isinstance(x, Tensor) and isinstance(index, Tensor) and isinstance(down, Tensor)) \
                    or index.is_floating_point() or x.dim() != 2 or index.shape != (x.shape[0], self.k):
                self.why = ("the experts module was called without hidden_states [n, D] and top_k_index "
                            f"[n, {self.k}]; expected transformers' fused experts call")
                return
            self.why, self.index = None, index
            self.impl = getattr(getattr(module, "config", None), "_experts_implementation", None)
            self.mode = _DownMode(down, x, self.e)
            self.mode.__enter__()
        except Exception as err:  # never into the model's forward
            self.mode, self.why = None, f"the experts call could not be followed ({type(err).__name__}: {err})"

    def disarm(self) -> None:
        mode, self.mode = self.mode, None
        if mode is not None:
            try:
                mode.__exit__(None, None, None)
            except Exception:  # another mode pushed above ours and left: nothing more to undo
                pass

    def pack(self, args: tuple, kwargs: dict, output: Any) -> Tensor | str:
        mode, index = self.mode, self.index
        self.disarm()
        self.index = None
        if mode is None:
            return self.why or "the experts call was not followed (no pre-hook ran)"
        if mode.error is not None or not mode.parts:
            impl = self.impl
            return ("the down projection's input of the fused experts could not be followed ("
                    f"{mode.error or 'no multiplication by down_proj seen'}); expected transformers' eager, "
                    f"batched_mm or grouped_mm experts{'' if impl is None else f', got {impl!r}'}; "
                    "capture '<experts>:experts' only")
        try:
            assert index is not None
            with torch.no_grad():
                n, k = index.shape
                width = mode.parts[0][0].shape[-1]
                chosen = index.long()
                placed = []
                for x, tok, ex in mode.parts:
                    match = chosen[tok] == ex.unsqueeze(-1)  # [R, k]: the slot that chose this expert
                    placed.append((x, tok, torch.where(match.any(-1), match.int().argmax(-1), k)))
                if host_reads(index) and sum(t.shape[0] for _, t, _ in placed) == n * k:
                    flat = torch.cat([t * k + slot for _, t, slot in placed])  # the slots written
                    if bool((torch.bincount(flat, minlength=n * k + 1)[:n * k] == 1).all()):
                        # every slot once (read on the host: free on CPU): written in place, no fill
                        out, body = _empty_rows(chosen, width)
                        for x, tok, slot in placed:
                            body[tok, slot] = x.float()
                        return out
                buf = torch.full((n, k + 1, width), float("nan"), dtype=torch.float32, device=index.device)
                for x, tok, slot in placed:
                    buf[tok, slot] = x.float()
                return _rows(chosen, buf[:, :k])
        except Exception as err:  # never into the model's forward
            return f"the down projection's input could not be packed ({type(err).__name__}: {err})"


class _ListMode(_DownMode):
    """Follows one call of an experts container (experts held as modules) and keeps the input of
    each expert's first (``which="in"``) or last (``"down"``) ``nn.Linear``, by the identity of its
    weight, with the token of each row (the last gather of ``hidden_states``)."""

    def __init__(self, hidden: Tensor, weights: dict[int, tuple[Tensor, int]]) -> None:
        super().__init__(hidden, hidden, len(weights))
        self.weights = weights

    def _see(self, func, args: tuple, kwargs: dict, out: Any) -> None:
        a = args[0]
        if func in _GATHERS or func in _REPEATS:
            if a is self.hidden:
                super()._see(func, args, kwargs, out)
            return
        if func in self.linear:
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            hit = self.weights.get(id(w))
            if hit is not None and hit[0] is w and isinstance(a, Tensor):
                x = a.reshape(-1, a.shape[-1])
                self._keep(x, torch.full((x.shape[0],), hit[1], dtype=torch.int64, device=x.device))


class _ListTap(_DownTap):
    """A site of experts held as modules: ``which="in"`` (``<experts>:experts``, each expert's
    first ``Linear``'s input) or ``"down"`` (``<experts>:down_proj``, its last ``Linear``'s input),
    packed as ``[n, k + k·W]``: per slot the expert (``E`` where the slot holds none: a token
    dropped by capacity, or fewer than ``k`` experts) and its input (NaN where none)."""

    def __init__(self, layer: MoeLayer, which: str) -> None:
        super().__init__(layer.n_experts, layer.top_k)
        assert layer.linears is not None
        pick = 0 if which == "in" else 1
        self.params = [pair[pick].weight for pair in layer.linears]

    def arm(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.disarm()
        try:
            x = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(x, Tensor) or x.dim() != 2:
                self.why = ("the experts container was called without hidden_states [n, D]; expected "
                            "Switch Transformers' / NLLB-MoE's experts(hidden_states, mask, weights)")
                return
            self.why, self.index, self.impl = None, x, None
            self.mode = _ListMode(x, {id(w): (w, e) for e, w in enumerate(self.params)})
            self.mode.__enter__()
        except Exception as err:  # never into the model's forward
            self.mode, self.why = None, f"the experts call could not be followed ({type(err).__name__}: {err})"

    def pack(self, args: tuple, kwargs: dict, output: Any) -> Tensor | str:
        mode, x = self.mode, self.index
        self.disarm()
        self.index = None
        if mode is None:
            return self.why or "the experts call was not followed (no pre-hook ran)"
        if mode.error is not None:
            return (f"the experts' inputs could not be followed ({mode.error}); expected each expert called on "
                    "hidden_states[token_idx]; capture each expert's modules by name instead")
        try:
            assert x is not None
            with torch.no_grad():
                n, k, e = x.shape[0], self.k, self.e
                width = mode.parts[0][0].shape[-1] if mode.parts else int(self.params[0].shape[-1])
                chosen = torch.full((n, k + 1), e, dtype=torch.int64, device=x.device)
                buf = torch.full((n, k + 1, width), float("nan"), dtype=torch.float32, device=x.device)
                used = torch.zeros(n, dtype=torch.int64, device=x.device)
                for rows, tok, ex in mode.parts:  # a token is at most once in one expert's call
                    slot = used[tok].clamp(max=k)
                    chosen[tok, slot] = ex
                    buf[tok, slot] = rows.float()
                    used[tok] += 1
                return _rows(chosen[:, :k], buf[:, :k])
        except Exception as err:  # never into the model's forward
            return f"the experts' inputs could not be packed ({type(err).__name__}: {err})"


def _sites(layer: MoeLayer, which: tuple[str, ...]) -> list[Site]:
    moe = (layer.n_experts, layer.top_k)
    out = []
    if layer.linears is not None:  # experts held as modules: both sites follow the container's call
        for kind, suffix, part in (("experts", EXPERTS_SUFFIX, "in"), ("down_proj", DOWN_SUFFIX, "down")):
            if kind in which:
                tap: _DownTap = _ListTap(layer, part)
                out.append(Site(layer.experts + suffix, layer.experts, "output", None, stats=("experts",),
                                moe=(*moe, 1), pack=tap.pack, arm=tap.arm, disarm=tap.disarm))
        return out
    if "router" in which and layer.router is not None:
        out.append(Site(layer.router + ROUTER_SUFFIX, layer.router, "output", None, stats=("router",), moe=moe,
                        pack=_pack_router(*moe)))
    if "experts" in which:
        out.append(Site(layer.experts + EXPERTS_SUFFIX, layer.experts, "input", 0, stats=("experts",), moe=moe,
                        pack=_pack_experts(layer.top_k)))
    if "down_proj" in which:
        tap = _DownTap(*moe)
        out.append(Site(layer.experts + DOWN_SUFFIX, layer.experts, "output", None, stats=("experts",),
                        moe=(*moe, 1), pack=tap.pack, arm=tap.arm, disarm=tap.disarm))
    return out


def moe_sites(model: nn.Module) -> list[Site]:
    """``sites="moe"``: each layer's router site, then its experts and down-projection sites.

    Raises:
        SiteError: the model has no fused mixture-of-experts layer.
    """
    layers = moe_layers(model)
    if not layers:
        raise SiteError(f"sites='moe' found no mixture-of-experts layer in {type(model).__name__}; expected "
                        "experts held as fused 3-D weights (gate_up_proj/up_proj and down_proj [E, ...]); "
                        "pass module names or globs")
    return [s for layer in layers for s in _sites(layer, ("router", "experts", "down_proj"))]


def expert_sites(model: nn.Module) -> list[Site]:
    """The experts and down-projection sites (``linear_inputs`` includes them); ``[]`` without MoE layers."""
    return [s for layer in moe_layers(model) for s in _sites(layer, ("experts", "down_proj"))]


def named_sites(spec: str, model: nn.Module) -> list[Site]:
    """The sites of ``"<router or glob>:router"`` / ``"<experts or glob>:experts"`` / ``":down_proj"``.

    Raises:
        SiteError: the name or pattern matches no router (experts module) of a MoE layer.
    """
    kind = next(k for k, suffix in (("router", ROUTER_SUFFIX), ("experts", EXPERTS_SUFFIX),
                                    ("down_proj", DOWN_SUFFIX)) if spec.endswith(suffix))
    pattern = spec[: -len(kind) - 1]
    layers = moe_layers(model)
    paths = [(layer.router if kind == "router" else layer.experts) for layer in layers]
    hits = [layer for layer, p in zip(layers, paths) if p is not None and fnmatch.fnmatchcase(p, pattern)]
    if not hits:
        known = [p for p in paths if p is not None]
        raise SiteError(f"site {spec!r} matches no mixture-of-experts {kind}; expected a module path or glob "
                        f"before {':' + kind!r}{closest(pattern, known) if known else ' (the model has none)'}")
    return [s for layer in hits for s in _sites(layer, (kind,))]
