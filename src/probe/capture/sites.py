"""Which tensors to capture.

``"hidden_states"`` reproduces ``output_hidden_states=True`` of transformers exactly, in three ways,
tried in order:

1. **discovery** — one forward on the model's main input built from its config: ``2 x 5`` token
   ids (decoder ``2 x 3``; with an image where the forward needs one too), or two images, videos,
   audio clips or log-mel inputs (:func:`main_inputs`), under ``no_grad``, in the model's current
   train/eval mode, with the RNG state, normalisation buffers and hooks restored afterwards, and
   every module's calls recorded. Each
   tensor ``output_hidden_states=True`` returns is matched to the module call that produced or
   received it — the same tensor object first, else exactly equal values (possibly in another axis
   order) — and that call is hooked: the module, which call of it within the stack's forward (a
   shared or looped layer is one site per call), output or input, and which element. Composite
   models get one name per returned tuple: ``encoder_hidden_states.i``, ``decoder_hidden_states.i``,
   a two-tower model's ``text_hidden_states.i`` and ``vision_hidden_states.i``; each stack reads its
   own mask (see :mod:`probe.capture.tokens`). A returned feature map of four or more axes is read
   as its spatial positions (``Site.spatial``); ``reshaped_hidden_states``, the same values as
   ``hidden_states`` in another shape, get no sites. ``hidden_states[0]`` is read as
   the input of the first layer (the call producing ``hidden_states[1]``) when that call receives it,
   as transformers defines it, so it is captured with ``inputs_embeds`` too (the embedding does not
   run then). A returned tensor that no module call produces or receives (e.g. modified in place
   afterwards) is refused with one line.
2. **registry** — a model that discovery cannot run, whose base forward transformers
   decorates with ``capture_outputs`` and whose ``_can_record_outputs`` names as many layers as the
   config has: input of the first layer, the layers' outputs, and the base model's
   ``last_hidden_state`` (after the final norm) where transformers ties it.
3. **structure** — otherwise: the longest ``ModuleList`` of identical blocks (input of the first,
   outputs of all; no final norm).

Registry-described models are discovered too: the registry does not say how often a layer runs
(looped or shared layers), while the recorded forward does.

Anything else names modules whose output is captured: exact module paths, glob patterns
(``"model.layers.*.mlp"``), or a callable ``(name, module) -> bool``. A name or glob ending in
``:input`` captures the module's input (its first positional argument) instead, as site
``"<module>:input"``. ``"linear_inputs"`` is the input of every ``nn.Linear`` and transformers
``Conv1D`` except the output head, one site per module named by its module path, and the
per-expert inputs of every mixture-of-experts layer (``"<experts>:experts"``, see
:mod:`probe.capture.moe`): what quantization calibration reads (see ``docs/calibration.md``).
``"moe"`` is every router (``"<router>:router"``) and experts module of a mixture-of-experts model;
a name or glob ending in ``:router`` or ``:experts`` picks some of them. ``"attention"`` is every
self-attention module (``"<module>:attention"``: per-head MaxLogit, entropy and sink mass, see
:mod:`probe.capture.attention`); a name or glob ending in ``:attention`` picks some of them.

Reads of transformers' private internals (the recorder registry, the decorator's closure) are each
guarded: if a release lacks them, discovery (public API only) takes over.
"""

from __future__ import annotations

import contextvars
import fnmatch
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..errors import SiteError, closest

__all__ = ["Site", "SiteSet", "SiteSpec", "as_tokens", "discovering", "hidden_state_sites", "linear_input_sites",
           "main_inputs", "resolve"]

INPUT_SUFFIX = ":input"

#: the named site sets ``capture(sites=...)`` accepts besides module names, globs and callables
SiteSet = Literal["hidden_states", "linear_inputs", "moe", "attention"]
#: what ``capture(sites=...)`` accepts: a named set, module names or globs (``:input`` suffix:
#: the module's input), or a predicate ``(name, module) -> bool``
SiteSpec = SiteSet | str | Sequence[str] | Callable[[str, nn.Module], bool]

#: set while probe runs its own discovery forward: active captures ignore that forward
_DISCOVERING: contextvars.ContextVar[bool] = contextvars.ContextVar("probe_discovering", default=False)

#: discovery inputs: batch, encoder tokens, decoder tokens (all different, so axes are told apart)
_B, _T, _T_DEC = 2, 5, 3


#: the site names that stand for a set of modules (``sites="hidden_states"``)
PRESETS = ("hidden_states", "linear_inputs", "moe")


def discovering() -> bool:
    """True while probe's discovery forward runs (hooks of active captures skip it)."""
    return _DISCOVERING.get()


