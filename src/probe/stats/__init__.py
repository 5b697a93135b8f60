"""Mergeable streaming statistics, one per module, all following :class:`~probe.stats._base.Stat`.

Each statistic declares its state in :mod:`probe.stats._state` (numpy only). The statistic
classes need torch and are imported on first use, so the read side (which imports
``probe.stats._state`` and ``probe.stats._buckets``) never pays for importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

#: statistic names accepted by ``capture(stats=...)``, in the order they run
NAMES = ("moments", "position", "histogram", "sample", "cross", "topk", "norm", "cos")
#: what ``capture(stats=None)`` runs: all but ``cos`` (the per-token cosines inside ``cross``,
#: which about double its cost; see benchmarks/research.py)
DEFAULT = ("moments", "position", "histogram", "sample", "cross", "topk", "norm")

_LAZY = {"Tokens": "._base", "Cross": ".cross", "Histogram": ".histogram", "Moments": ".moments",
         "Position": ".position", "Sample": ".sample", "TopK": ".topk", "Norm": ".norm"}

__all__ = ["NAMES", "DEFAULT", "site_states", "Cross", "Histogram", "Moments", "Norm", "Position", "Sample", "Tokens", "TopK"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    make = {
        "moments": lambda: __getattr__("Moments")(),
        "position": lambda: __getattr__("Position")(max_positions),
        "histogram": lambda: __getattr__("Histogram")(histogram_bits),
        "sample": lambda: __getattr__("Sample")(sample_size),
        "topk": lambda: __getattr__("TopK")(),
        "norm": lambda: __getattr__("Norm")(histogram_bits, max_positions),
    }
    per = {name: make[name]() for name in NAMES if name in names and name in make}
    for stat in per.values():
        stat.compile = compile
    return per
