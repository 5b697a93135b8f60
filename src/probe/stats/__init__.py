"""Mergeable streaming statistics, one per module, all following :class:`~probe.stats._base.Stat`."""

from ._base import Tokens
from .cross import Cross
from .histogram import Histogram
from .moments import Moments
from .position import Position
from .sample import Sample

#: statistic names accepted by ``capture(stats=...)``, in the order they run
NAMES = ("moments", "position", "histogram", "sample", "cross")

__all__ = ["NAMES", "Cross", "Histogram", "Moments", "Position", "Sample", "Tokens"]
