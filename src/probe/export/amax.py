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
"""

from __future__ import annotations

import json

from ._collect import ModuleStats

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


def write(stats: list[ModuleStats], path: str, meta: dict) -> dict:
    data = build(stats, meta)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    return data
