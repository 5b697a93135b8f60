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

__all__ = ["NAMES", "DEFAULT", "Cross", "Histogram", "Moments", "Norm", "Position", "Sample", "Tokens", "TopK"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