@dataclass(frozen=True)
class Site:
    """One captured tensor: where it is read and how.

    ``read``: ``input`` — an argument of the module's call (pre-hook): positional ``index`` (int)
    or keyword ``index`` (str), ``hidden_states`` as keyword when positional 0 is absent;
    ``output`` — the output itself when a tensor, else its ``index``-th element (int) or its
    ``index`` field (str); ``last_hidden_state`` — the model output's ``last_hidden_state``.
    ``call``: which call of the module within one forward of ``context`` (``None``: every call).
    ``layout``: the permutation that brings the captured tensor to ``[batch, sequence, ...]``.
    ``spatial``: the tensor is a feature map, ``channels_first`` (``[batch, channels, height, width]``,
    as transformers' convolutional models return hidden states) or ``channels_last`` (``[batch,
    height, width, channels]``); its tokens are the spatial positions in row-major order and its
    channels the feature axis (:func:`as_tokens`).
    ``stack``: the tuple it reproduces (``hidden_states``, ``decoder_hidden_states``, ...) and
    ``context``: the module whose call holds that stack's mask (``""``: the model itself).
    ``source``: ``registry``, ``discovery``, ``structure`` or ``module`` (named by the user).
    """

    name: str
    module: str
    read: Literal["input", "output", "last_hidden_state"] = "output"
    index: int | str | None = 0
    hf_index: int | None = None
    call: int | None = None
    layout: tuple[int, ...] | None = None
    stack: str = ""
    context: str = ""
    source: str = "module"
    #: the statistics this site runs instead of the capture's (``None``: the capture's; the
    #: mixture-of-experts sites of :mod:`probe.capture.moe` run ``router`` or ``experts``)
    stats: tuple[str, ...] | None = None
    #: ``(experts, top_k)`` of a mixture-of-experts site, told to its statistics
    moe: tuple[int, ...] | None = None
    #: ``(args, kwargs, output) -> tensor | str``: builds the site's tensor from the module's call
    #: (a ``str`` says why it cannot); never raises. ``None``: read as ``read``/``index`` say
    pack: Callable[[tuple, dict, Any], Any] | None = field(default=None, compare=False, repr=False)
    #: ``(module, args, kwargs) -> None``: a pre-hook that starts following the call before its
    #: output is read (the down projection's input of fused experts, :mod:`probe.capture.moe`);
    #: ``disarm`` ends it after the call, also when the call raises. Neither ever raises
    arm: Callable[[Any, tuple, dict], None] | None = field(default=None, compare=False, repr=False)
    disarm: Callable[[], None] | None = field(default=None, compare=False, repr=False)
    spatial: Literal["channels_first", "channels_last"] | None = None

    def describe(self) -> str:
        """One line: which module call, which element, which stack."""
        where = self.module or "<model>"
        call = "" if self.call is None else f" call {self.call}"
        plain = self.index is None or (self.index == 0 and self.source in ("module", "structure"))
        what = {"input": f"input {self.index!r}", "output": "output" if plain else f"output[{self.index!r}]",
                "last_hidden_state": "output.last_hidden_state"}[self.read]
        spatial = "" if self.spatial is None else f", a {self.spatial.replace('_', '-')} feature map"
        return f"{where}{call} {what} ({self.source}{spatial})"


def resolve(model: nn.Module, sites: SiteSpec = "hidden_states") -> list[Site]:
    """Resolve a site spec against ``model``.

    Only ``"hidden_states"`` runs the model (one discovery forward on a few tokens, see the module
    docstring); nothing is left attached.

    Raises:
        SiteError: unknown or duplicate names, a pattern matching nothing, or a model whose
            hidden states cannot be located (then pass ``sites=`` explicitly).
    """
    modules = dict(model.named_modules())
    if callable(sites) and not isinstance(sites, str):
        picked = [Site(name or "<root>", name) for name, m in modules.items() if sites(name, m)]
        if not picked:
            raise SiteError("sites=<callable> matched no module; expected at least one; "
                            "check the predicate against model.named_modules()")
        return picked
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
        elif spec == "moe":
            found += _moe().moe_sites(model)
        elif spec == "attention":
            found += _attention().attention_sites(model)
        elif spec.endswith(_attention().SUFFIX):
            found += _attention().named_sites(spec, model)
        elif spec.endswith(_moe().SUFFIXES):
            found += _moe().named_sites(spec, model)
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
            raise SiteError(f"unknown site {spec!r}; expected 'hidden_states', 'linear_inputs', 'moe' or a module "
                            f"name{closest(spec, [*PRESETS, *(m for m in modules if m)])}")
    found = _place_in_stacks(model, found)
    seen: set[str] = set()
    unique = []
    for site in found:
        if site.name in seen:
            if site.stats is not None and site in unique:  # an experts site in both "moe" and "linear_inputs"
                continue
            raise SiteError(f"site {site.name!r} is listed twice; expected each site once; "
                            "remove the duplicate from sites=")
        seen.add(site.name)
        unique.append(site)
    return unique


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
    # the layers of experts held as modules see only their own tokens: the experts sites hold them
    held = {id(lin) for layer in _moe().moe_layers(model) for pair in (layer.linears or []) for lin in pair}
    held |= {id(m) for layer in _moe().moe_layers(model) if layer.linears is not None
             for m in dict(model.named_modules())[layer.experts].modules()}
    found = [Site(name, name, "input") for name, module in model.named_modules()
             if name and isinstance(module, kinds) and id(module) not in heads and id(module) not in held]
    found += _moe().expert_sites(model)  # the experts' inputs, split by routing (fused 3-D weights or modules)
    if not found:
        raise SiteError(f"sites='linear_inputs' found no nn.Linear or Conv1D in {type(model).__name__} "
                        "besides the output head; expected at least one; pass module names with ':input'")
    return found


def _attention():
    from . import attention  # attention builds Site values: imported when a site spec needs it

    return attention


def _moe():
    from . import moe  # moe builds Site values: imported when a site spec needs it

    return moe


def _place_in_stacks(model: nn.Module, found: list[Site]) -> list[Site]:
    """A module named by the user inside a decoder reads the decoder's own call (its mask and
    ids), not the model's: an encoder-decoder's stacks are found by discovery."""
    named = [s for s in found if s.source == "module" and s.module]
    if not named or not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return found
    discovered = [s for s in found if s.source == "discovery"] or (discover(model)[0] or [])
    contexts = sorted({s.context for s in discovered if s.context}, key=len, reverse=True)
    if not contexts:
        return found
    placed = []
    for s in found:
        ctx = next((c for c in contexts if s.module == c or s.module.startswith(c + ".")), None)
        if s.source == "module" and ctx is not None:
            s = replace(s, context=ctx)
        placed.append(s)
    return placed


