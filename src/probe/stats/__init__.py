"""Mergeable streaming statistics, one per module, all following :class:`~probe.stats._base.Stat`,
and the registry that names them.

Each statistic declares its state once (a :class:`~probe.stats._state.State` of fields: dtype,
shape, fill, reduction); its empty state, storage, file merge and rank merge derive from it. The
built-in statistics need torch and are imported on first use, so the read side (which imports
``probe.stats._state`` and ``probe.stats._buckets``) never pays for importing torch.

Adding a statistic is one class and one call::

    from probe.stats import register
    from probe.stats._base import StatBase
    from probe.stats._state import Field, State

    class SumSq(StatBase):
        name = "sumsq"
        spec = State("sumsq", (Field("s2", "float64", ("D",), "sum", 0.0, "units^2"),))

        def dims(self, x):
            return {"D": x.shape[-1]}

        @classmethod
        def update_group(cls, stats, x, tokens):
            ...

    register(SumSq)  # now capture(stats=(..., "sumsq")) runs it, files store it, merges merge it
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from ._state import SPECS

if TYPE_CHECKING:  # the classes import torch; the registry itself must not
    from ._base import StatBase

#: the built-in statistics, in the order they run: name -> (module, class); ``cos`` (below) is a
#: switch of ``cross``, not a class. A built-in is its module, its ``State`` in
#: :data:`probe.stats._state.SPECS` (the read side needs it without torch) and one line here.
_BUILTIN: dict[str, tuple[str, str]] = {
    "moments": (".moments", "Moments"),
    "position": (".position", "Position"),
    "histogram": (".histogram", "Histogram"),
    "sample": (".sample", "Sample"),
    "cross": (".cross", "Cross"),
    "topk": (".topk", "TopK"),
    "norm": (".norm", "Norm"),
    "router": (".router", "Router"),
    "experts": (".experts", "Experts"),
    "attention": (".attention", "Attention"),
}
#: the statistics that run only at the sites that name them (mixture-of-experts routers and
#: experts, :mod:`probe.capture.moe`; attention modules, :mod:`probe.capture.attention`), never at
#: the others and not by default
SITE_ONLY: tuple[str, ...] = ("router", "experts", "attention")
#: statistic names accepted by ``capture(stats=...)``, in the order they run (registered ones last)
NAMES: tuple[str, ...] = (*_BUILTIN, "cos")
#: what ``capture(stats=None)`` runs: all but ``cos`` (the per-token cosines inside ``cross``,
#: which about double its cost; see benchmarks/research.py)
DEFAULT: tuple[str, ...] = tuple(n for n in _BUILTIN if n not in SITE_ONLY)

#: named sets of statistics accepted by ``capture(stats=<name>)``: ``"calibration"`` is what the
#: exports (``probe.export``: llama.cpp imatrix, SmoothQuant scales, per-channel amax) read, the
#: per-channel moments (count, mean and M2, i.e. the sums of squares; min and max, i.e. the
#: maxima of ``|x|``) and nothing else
PRESETS: dict[str, tuple[str, ...]] = {"calibration": ("moments",)}

_LAZY = {"Tokens": "._base", **{cls: module for module, cls in _BUILTIN.values()}}
#: registered statistics, by name
_REGISTERED: dict[str, type[StatBase]] = {}

__all__ = ["NAMES", "DEFAULT", "PRESETS", "SITE_ONLY", "site_states", "register", "unregister", "stat_class", "Attention", "Cross",
           "Histogram", "Experts", "Moments", "Norm", "Position", "Router", "Sample", "Tokens", "TopK"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register(cls: type[StatBase], *, default: bool = False) -> type[StatBase]:
    """Make statistic ``cls`` known to the capture, the store and the merges.

    ``cls`` follows :class:`~probe.stats._base.Stat` (subclass
    :class:`~probe.stats._base.StatBase`) with a unique ``name`` and its declared ``spec``. After
    this, ``capture(stats=(..., cls.name))`` runs it at every site, its state is stored, loaded
    and merged (files and ranks) through the declared reductions. Usable as a class decorator.

    Args:
        cls: the statistic class.
        default: also run it when ``capture(stats=None)``.

    Returns:
        ``cls``.

    Raises:
        ProbeError: the name is taken, or ``cls.spec`` is not a ``State`` of that name.
    """
    global NAMES, DEFAULT
    from ..errors import ProbeError
    from ._state import State

    name = getattr(cls, "name", "")
    spec = getattr(cls, "spec", None)
    if not name or name in NAMES:
        raise ProbeError(f"statistic name {name!r} is empty or taken; expected a new name (taken: "
                         f"{list(NAMES)}); set a unique class attribute `name`")
    if not isinstance(spec, State) or spec.name != name:
        raise ProbeError(f"{cls.__name__}.spec must be a State named {name!r}; got {spec!r}; "
                         f"declare spec = State({name!r}, (Field(...), ...))")
    SPECS[name] = spec
    _REGISTERED[name] = cls
    NAMES = (*NAMES, name)
    if default:
        DEFAULT = (*DEFAULT, name)
    return cls


def unregister(name: str) -> None:
    """Forget a statistic added by :func:`register` (built-in ones stay)."""
    global NAMES, DEFAULT
    if _REGISTERED.pop(name, None) is not None:
        SPECS.pop(name, None)
        NAMES = tuple(n for n in NAMES if n != name)
        DEFAULT = tuple(n for n in DEFAULT if n != name)


def stat_class(name: str) -> type[StatBase] | None:
    """The class of statistic ``name`` (``None`` for ``cos``, a switch of ``cross``)."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in _BUILTIN:
        return __getattr__(_BUILTIN[name][1])
    return None


def site_states(names, *, histogram_bits: int, max_positions: int, sample_size: int,
                compile: bool | None = None) -> dict[str, Any]:
    """Fresh per-site statistics for one window: one instance of each statistic in ``names`` that
    is kept per site (all but ``cross`` and ``cos``, which span sites), in :data:`NAMES` order.

    Args:
        names: statistic names (a subset of :data:`NAMES`).
        histogram_bits: mantissa bits of the float-bit buckets (histogram, norm).
        max_positions: positions covered by the per-position statistics (position, norm).
        sample_size: ``k`` of the uniform sample.
        compile: passed to each statistic (``None``: compile on accelerators only).

    Returns:
        ``{name: statistic}`` with empty states.
    """
    per: dict[str, Any] = {}
    for name in NAMES:
        cls = stat_class(name) if name in names else None
        if cls is not None and cls.per_site:
            per[name] = cls.create(histogram_bits=histogram_bits, max_positions=max_positions,
                                   sample_size=sample_size)
    for stat in per.values():
        stat.compile = compile
    return per
