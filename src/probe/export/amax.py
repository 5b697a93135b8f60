"""Per-tensor and per-channel amax of every linear layer's input, as JSON, with the scales a
static per-tensor quantizer would use and entries ready for an NVIDIA ModelOpt ``quant_cfg``.

Layout (``version`` 1)::

    {"format": "probe.amax", "version": 1, "model": ..., "runs": [...], "skip_first": 0,
     "fp8_e4m3_max": 448.0, "int8_max": 127.0,
     "modules": {"model.layers.0.self_attn.q_proj": {
         "quantizer": "model.layers.0.self_attn.q_proj.input_quantizer", "tokens": 167,
         "amax": 7.65, "fp8_e4m3_scale": 0.0171, "int8_scale": 0.0602,
         "channel_amax": [...]}},
     "modelopt": {"fp8": [{"quantizer_name": "...input_quantizer",
                           "cfg": {"num_bits": [4, 3], "axis": null, "constant_amax": 7.65}}, ...],
                  "int8": [{"quantizer_name": "...", "cfg": {"num_bits": 8, "axis": null,
                                                            "constant_amax": 7.65}}, ...]}}

``amax`` is the largest ``|x|`` over all channels and kept tokens; the scales are
``amax / 448`` (FP8 E4M3) and ``amax / 127`` (INT8 symmetric), in float64. ModelOpt names a
linear layer's activation quantizer ``<module>.input_quantizer``; its ``QuantizerAttributeConfig``
field ``constant_amax`` pins that quantizer's amax and skips its calibration, and a
``quant_cfg`` entry's ``cfg`` replaces the quantizer's attributes, so each entry repeats
``num_bits`` and ``axis``. Append the ``modelopt`` list of your format to the ``quant_cfg`` of
a ModelOpt config.

Mixture-of-experts layers add ``"experts"``: per fused experts parameter
``"<experts>.gate_up_proj"``, ``{"experts": E, "tokens": [E], "amax": [E], "channel_amax": [E][D],
"fp8_e4m3_scale": [E], "int8_scale": [E]}`` (an expert with no token: amax 0 and scales 0), the
same for ``"<experts>.down_proj"`` (``channel_amax`` ``[E][I]``) where its input was captured, and
``"coverage"``: the experts with no token per module. No ``quant_cfg`` entries are written for
them (ModelOpt names fused-expert quantizers per implementation).
"""

from __future__ import annotations

import json

from ._collect import ExpertStats, ModuleStats, coverage

__all__ = ["FP8_E4M3_MAX", "INT8_MAX", "build", "write"]

FP8_E4M3_MAX = 448.0
INT8_MAX = 127.0


def build(stats: list[ModuleStats], meta: dict) -> dict:
    modules = {}
    fp8, int8 = [], []
    for s in stats:
        amax = float(s.absmax.max())
        quantizer = f"{s.module}.input_quantizer"
        modules[s.module] = {
            "quantizer": quantizer, "tokens": s.tokens, "amax": amax,
            "fp8_e4m3_scale": amax / FP8_E4M3_MAX, "int8_scale": amax / INT8_MAX,
            "channel_amax": [float(v) for v in s.absmax],
        }
        if amax <= 0:  # ModelOpt requires constant_amax > 0
            continue
        fp8.append({"quantizer_name": quantizer, "cfg": {"num_bits": [4, 3], "axis": None, "constant_amax": amax}})
        int8.append({"quantizer_name": quantizer, "cfg": {"num_bits": 8, "axis": None, "constant_amax": amax}})
    return {"format": "probe.amax", "version": 1, **meta, "fp8_e4m3_max": FP8_E4M3_MAX, "int8_max": INT8_MAX,
            "modules": modules, "modelopt": {"fp8": fp8, "int8": int8}}


def build_experts(experts: list[ExpertStats]) -> dict:
    out = {}
    for x in experts:
        amax = x.absmax.max(axis=1) if x.absmax.size else x.absmax
        out[f"{x.module}.{x.proj}_proj"] = {
            "experts": x.n_experts, "tokens": [int(t) for t in x.tokens], "amax": [float(a) for a in amax],
            "fp8_e4m3_scale": [float(a) / FP8_E4M3_MAX for a in amax],
            "int8_scale": [float(a) / INT8_MAX for a in amax],
            "channel_amax": [[float(v) for v in row] for row in x.absmax],
        }
    return out


def write(stats: list[ModuleStats], path: str, meta: dict, experts: list[ExpertStats] | None = None) -> dict:
    data = build(stats, meta)
    if experts:
        data["experts"] = build_experts(experts)
        data["coverage"] = [{k: r[k] for k in ("module", "experts", "zero")} for r in coverage(experts)]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    return data
