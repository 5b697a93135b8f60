"""Mixture-of-experts sites: each router's routing and each experts module's input, per expert.

Recipe::

    with probe.capture(model, "moe.h5", sites="moe"):          # or "linear_inputs": experts included
        model(**batch)
    run = probe.load("moe.h5")
    run["model.layers.0.mlp.gate:router"].router.counts      # tokens per expert
    run["model.layers.0.mlp.experts:experts"].experts.absmax   # [E, D] per expert and channel

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
  gate/up input is exactly the rows routed to it.

Each site runs only its own statistic (``Site.stats``); ``n`` is the forward's ``batch ·
sequence`` and its tokens are the forward's (:meth:`probe.capture.tokens.TokenContext.flat_tokens`),
so padding is never counted. A router found is one child of the experts module's parent that is
transformers' ``router_logits`` recorder class, or else a child with a ``[E, D]`` ``weight`` (``gate``,
``router``). A call that does not look as described (a router returning only logits, a custom
experts signature) is refused at its site with one line; the model's forward goes on.

Not covered: the down-projection input of fused experts (computed inside the experts' forward,
never a module's input), and experts held as a ``ModuleList``/``ModuleDict`` of modules (Switch
Transformers, NLLB-MoE), whose per-expert ``nn.Linear`` inputs hold only their tokens and are
refused by the token check.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import SiteError, closest
from .sites import Site

__all__ = ["MoeLayer", "moe_layers", "moe_sites", "expert_sites", "named_sites", "SUFFIXES",
           "ROUTER_SUFFIX", "EXPERTS_SUFFIX"]

ROUTER_SUFFIX = ":router"
EXPERTS_SUFFIX = ":experts"
SUFFIXES = (ROUTER_SUFFIX, EXPERTS_SUFFIX)


class MoeLayer:
    """One mixture-of-experts layer: its experts module, its router (if found), ``E`` and ``k``."""

    def __init__(self, experts: str, router: str | None, n_experts: int, top_k: int) -> None:
        self.experts = experts
        self.router = router
        self.n_experts = n_experts
        self.top_k = top_k

    def __repr__(self) -> str:
        return f"MoeLayer({self.experts!r}, router={self.router!r}, E={self.n_experts}, k={self.top_k})"


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
        if e is None:
            continue
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        router = None
        for child, m in modules[parent].named_children():
            path = f"{parent}.{child}" if parent else child
            if path == name:
                continue
            weight = getattr(m, "weight", None)
            if (routers and isinstance(m, routers)) or (
                    not routers and isinstance(weight, Tensor) and weight.dim() == 2 and weight.shape[0] == e):
                router = path
                break
        k = _top_k(model, modules.get(router) if router else None, module)
        if k is None:
            continue
        out.append(MoeLayer(name, router, e, k))
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


def _sites(layer: MoeLayer, which: tuple[str, ...]) -> list[Site]:
    moe = (layer.n_experts, layer.top_k)
    out = []
    if "router" in which and layer.router is not None:
        out.append(Site(layer.router + ROUTER_SUFFIX, layer.router, "output", None, stats=("router",), moe=moe,
                        pack=_pack_router(*moe)))
    if "experts" in which:
        out.append(Site(layer.experts + EXPERTS_SUFFIX, layer.experts, "input", 0, stats=("experts",), moe=moe,
                        pack=_pack_experts(layer.top_k)))
    return out


def moe_sites(model: nn.Module) -> list[Site]:
    """``sites="moe"``: each layer's router site, then its experts site.

    Raises:
        SiteError: the model has no fused mixture-of-experts layer.
    """
    layers = moe_layers(model)
    if not layers:
        raise SiteError(f"sites='moe' found no mixture-of-experts layer in {type(model).__name__}; expected "
                        "experts held as fused 3-D weights (gate_up_proj/up_proj and down_proj [E, ...]); "
                        "pass module names or globs")
    return [s for layer in layers for s in _sites(layer, ("router", "experts"))]


def expert_sites(model: nn.Module) -> list[Site]:
    """The experts sites (``linear_inputs`` includes them); ``[]`` without MoE layers."""
    return [s for layer in moe_layers(model) for s in _sites(layer, ("experts",))]


def named_sites(spec: str, model: nn.Module) -> list[Site]:
    """The sites of ``"<router or glob>:router"`` / ``"<experts or glob>:experts"``.

    Raises:
        SiteError: the name or pattern matches no router (experts module) of a MoE layer.
    """
    kind = "router" if spec.endswith(ROUTER_SUFFIX) else "experts"
    pattern = spec[: -len(ROUTER_SUFFIX if kind == "router" else EXPERTS_SUFFIX)]
    layers = moe_layers(model)
    paths = [(layer.router if kind == "router" else layer.experts) for layer in layers]
    hits = [layer for layer, p in zip(layers, paths) if p is not None and fnmatch.fnmatchcase(p, pattern)]
    if not hits:
        known = [p for p in paths if p is not None]
        raise SiteError(f"site {spec!r} matches no mixture-of-experts {kind}; expected a module path or glob "
                        f"before {':' + kind!r}{closest(pattern, known) if known else ' (the model has none)'}")
    return [s for layer in hits for s in _sites(layer, (kind,))]