# ----------------------------------------------------------------------------- registry
def _tie_default(module: nn.Module) -> bool | None:
    """The ``tie_last_hidden_states`` of a ``@capture_outputs`` forward, or None if not decorated."""
    fn: Any = type(module).forward  # then each wrapper's __wrapped__, until None
    while fn is not None:
        code = getattr(fn, "__code__", None)
        if code is not None and "tie_last_hidden_states" in code.co_freevars:
            closure = fn.__closure__
            if closure is None:
                return None
            try:
                cell = closure[code.co_freevars.index("tie_last_hidden_states")]
                return bool(cell.cell_contents)
            except (TypeError, IndexError, ValueError):  # closure layout of another release
                return None
        fn = getattr(fn, "__wrapped__", None)
    return None


def _recorders(base: nn.Module) -> list:
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY, OutputRecorder
    except ImportError:  # a transformers release without the recorder registry
        return []
    # private API whose signatures vary across releases (any module is looked up; any failure: no registry)
    registry: Any = _CAN_RECORD_REGISTRY
    recorder: Any = OutputRecorder
    try:
        flags = registry.get(base) or getattr(base, "_can_record_outputs", None) or {}
        specs = flags.get("hidden_states")
    except (AttributeError, TypeError):
        return []
    if specs is None:
        return []
    specs = specs if isinstance(specs, list) else [specs]
    out = []
    for spec in specs:
        if not isinstance(spec, OutputRecorder):
            try:
                spec = recorder(target_class=None if isinstance(spec, str) else spec, index=0,
                                class_name=spec if isinstance(spec, str) else None)
            except TypeError:
                return []
        if not all(hasattr(spec, f) for f in ("target_class", "index", "layer_name", "class_name")):
            return []
        out.append(spec)
    return out


def _matches(spec, name: str, module: nn.Module) -> bool:
    hit = (spec.target_class is not None and isinstance(module, spec.target_class)) or (
        spec.class_name is not None and name.endswith(spec.class_name))
    if hit and spec.layer_name is not None:
        hit = "." + spec.layer_name.strip(".") + "." in "." + name + "."
    return hit


