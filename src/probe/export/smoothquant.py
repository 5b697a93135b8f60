"""SmoothQuant activation scales: ``{module name: float32 CPU tensor [in_features]}``.

The file ``smoothquant/calibration.py::get_act_scales`` writes with ``torch.save`` and
``smoothquant/smooth.py::smooth_lm(model, scales, alpha)`` reads: for every linear layer, keyed by
its path in ``model.named_modules()``, the per-input-channel maximum of ``|x|`` over the
calibration tokens. probe's value is over every real (non-padding) token; SmoothQuant's own hook
also sees padding when a batch is padded.

A mixture-of-experts layer with fused 3-D expert weights adds one entry under the name of its
fused parameter, ``"<experts>.gate_up_proj"`` (or ``".up_proj"``): float32 ``[E, in_features]``,
row ``e`` the per-channel max ``|x|`` over the real tokens routed to expert ``e`` (zeros for an
expert that saw none) — the per-expert scales ``smooth_lm`` would divide each expert's input by;
and where the down projection's input was captured (``"<experts>:down_proj"`` sites),
``"<experts>.down_proj"``: float32 ``[E, I]`` over the same tokens, ``I`` the experts'
intermediate size.
"""

from __future__ import annotations

import torch

from ._collect import ExpertStats, ModuleStats

__all__ = ["write"]


def scales(stats: list[ModuleStats]) -> dict[str, torch.Tensor]:
    """``{module: float32 tensor [D]}`` of per-channel max |x| (exact: float32 extremes)."""
    return {s.module: torch.from_numpy(s.absmax.astype("float32")) for s in stats}


def expert_scales(experts: list[ExpertStats]) -> dict[str, torch.Tensor]:
    """``{"<experts>.gate_up_proj": float32 [E, D], "<experts>.down_proj": float32 [E, I]}`` of
    per-expert per-channel max |x| (``down_proj``: where its input was captured)."""
    return {f"{x.module}.{x.proj}_proj": torch.from_numpy(x.absmax.astype("float32")) for x in experts}


def write(stats: list[ModuleStats], path: str, experts: list[ExpertStats] | None = None) -> dict[str, torch.Tensor]:
    out = {**scales(stats), **expert_scales(experts or [])}
    torch.save(out, path)
    return out
