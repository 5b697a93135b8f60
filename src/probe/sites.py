"""Which tensors to capture.

``"hidden_states"`` reproduces ``output_hidden_states=True`` of transformers exactly: entry 0 is
the input of the first decoder layer, entries 1..L the layers' outputs, and the last one is
replaced by the base model's ``last_hidden_state`` (after the final norm) where transformers ties
it. The layers are found through transformers' own ``_can_record_outputs`` registry; models
without it fall back to the longest ``ModuleList`` of identical blocks (no tie).

Anything else names modules whose output is captured: exact module paths, glob patterns
(``"model.layers.*.mlp"``), or a callable ``(name, module) -> bool``. A name or glob ending in
``:input`` captures the module's input (its first positional argument) instead, as site
``"<module>:input"``. ``"linear_inputs"`` is the input of every ``nn.Linear`` and transformers
``Conv1D`` except the output head, one site per module named by its module path: what
quantization calibration reads (see ``docs/calibration.md``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from torch import nn

from .errors import SiteError, closest

__all__ = ["Site", "SiteSpec", "resolve", "linear_input_sites"]

INPUT_SUFFIX = ":input"

SiteSpec = str | Sequence[str] | Callable[[str, nn.Module], bool]


@dataclass(frozen=True)
class Site:
    """One captured tensor: where it is read and how."""

    name: str
    module: str
    #: ``input``: first positional argument (pre-hook); ``output``: output, or its ``index``-th
    #: element when a tuple; ``last_hidden_state``: the model output's ``last_hidden_state``
    read: Literal["input", "output", "last_hidden_state"] = "output"
    index: int = 0
    hf_index: int | None = None


def resolve(model: nn.Module, sites: SiteSpec = "hidden_states") -> list[Site]:
    """Resolve a site spec against ``model`` without touching it.

    Raises:
        SiteError: unknown or duplicate names, a pattern matching nothing, or a model whose
            hidden states cannot be located (then pass ``sites=`` explicitly).
    """
    modules = dict(model.named_modules())
    if callable(sites) and not isinstance(sites, str):
        found = [Site(name or "<root>", name) for name, m in modules.items() if sites(name, m)]
        if not found:
            raise SiteError("sites=<callable> matched no module; expected at least one; "
                            "check the predicate against model.named_modules()")
        return found
    specs = [sites] if isinstance(sites, str) else list(sites)
    if not specs:
        raise SiteError("sites is empty; expected 'hidden_states', module names, globs or a callable; "
                        "pass sites='hidden_states'")
    found: list[Site] = []
    for spec in specs:
        if not isinstance(spec, str):
            raise SiteError(f"sites entries must be strings; got {type(spec).__name__}; "
                            "pass module names, glob patterns or 'hidden_states'")
        if spec == "hidden_states":
            found += hidden_state_sites(model)
        elif spec == "linear_inputs":
            found += linear_input_sites(model)
        elif spec.endswith(INPUT_SUFFIX):
            found += _input_sites(spec, modules)
        elif any(c in spec for c in "*?["):
            hits = [name for name in modules if name and fnmatch.fnmatchcase(name, spec)]
            if not hits:
                raise SiteError(f"site pattern {spec!r} matches no module; expected a glob over "
                                f"model.named_modules(){closest(spec, modules)}")
            found += [Site(name, name) for name in hits]
        elif spec in modules and spec:
            found.append(Site(spec, spec))
        else:
            raise SiteError(f"unknown site {spec!r}; expected 'hidden_states', 'linear_inputs' or a module name"
                            f"{closest(spec, [m for m in modules if m])}")
    seen: set[str] = set()
    for site in found:
        if site.name in seen:
            raise SiteError(f"site {site.name!r} is listed twice; expected each site once; "
                            "remove the duplicate from sites=")
        seen.add(site.name)
    return found


def _input_sites(spec: str, modules: dict[str, nn.Module]) -> list[Site]:
    pattern = spec[: -len(INPUT_SUFFIX)]
    if any(c in pattern for c in "*?["):
        hits = [name for name in modules if name and fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            raise SiteError(f"site pattern {spec!r} matches no module; expected a glob over "
                            f"model.named_modules() before ':input'{closest(pattern, modules)}")
    elif pattern in modules and pattern:
        hits = [pattern]
    else:
        raise SiteError(f"unknown site {spec!r}; expected a module name or glob before ':input'"
                        f"{closest(pattern, [m for m in modules if m])}")
    return [Site(name + INPUT_SUFFIX, name, "input") for name in hits]


def _output_head(model: nn.Module) -> set[int]:
    """ids of the modules that are the output head: ``get_output_embeddings()`` and any linear
    layer whose weight is the input embedding's (tied)."""
    heads: set[int] = set()
    embed = None
    for getter in ("get_output_embeddings", "get_input_embeddings"):
        fn = getattr(model, getter, None)
        try:
            found = fn() if callable(fn) else None
        except (NotImplementedError, AttributeError, TypeError):
            found = None
        if getter == "get_output_embeddings" and isinstance(found, nn.Module):
            heads.add(id(found))
        elif isinstance(found, nn.Module):
            embed = getattr(found, "weight", None)
    if embed is not None:
        for module in model.modules():
            if getattr(module, "weight", None) is embed:
                heads.add(id(module))
    return heads


