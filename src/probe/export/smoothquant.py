"""SmoothQuant activation scales: ``{module name: float32 CPU tensor [in_features]}``.

The file ``smoothquant/calibration.py::get_act_scales`` writes with ``torch.save`` and
``smoothquant/smooth.py::smooth_lm(model, scales, alpha)`` reads: for every linear layer, keyed by
its path in ``model.named_modules()``, the per-input-channel maximum of ``|x|`` over the
calibration tokens. probe's value is over every real (non-padding) token; SmoothQuant's own hook
also sees padding when a batch is padded.
"""

from __future__ import annotations

import torch

from ._collect import ModuleStats

__all__ = ["write"]


def scales(stats: list[ModuleStats]) -> dict[str, torch.Tensor]:
    """``{module: float32 tensor [D]}`` of per-channel max |x| (exact: float32 extremes)."""
    return {s.module: torch.from_numpy(s.absmax.astype("float32")) for s in stats}


def write(stats: list[ModuleStats], path: str) -> dict[str, torch.Tensor]:
    out = scales(stats)
    torch.save(out, path)
    return out
