"""The fused accelerator path of the per-site statistics: one Triton kernel per group of sites.

On CUDA, when Triton is installed (``pip install "probe[gpu]"``), :class:`probe.capture` hands the
moments, histogram and per-position statistics of each group of sites to :func:`update`: one
kernel reads the activations once (in the dtype it is handed: no float32 chunks) and writes small
per-block partial results, which a few batched tensor ops merge into the very state tensors the
eager statistics keep (:mod:`._combine`). Counts, extremes, absmax location and histograms equal
the eager path's exactly; the float64 moments agree within rounding (see ``docs/statistics.md``).
The sample and the cross-layer statistic stay on their own (batched) paths.

Recipe (no GPU: Triton's interpreter runs the kernel on CPU tensors, slowly)::

    TRITON_INTERPRET=1 python -c "from probe.capture import kernels as k; k._FORCE = True; ..."

Nothing here imports Triton until a CUDA tensor (or ``_FORCE``) asks for the fused path, so
``import probe`` stays light.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Any

from torch import Tensor

from ._layout import Partials, Plan

__all__ = ["FUSED", "available", "wanted", "update", "Plan", "Partials"]

#: statistics the fused kernel computes
FUSED = ("moments", "position", "histogram")
#: run the fused path on CPU tensors too (tests, under ``TRITON_INTERPRET=1``); private switch
_FORCE = False
#: never run the fused path (benchmarks and parity checks compare against the eager one)
_OFF = False
#: overrides of :class:`Plan`'s block sizes (tests use small blocks; a GPU tuning run may set others)
_PLAN: dict[str, int] = {}
#: set after a failed launch: the eager statistics take over, with one warning
_BROKEN: str | None = None
_AVAILABLE: bool | None = None


def available() -> bool:
    """``True`` when Triton can be imported (checked once, without importing it)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = importlib.util.find_spec("triton") is not None
    return _AVAILABLE


def wanted(x: Tensor) -> bool:
    """Whether the statistics of ``x`` take the fused path: a CUDA tensor with Triton installed,
    or any tensor under ``_FORCE`` with ``TRITON_INTERPRET=1``."""
    if _OFF or _BROKEN is not None or not available():
        return False
    if x.is_cuda:
        return True
    return _FORCE and os.environ.get("TRITON_INTERPRET") == "1"


def _partials(x: Tensor, keep: Tensor, plan: Plan) -> Partials:
    from . import _triton

    return _triton.partials(x, keep, plan)


def update(pers: list[dict[str, Any]], x: Tensor, tokens: Any) -> list[str]:
    """Fold ``x[G, n, D]`` (``G`` sites over the same tokens) into the fused statistics of
    ``pers`` (one ``{kind: statistic}`` per site); returns the kinds left for the caller.

    Raises nothing the eager path would not: a kernel that fails to compile or launch turns the
    fused path off for the process with one warning, and the eager statistics run instead.
    """
    global _BROKEN
    kinds = list(pers[0])
    fused = [k for k in kinds if k in FUSED]
    if not fused:
        return kinds
    rest = [k for k in kinds if k not in FUSED]
    if x.numel() == 0:  # an empty chunk adds nothing (and allocates no state), as in eager
        return rest
    stats = {k: [per[k] for per in pers] for k in fused}
    m = stats["histogram"][0].m if "histogram" in stats else 7
    try:
        parts = _partials(x, tokens.keep, Plan(mantissa_bits=m, **_PLAN))
    except Exception as err:  # a compiler or driver failure must not cost the run
        _BROKEN = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"
        warnings.warn(f"probe: the fused Triton statistics failed ({_BROKEN}); using the eager ones "
                      "for the rest of the process", stacklevel=2)
        return kinds
    from . import _combine

    for k, group in stats.items():
        for stat in group:
            if stat._state is None:
                stat._init_like(x)
    if "moments" in stats:
        _combine.into_moments(stats["moments"], parts, tokens)
    if "histogram" in stats:
        _combine.into_histogram(stats["histogram"], parts)
    if "position" in stats:
        _combine.into_position(stats["position"], parts, tokens)
    return rest