def linear_input_sites(model: nn.Module) -> list[Site]:
    """The input of every ``nn.Linear`` and transformers ``Conv1D`` in ``model``, in module order,
    except the output head (``get_output_embeddings()`` or a layer tied to the input embedding);
    each site is named by its module path.

    Raises:
        SiteError: the model has no such layer.
    """
    kinds: tuple[type, ...] = (nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D

        kinds += (Conv1D,)
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    heads = _output_head(model)
    found = [Site(name, name, "input") for name, module in model.named_modules()
             if name and isinstance(module, kinds) and id(module) not in heads]
    if not found:
        raise SiteError(f"sites='linear_inputs' found no nn.Linear or Conv1D in {type(model).__name__} "
                        "besides the output head; expected at least one; pass module names with ':input'")
    return found


def _tie_default(module: nn.Module) -> bool | None:
    """The ``tie_last_hidden_states`` of a ``@capture_outputs`` forward, or None if not decorated."""
    fn = type(module).forward
    while fn is not None:
        code = getattr(fn, "__code__", None)
        if code is not None and "tie_last_hidden_states" in code.co_freevars:
            cell = fn.__closure__[code.co_freevars.index("tie_last_hidden_states")]
            return bool(cell.cell_contents)
        fn = getattr(fn, "__wrapped__", None)
    return None


def _recorders(base: nn.Module) -> list:
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY, OutputRecorder
    except ImportError:  # pragma: no cover - transformers < 5
        return []
    flags = _CAN_RECORD_REGISTRY.get(base) or getattr(base, "_can_record_outputs", None) or {}
    specs = flags.get("hidden_states")
    if specs is None:
        return []
    specs = specs if isinstance(specs, list) else [specs]
    out = []
    for spec in specs:
        if not isinstance(spec, OutputRecorder):
            spec = OutputRecorder(target_class=None if isinstance(spec, str) else spec, index=0,
                                  class_name=spec if isinstance(spec, str) else None)
        out.append(spec)
    return out


def _matches(spec, name: str, module: nn.Module) -> bool:
    hit = (spec.target_class is not None and isinstance(module, spec.target_class)) or (
        spec.class_name is not None and name.endswith(spec.class_name))
    if hit and spec.layer_name is not None:
        hit = "." + spec.layer_name.strip(".") + "." in "." + name + "."
    return hit


def hidden_state_sites(model: nn.Module) -> list[Site]:
    """The sites that reproduce ``output_hidden_states=True`` for ``model``."""
    for base_name, base in model.named_modules():
        tie = _tie_default(base)
        recorders = _recorders(base) if tie is not None else []
        if not recorders:
            continue
        prefix = base_name + "." if base_name else ""
        nested = [n for n, m in base.named_modules() if n and hasattr(m, "_can_record_outputs")
                  and _tie_default(m) is not None]
        layers = []
        for name, module in base.named_modules():
            if any(name == n or name.startswith(n + ".") for n in nested):
                continue
            for spec in recorders:
                if _matches(spec, name, module):
                    layers.append((prefix + name, spec))
                    break
        if not layers:
            continue
        config_tie = getattr(getattr(base, "config", None), "tie_last_hidden_states", None)
        tie = tie if config_tie is None else bool(config_tie)
        return _layer_sites(layers, base_name, tie, layers[0][1].capture_initial_hidden_state)
    layers = _structural_layers(model)
    if not layers:
        raise SiteError(f"cannot locate the hidden states of {type(model).__name__}: no "
                        "_can_record_outputs registry and no ModuleList of blocks; "
                        "pass sites= with module names or globs")
    return _layer_sites([(n, None) for n in layers], None, False, True)


def _layer_sites(layers: list, base_name: str | None, tie: bool, initial: bool) -> list[Site]:
    sites = []
    offset = 1 if initial else 0
    if initial:
        sites.append(Site("hidden_states.0", layers[0][0], "input", 0, 0))
    for i, (name, spec) in enumerate(layers):
        index = offset + i
        sites.append(Site(f"hidden_states.{index}", name, "output",
                          spec.index if spec is not None else 0, index))
    if tie and base_name is not None:
        last = sites[-1]
        sites[-1] = Site(last.name, base_name, "last_hidden_state", 0, last.hf_index)
    return sites


def _structural_layers(model: nn.Module) -> list[str]:
    best: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            kinds = {type(m) for m in module}
            if len(kinds) == 1:
                best = [f"{name}.{i}" if name else str(i) for i in range(len(module))]
    return best