def _registry_sites(model: nn.Module) -> list[Site] | None:
    """Sites from transformers' recorder registry when the model is one decorated stack, else None."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return None
    bases = [(n, m) for n, m in model.named_modules() if _tie_default(m) is not None and _recorders(m)]
    outer = [(n, m) for n, m in bases if not any(n != o and (o == "" or n.startswith(o + ".")) for o, _ in bases)]
    if len(outer) != 1:
        return None  # several stacks (vision + text, encoder + decoder): discovery names them
    base_name, base = outer[0]
    recorders = _recorders(base)
    prefix = base_name + "." if base_name else ""
    nested = [n for n, m in base.named_modules() if n and _tie_default(m) is not None]
    layers = []
    for name, module in base.named_modules():
        if any(name == n or name.startswith(n + ".") for n in nested):
            continue
        for spec in recorders:
            if _matches(spec, name, module):
                layers.append((prefix + name, spec))
                break
    if not layers:
        return None
    key = getattr(layers[0][1], "num_hidden_layers_key", "num_hidden_layers")
    depth = getattr(getattr(base, "config", None), key if isinstance(key, str) else "num_hidden_layers", None)
    if not isinstance(depth, int) or depth != len(layers):
        return None  # a layer module runs more than once (shared layers) or the count is unknown
    tie = _tie_default(base)
    config_tie = getattr(getattr(base, "config", None), "tie_last_hidden_states", None)
    tie = tie if config_tie is None else bool(config_tie)
    initial = getattr(layers[0][1], "capture_initial_hidden_state", True)
    return _layer_sites(layers, base_name, tie, initial, "registry")


def _layer_sites(layers: list, base_name: str | None, tie: bool | None, initial: bool, source: str) -> list[Site]:
    sites = []
    offset = 1 if initial else 0
    if initial:
        sites.append(Site("hidden_states.0", layers[0][0], "input", 0, 0, stack="hidden_states", source=source))
    for i, (name, spec) in enumerate(layers):
        index = offset + i
        sites.append(Site(f"hidden_states.{index}", name, "output", spec.index if spec is not None else 0,
                          index, stack="hidden_states", source=source))
    if tie and base_name is not None:
        last = sites[-1]
        sites[-1] = Site(last.name, base_name, "last_hidden_state", 0, last.hf_index, stack="hidden_states",
                         source=source)
    return sites


def _structural_layers(model: nn.Module) -> list[str]:
    best: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            kinds = {type(m) for m in module}
            if len(kinds) == 1:
                best = [f"{name}.{i}" if name else str(i) for i in range(len(module))]
    return best


def _anchor(model: nn.Module, sites: list[Site]) -> list[Site]:
    """Single-stack sites read their tokens from the call of the innermost transformers model around
    all of them that takes ``attention_mask`` (the base model inside a task head; inner modules may
    get an expanded 4-D mask): called on its own, that backbone is then one forward with its own
    mask."""
    if not sites or any(s.context or s.source == "discovery" for s in sites):
        return sites  # discovery placed its sites from the calls it saw
    modules = dict(model.named_modules())
    parts = [s.module.split(".") if s.module else [] for s in sites]
    common: list[str] = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    params: Mapping[str, inspect.Parameter]
    while common:
        path = ".".join(common)
        try:
            params = inspect.signature(modules[path].forward).parameters
        except (KeyError, TypeError, ValueError):
            params = {}
        if "attention_mask" in params and _is_base(modules[path]):
            break
        common.pop()
    if not common:
        return sites
    path = ".".join(common)
    return [replace(s, context=path) for s in sites]


def hidden_state_sites(model: nn.Module) -> list[Site]:
    """The sites that reproduce ``output_hidden_states=True`` for ``model`` (see the module docstring).

    Raises:
        SiteError: discovery ran but a returned hidden state comes from no module call, or the
            model has neither token-id inputs nor a ``ModuleList`` of blocks.
    """
    return _anchor(model, _hidden_state_sites(model))


def _hidden_state_sites(model: nn.Module) -> list[Site]:
    found, why = discover(model)
    if found:
        return found
    if why is not None and why.startswith("!"):  # discovery ran and established that it cannot be exact
        raise SiteError(why[1:])
    found = _registry_sites(model)  # a model that cannot run on token ids alone
    if found:
        return found
    layers = _structural_layers(model)
    if not layers:
        raise SiteError(f"cannot locate the hidden states of {type(model).__name__}: no "
                        f"_can_record_outputs registry, no discovery forward ({why}) and no ModuleList "
                        "of blocks; pass sites= with module names or globs")
    return _layer_sites([(n, None) for n in layers], None, False, True, "structure")


# ---------------------------------------------------------------------------- discovery
@dataclass
class _Record:
    seq: int          # order of the hook event within the discovery forward
    module: str
    call: int         # which call of the module (0-based) in the whole forward
    start: int        # seq interval of that call
    read: Literal["input", "output"]
    index: int | str | None
    tensor: Tensor
    version: int


def as_tokens(x: Tensor, layout: tuple[int, ...] | None, spatial: str | None) -> Tensor:
    """``x`` as ``[batch, sequence, ...]``: permuted by ``layout``, or a feature map's spatial
    positions flattened row-major into the sequence axis with its channels last (a view where the
    memory allows)."""
    if spatial == "channels_first":
        return x.flatten(2).transpose(1, 2)
    if spatial == "channels_last":
        return x.flatten(1, -2)
    return x if layout is None else x.permute(layout)


def _feature_map(h: Tensor, layout: tuple[int, ...] | None,
                 lengths: set[int]) -> Literal["channels_first", "channels_last"] | None:
    """How a returned hidden state of four or more axes holds its channels: after the batch when the
    axes after it are the square spatial grid the discovery image makes (``[batch, C, H, W]``, as
    transformers' convolutional models return them, and the reading when all are equal), last when
    the axes before it are (``[batch, H, W, C]``). ``None`` for a token stack's ``[batch, tokens,
    ...]`` (its second axis one of the discovery call's token lengths ``lengths``)."""
    if h.dim() < 4 or layout is not None or h.shape[1] in lengths:
        return None
    if h.dim() == 4 and h.shape[1] == h.shape[2] != h.shape[3]:
        return "channels_last"
    return "channels_first"


def _tensors_of(obj: Any, read: str) -> list[tuple[int | str | None, Tensor]]:
    if isinstance(obj, Tensor):
        return [(None, obj)]
    if isinstance(obj, (tuple, list)):
        return [(i, t) for i, t in enumerate(obj) if isinstance(t, Tensor)]
    if hasattr(obj, "items"):
        try:
            return [(k, t) for k, t in obj.items() if isinstance(t, Tensor)]
        except Exception:
            return []
    return []


def _version(t: Tensor) -> int:
    return -1 if t.is_inference() else t._version


def _holding(config: Any, *keys: str) -> Any:
    """``config`` or the first of its nested sub-configs (breadth first) with every one of ``keys`` set."""
    queue, seen = [config], set()
    while queue:
        c = queue.pop(0)
        if id(c) in seen or c is None:
            continue
        seen.add(id(c))
        if all(getattr(c, k, None) is not None for k in keys):
            return c
        queue += [v for v in getattr(c, "__dict__", {}).values() if hasattr(v, "to_dict") and hasattr(v, "model_type")]
    return None


def _text_config(config: Any) -> Any:
    """The config that holds the text model's settings (transformers' ``get_text_config``), else the
    first (sub-)config with a ``vocab_size``."""
    try:
        text = config.get_text_config()
    except Exception:
        text = None
    return text if getattr(text, "vocab_size", None) is not None else _holding(config, "vocab_size")


def _image_size(value: Any) -> tuple[int, int]:
    if isinstance(value, Mapping):
        value = (value.get("height") or value.get("shortest_edge"), value.get("width") or value.get("shortest_edge"))
    if isinstance(value, (list, tuple)):
        return int(value[-2]), int(value[-1])
    return int(value), int(value)


#: ``input_values`` discovery clips: samples per clip
_SAMPLES = 6400


def main_inputs(model: nn.Module, batch: int = _B, main: str | None = None) -> list[dict[str, Tensor]]:
    """Ways to feed ``model``'s main input from its config alone, most likely first.

    The main input is transformers' ``main_input_name`` (``main`` overrides it), else the first of
    ``input_ids``, ``pixel_values``, ``input_values``, ``input_features`` the forward takes:

    - ``pixel_values``: ``[batch, channels, height, width]`` at the config's ``image_size``; a video
      (``pixel_values_videos``, or a config with ``num_frames``) ``[batch, frames, channels, height,
      width]`` or ``[batch, channels, frames, height, width]``;
    - ``input_values``: ``[batch, 6400]`` samples, or ``[batch, 1, 6400]``, or a spectrogram
      ``[batch, max_length, num_mel_bins]`` where the config has both (AST);
    - ``input_features``: ``[batch, mel bins, frames]`` or ``[batch, frames, mel bins]``, with
      ``2 * max_source_positions`` frames where the config fixes them (Whisper), else 64 (or
      ``2 * n_window`` where that does not divide them: chunked encoders, Qwen3-ASR); the bins
      are the config's ``feature_projection_input_dim`` (stacked frames, W2V-BERT) where it has one;
      an ``input_features_mask`` the forward requires is all ones;
    - a vision tower fed flattened patches with their grid (``grid_thw``, Qwen-VL-like): ``batch``
      images of 4 x 4 patches, ``[16 * batch, channels * temporal_patch_size * patch_size²]``.

    Empty for token ids (:func:`_discovery_inputs` builds those) and any other main input. Values
    are deterministic, standard normal, on the parameters' device and dtype.
    """
    config = getattr(model, "config", None)
    main = main or getattr(model, "main_input_name", None)
    main = main[0] if isinstance(main, (list, tuple)) and main else main
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    if main not in params:  # a main input the forward does not take: the first of the known ones it does
        main = next((n for n in ("input_ids", "pixel_values", "input_values", "input_features") if n in params), main)
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    grid = next((n for n in ("grid_thw", "image_grid_thw") if n in params), None)
    first = next(iter(params), None)
    if grid is not None and first in ("hidden_states", "pixel_values") and "input_ids" not in params:
        main = "patches"
    if config is None or param is None or main not in ("pixel_values", "pixel_values_videos", "input_values",
                                                        "input_features", "patches"):
        return []
    g = torch.Generator().manual_seed(0)

    def values(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g).to(param.device, param.dtype)

    try:
        if main == "patches":  # a vision tower fed flattened patches and their (t, h, w) grid
            vision = _holding(config, "patch_size") or config
            size = int(getattr(vision, "patch_size", 14))
            frames = int(getattr(vision, "temporal_patch_size", None) or 1)
            channels = int(getattr(vision, "in_channels", None) or getattr(vision, "num_channels", None) or 3)
            thw = torch.tensor([[1, 4, 4]] * batch, device=param.device)
            return [{str(first): values(16 * batch, channels * frames * size * size), str(grid): thw}]
        if main in ("pixel_values", "pixel_values_videos"):
            vision = _holding(config, "image_size") or config
            h, w = _image_size(getattr(vision, "image_size", 224))
            channels = int(getattr(vision, "num_channels", 3) or 3)
            t = getattr(_holding(config, "num_frames"), "num_frames", None)
            if main == "pixel_values" and not isinstance(t, int):
                return [{main: values(batch, channels, h, w)}]
            t = t if isinstance(t, int) else 8
            return [{main: values(batch, t, channels, h, w)}, {main: values(batch, channels, t, h, w)}]
        if main == "input_values":  # mono clips, or with their channel axis (audio codecs)
            calls = [{"input_values": values(batch, _SAMPLES)}, {"input_values": values(batch, 1, _SAMPLES)}]
            spectrogram = _holding(config, "num_mel_bins", "max_length")  # a spectrogram (AST)
            if spectrogram is not None:
                calls.append({"input_values": values(batch, int(spectrogram.max_length),
                                                     int(spectrogram.num_mel_bins))})
            return calls
        audio = (_holding(config, "feature_projection_input_dim") or _holding(config, "num_mel_bins")
                 or _holding(config, "feature_size") or config)
        bins = int(getattr(audio, "feature_projection_input_dim", None) or getattr(audio, "num_mel_bins", None)
                   or getattr(audio, "feature_size", None) or 80)
        sources = getattr(_holding(config, "max_source_positions"), "max_source_positions", None)
        frames = 2 * sources if isinstance(sources, int) and sources <= 2000 else 64
        window = getattr(_holding(config, "n_window"), "n_window", None)  # chunked encoders (Qwen3-ASR)
        frames = 2 * window if isinstance(window, int) and 0 < window <= 1000 and frames % (2 * window) else frames
        calls = [{"input_features": values(batch, bins, frames)}, {"input_features": values(batch, frames, bins)}]
        required = params.get("input_features_mask")
        if required is not None and required.default is required.empty:  # every frame real
            ones = torch.ones(batch, frames, dtype=torch.long, device=param.device)
            calls = [{**c, "input_features_mask": ones} for c in calls]
        return calls
    except (TypeError, ValueError):
        return []


def _with_image_tokens(model: nn.Module, text: dict[str, Tensor], image: dict[str, Tensor]) -> Callable[[], dict]:
    """A builder of a vision-language call (LLaVA-like): ``text``'s token ids with one image's
    placeholder tokens (``config.image_token_id``) after the first, as many as the model's
    ``get_image_features`` makes of ``image``, and the image itself."""

    def build() -> dict[str, Tensor]:
        config = getattr(model, "config", None)
        token = getattr(config, "image_token_id", None)
        token = getattr(config, "image_token_index", None) if token is None else token
        if not isinstance(token, int):
            raise ValueError("the config names no image_token_id")
        features: Any = model.get_image_features(**image)  # type: ignore[operator]
        features = getattr(features, "pooler_output", features)
        batch = text["input_ids"].shape[0]
        if isinstance(features, Tensor):
            features = list(features) if features.dim() == 3 else list(features.chunk(batch))
        if not (isinstance(features, (list, tuple)) and len(features) == batch and isinstance(features[0], Tensor)):
            raise ValueError("get_image_features returned no features per image")
        n = features[0].reshape(-1, features[0].shape[-1]).shape[0]
        out = {**text, **image}
        for key, fill in (("input_ids", token), ("attention_mask", 1)):  # a mask, where given, grows with them
            if isinstance(text.get(key), Tensor):
                t = text[key]
                out[key] = torch.cat([t[:, :1], torch.full((t.shape[0], n), fill, dtype=t.dtype, device=t.device),
                                      t[:, 1:]], 1)
        return out

    return build


def _discovery_inputs(model: nn.Module) -> tuple[list[dict[str, Any] | Callable[[], dict[str, Any]]] | None, str]:
    """The calls discovery tries, in order (the first that runs is recorded), or ``(None, why not)``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None, "forward has no signature"
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if "output_hidden_states" not in params and not var_kw:
        return None, "forward takes no output_hidden_states"
    device = next((p.device for p in model.parameters()), None)
    if device is None or device.type == "meta":
        return None, "parameters are on the meta device"
    config = getattr(model, "config", None)
    vocab = getattr(_text_config(config), "vocab_size", None)
    if not isinstance(vocab, int):
        try:
            embeddings: Any = model.get_input_embeddings  # a transformers model's method
            vocab = embeddings().num_embeddings
        except Exception:
            vocab = None
    low = min(3, max(0, (vocab or 1) - 1))

    def ids(t: int) -> Tensor:
        return (low + (torch.arange(_B * t) * 7) % max(1, (vocab or 1) - low)).view(_B, t).to(device)

    calls: list[dict[str, Any] | Callable[[], dict[str, Any]]] = [*main_inputs(model)]
    if calls:
        if "input_ids" in params and vocab is not None:  # an image model that needs its text too (BLIP-2-like)
            calls += [{**c, "input_ids": ids(_T)} for c in calls if isinstance(c, dict)]
    else:
        if "input_ids" not in params:
            return None, "forward takes no input_ids"
        if vocab is None:
            return None, "no vocab_size"
        text = {"input_ids": ids(_T)}
        images = main_inputs(model, main="pixel_values") if "pixel_values" in params else []
        calls = [text]
        if images:  # a vision-language model: its text with an image's tokens, then text alone; CLIP-like: both
            calls = [_with_image_tokens(model, text, images[0]), text, *({**text, **c} for c in images)]
    common: dict[str, Any] = {"output_hidden_states": True}
    for name, p in params.items():  # other token ids the forward requires (InstructBLIP's qformer_input_ids)
        if (name.endswith("input_ids") and name not in ("input_ids", "decoder_input_ids")
                and p.default is p.empty and vocab is not None):
            common[name] = ids(_T)
    if "return_dict" in params or var_kw:
        common["return_dict"] = True
    if "use_cache" in params:
        common["use_cache"] = False
    if "decoder_input_ids" in params and vocab is not None:
        common["decoder_input_ids"] = ids(_T_DEC)
    return [_with(c, common) if callable(c) else {**c, **common} for c in calls], ""


def _with(build: Callable[[], dict[str, Any]], common: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    return lambda: {**build(), **common}


def _buffers_to_restore(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    # train-mode forwards update normalisation running statistics: put them back afterwards
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training:
            saved += [(b, b.detach().clone()) for b in m.buffers(recurse=False)]
    return saved


#: the attribute transformers sets once it has installed its own output-capturing hooks
_INSTALLED = "_output_capturing_hooks_installed"
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks")


def _hook_ids(model: nn.Module) -> dict[int, tuple[set, ...]]:
    return {id(m): tuple(set(getattr(m, d, {})) for d in _HOOK_DICTS) for m in model.modules()}


def _undo_lazy_hooks(model: nn.Module, before: dict, flags: dict) -> None:
    """transformers installs its recording hooks the first time hidden states are asked for; undo
    that for the discovery forward, so the model is left as it was — but only where the flag that
    makes transformers install them again can be restored too (else they stay: harmless)."""
    flipped = [m for m in model.modules() if flags.get(id(m)) is not True and getattr(m, _INSTALLED, None) is True]
    if not flipped:
        return
    for m in model.modules():
        for d, old in zip(_HOOK_DICTS, before.get(id(m), (set(), set()))):
            hooks = getattr(m, d, None)
            if hooks is None:
                continue
            for key in [k for k in hooks if k not in old]:
                del hooks[key]
                for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                              "_forward_pre_hooks_with_kwargs"):
                    getattr(m, extra, {}).pop(key, None)
    for m in flipped:
        if flags.get(id(m)) is None:
            try:
                delattr(m, _INSTALLED)
            except AttributeError:
                setattr(m, _INSTALLED, False)
        else:
            setattr(m, _INSTALLED, flags[id(m)])


def _run_recorded(model: nn.Module, call: dict[str, Any] | Callable[[], dict[str, Any]]):
    """Run ``model(**call)`` with every module call recorded, leaving the model as it was (RNG state,
    buffers, hooks). ``call`` may be a function building it, run under the same restoration before
    the recording starts. Returns ``(output, records, intervals, call)``."""
    records: list[_Record] = []
    calls: dict[int, int] = {}
    intervals: list[list] = []  # [module, call, start, end]
    open_calls: dict[int, list] = {}
    counter = [0]
    names = {id(m): n for n, m in model.named_modules()}
    handles = []

    def pre(module, args, kwargs):
        name = names.get(id(module))
        k = calls.get(id(module), 0)
        calls[id(module)] = k + 1
        counter[0] += 1
        span = [name, k, counter[0], None]
        intervals.append(span)
        open_calls.setdefault(id(module), []).append(span)
        if name:
            for i, t in _tensors_of(tuple(args), "input") + _tensors_of(kwargs, "input"):
                counter[0] += 1
                records.append(_Record(counter[0], name, k, span[2], "input", i, t, _version(t)))

    def post(module, args, kwargs, output):
        stack = open_calls.get(id(module))
        span = stack.pop() if stack else [names.get(id(module)), 0, counter[0], None]
        counter[0] += 1
        span[3] = counter[0]
        name = names.get(id(module))
        if name:
            for i, t in _tensors_of(output, "output"):
                counter[0] += 1
                records.append(_Record(counter[0], name, span[1], span[2], "output", i, t, _version(t)))

    saved = _buffers_to_restore(model)
    before = _hook_ids(model)
    flags = {id(m): getattr(m, _INSTALLED, None) for m in model.modules()}
    token = _DISCOVERING.set(True)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            if callable(call):
                call = call()
            for m in model.modules():
                handles.append(m.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
                handles.append(m.register_forward_hook(post, with_kwargs=True, always_call=True))
            out = model(**call)
    finally:
        for h in reversed(handles):
            h.remove()
        _DISCOVERING.reset(token)
        _undo_lazy_hooks(model, before, flags)
        with torch.no_grad():
            for buf, old in saved:
                buf.copy_(old)
    return out, records, intervals, call


def _perms(dim: int) -> list[tuple[int, ...]]:
    base = tuple(range(dim))
    out = [base]
    if dim >= 3:
        out += [(1, 0, *base[2:]), (0, *base[2:], 1)]  # sequence-first; channels-before-tokens
    elif dim == 2:
        out += [(1, 0)]
    return out


class _Candidates:
    """The records of one discovery forward indexed by ``(dtype, shape in each axis order of
    :func:`_perms`)``, so that matching a hidden state compares values only with tensors of its
    dtype and shape. Records whose tensor was modified in place after it was recorded, and nested
    tensors, hold no value to compare and are left out."""

    def __init__(self, records: list[_Record]) -> None:
        self.by_shape: dict[tuple, list[tuple[_Record, tuple[int, ...]]]] = {}
        self.by_id: dict[int, list[_Record]] = {}
        for r in records:
            t = r.tensor
            if t.is_nested or _version(t) != r.version:
                continue
            self.by_id.setdefault(id(t), []).append(r)
            for p in _perms(t.dim()):
                self.by_shape.setdefault((t.dtype, tuple(t.shape[i] for i in p)), []).append((r, p))
        self._corners: dict[int, tuple] = {}

    def corners(self, t: Tensor) -> tuple:
        """The first and last elements: the same in every axis order (a cheap test before equal)."""
        hit = self._corners.get(id(t))
        if hit is None or hit[0] is not t:
            flat = t.detach()
            hit = self._corners[id(t)] = (t, flat[(0,) * t.dim()].item() if t.numel() else None,
                                          flat[(-1,) * t.dim()].item() if t.numel() else None)
        return hit[1:]


def _match(target: Tensor, index: _Candidates) -> tuple[_Record, tuple[int, ...] | None] | None:
    """The record holding ``target``: the same object first, then equal values in some axis order;
    ties go to outputs over inputs, then the shallowest module, then the latest event."""
    best, best_key, best_layout = None, None, None
    corner: tuple | None = None
    seen: set[int] = set()  # records matched: their first equal axis order stands
    for r in index.by_id.get(id(target), []):
        if r.tensor is target:
            seen.add(r.seq)
            key = (True, r.read == "output", -r.module.count("."), r.seq)
            if best_key is None or key > best_key:
                best, best_key, best_layout = r, key, None
    for r, p in index.by_shape.get((target.dtype, tuple(target.shape)), []):
        t = r.tensor
        if r.seq in seen or type(t) is not type(target):  # a DTensor compares only with DTensors
            continue
        key = (False, r.read == "output", -r.module.count("."), r.seq)
        if best_key is not None and key < best_key:
            continue  # cannot win: skip the comparison
        if type(t) is Tensor:  # a plain tensor: its corners first (a DTensor's would communicate)
            corner = index.corners(target) if corner is None else corner
            if index.corners(t) != corner:
                continue
        if not torch.equal(t.permute(p), target):
            continue
        seen.add(r.seq)
        best, best_key, best_layout = r, key, None if p == tuple(range(t.dim())) else p
    return None if best is None else (best, best_layout)


def _first_layer_input(tensors: tuple, hits: list, records: list[_Record]) -> _Record | None:
    """``hidden_states[0]`` read where transformers defines it, as the input of the first layer (the
    call that produces ``hidden_states[1]``), rather than at the module that made it: the
    embedding does not run when the model is called with ``inputs_embeds``. ``None`` when that call
    does not receive the very tensor (then the call found by :func:`_match` stays). Another module
    receiving it too (a rotary embedding called on it) is not where transformers reads it."""
    if len(hits) < 2 or hits[0][2] is not None or hits[1][2] is not None:
        return None
    target, layer = tensors[0], hits[1][1]
    if hits[0][1].read == "input" and (hits[0][1].module, hits[0][1].call) == (layer.module, layer.call):
        return None  # read there already
    for r in records:
        if (r.read == "input" and r.module == layer.module and r.call == layer.call
                and r.index in (0, "hidden_states") and _version(r.tensor) == r.version
                and (r.tensor is target or (r.tensor.shape == target.shape and r.tensor.dtype == target.dtype
                                            and not r.tensor.is_nested and torch.equal(r.tensor, target)))):
            return r
    return None


#: returned tuples that repeat another one's values in another shape (Swin-like models' feature maps)
_DERIVED = ("reshaped_hidden_states",)


def _stack_tuples(out: Any, prefix: str = "") -> list[tuple[str, tuple]]:
    """``(name, tensors)`` of every hidden-state tuple ``out`` returns; a tower's own output inside
    it (CLIP-like ``text_model_output``/``vision_model_output``) names its tuples after the tower:
    ``text_hidden_states``, ``vision_hidden_states``."""
    items = out.items() if hasattr(out, "items") else []
    found = []
    for k, v in items:
        if not isinstance(k, str) or k in _DERIVED:
            continue
        if (k.endswith("hidden_states") and isinstance(v, (tuple, list)) and v
                and all(isinstance(t, Tensor) for t in v)):
            found.append((prefix + k, tuple(v)))
        elif not prefix and hasattr(v, "items") and hasattr(v, "to_tuple"):  # a nested ModelOutput
            tower = k.removesuffix("_outputs").removesuffix("_output").removesuffix("_model")
            found += _stack_tuples(v, tower + "_")
    return found


def discover(model: nn.Module) -> tuple[list[Site] | None, str | None]:
    """Sites from one recorded forward (see the module docstring).

    Returns:
        ``(sites, None)``; ``(None, reason)`` when the model cannot be run on the inputs discovery builds;
        ``(None, "!" + message)`` when it ran but a hidden state is produced by no module call.
    """
    calls, why = _discovery_inputs(model)
    if calls is None:
        return None, why
    for call in calls:
        try:
            out, records, intervals, call = _run_recorded(model, call)
            break
        except Exception as err:  # the model wants other inputs (pixels, boxes, ...)
            what = "token ids and image" if callable(call) else next(iter(call))
            failed = f"a forward on its {what} failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
    else:
        return None, failed
    stacks = _stack_tuples(out)
    if not stacks:
        return None, "the model returned no hidden_states"
    chosen: dict[str, list[tuple[int, _Record, tuple[int, ...] | None]]] = {}
    index = _Candidates(records)
    for key, tensors in stacks:
        for i, h in enumerate(tensors):
            hit = _match(h, index)
            if hit is None:
                return None, (f"!cannot capture {key}[{i}] of {type(model).__name__}: no module call produces "
                              f"or receives that tensor (shape {tuple(h.shape)}); pass sites= with module names")
            chosen.setdefault(key, []).append((i, hit[0], hit[1]))
        first = _first_layer_input(tensors, chosen[key], records)
        if first is not None:
            chosen[key][0] = (0, first, None)
    # stacks in the order they run (encoder before decoder), whatever the output's field order
    chosen = dict(sorted(chosen.items(), key=lambda kv: min(r.seq for _, r, _ in kv[1])))
    ends = {(s[0], s[1]): s for s in intervals}
    lengths = {v.shape[1] for k, v in call.items() if k.endswith("input_ids") and isinstance(v, Tensor)}
    sites: list[Site] = []
    for key, hits in chosen.items():
        if len(chosen) > 1 or key != "hidden_states":  # several stacks, or one tower's: its own call
            context = _context(key, hits, chosen, intervals, ends)
        else:
            context = _base_call(model, hits, intervals, ends)
        ctx_name, ctx_start, ctx_end = context if context else ("", None, None)
        tensors = dict(stacks)[key]
        for i, r, layout in hits:
            call_index = r.call
            if ctx_start is not None:  # which call of the module within the context's call
                end = ends[(r.module, r.call)][2]
                call_index = sum(s[0] == r.module and ctx_start <= s[2] < end for s in intervals)
            sites.append(Site(f"{key}.{i}", r.module, r.read, r.index, i, call_index, layout, key, ctx_name,
                              "discovery", spatial=_feature_map(tensors[i], layout, lengths)))
    return sites, None


def _is_base(module: nn.Module) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return "attention_mask" in params and any(c.__name__ == "PreTrainedModel" for c in type(module).__mro__)


def _base_call(model: nn.Module, hits, intervals, ends):
    """The innermost call of a transformers model (not the root) containing every chosen record of a
    single stack (the base model inside a task head), or None: then the root's call holds them."""
    modules = dict(model.named_modules())
    own = [ends[(r.module, r.call)] for _, r, _ in hits]
    lo, hi = min(s[2] for s in own), max(s[3] or s[2] for s in own)
    best = None
    for s in intervals:
        if s[0] and s[3] is not None and s[2] <= lo and s[3] >= hi and _is_base(modules[s[0]]):
            if best is None or s[2] > best[2]:
                best = s
    return None if best is None else (best[0], best[2], best[3])


def _context(key, hits, chosen, intervals, ends):
    """The outermost module call containing every chosen record of ``key`` and none of another key."""
    own = [ends[(r.module, r.call)] for _, r, _ in hits]
    lo, hi = min(s[2] for s in own), max(s[3] or s[2] for s in own)
    others = [ends[(r.module, r.call)][2] for k, hs in chosen.items() if k != key for _, r, _ in hs]
    best = None
    for s in intervals:
        if s[0] is None or s[3] is None or not s[0]:
            continue
        if s[2] <= lo and s[3] >= hi and not any(s[2] <= o <= s[3] for o in others):
            if best is None or (s[2], -s[3]) < (best[2], -best[3]):
                best = s
    if best is None:
        return None
    return best[0], best[2], best[3]
