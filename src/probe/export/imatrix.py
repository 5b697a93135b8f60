"""llama.cpp importance matrix (GGUF), as ``llama-imatrix`` writes it and
``llama-quantize --imatrix`` reads it (``tools/imatrix/imatrix.cpp``).

Contents:

- key-values ``general.type = "imatrix"``, ``imatrix.datasets`` (string array),
  ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (uint32);
- per weight, named as in a llama.cpp model GGUF (``blk.0.attn_q.weight``):
  ``<name>.in_sum2`` F32 ``[in_features]`` holding ``Σ x²`` per input channel over every kept
  token, ``<name>.counts`` F32 ``[1]`` holding the number of tokens, and ``<name>.in_sum`` F32
  ``[in_features]`` holding ``Σ x`` (what current ``llama-imatrix`` also writes; older readers
  ignore it). 1-D, as in llama-imatrix's files: it builds ``ne = [in_features, 1]`` (one row per
  expert, here one) and gguf stores a tensor without its trailing sizes of 1 (``ggml_n_dims``).

``llama-quantize`` uses ``in_sum2 / counts``, the mean of ``x²`` per input channel, as the weight
of each column. Names come from gguf-py's own map (``gguf.get_tensor_name_map(arch, n_blocks)``),
so they match what ``convert_hf_to_gguf.py`` names the weights; the output head and the token
embedding are never input sites, as ``llama-imatrix`` leaves them out by default. A layer the map
does not know is left out with a warning. ``chunk_count`` is ``ceil(max tokens / chunk_size)``:
probe has no chunks, and the number is only reported by llama.cpp.

Mixture-of-experts layers (fused 3-D experts, ``"<experts>:experts"`` sites) are written as
``llama-imatrix`` writes a ``GGML_OP_MUL_MAT_ID`` weight: ``<name>.in_sum2`` and ``<name>.in_sum``
F32 ``[E, in_features]`` (numpy order; ggml ``ne = [in_features, E]``), row ``e`` the sums over
the tokens routed to expert ``e``, and ``<name>.counts`` F32 ``[E, 1]`` the tokens per expert.
Both ``ffn_gate_exps`` and ``ffn_up_exps`` get the experts' input (they read the same rows), named
through gguf-py's map of ``<experts>.gate_proj`` / ``<experts>.up_proj`` (what
``convert_hf_to_gguf.py`` names a fused ``gate_up_proj`` once split). An expert with no token keeps
zeros and count 0: llama.cpp's GGUF writer keeps such partial entries too (and warns), and
``llama-quantize`` falls back for them. ``ffn_down_exps`` (gguf-py's name of
``<experts>.down_proj``) gets the down projection's input ``act(gate) · up`` per expert
(``"<experts>:down_proj"`` sites, ``[E, I]``, ``I`` the experts' intermediate size) in the same
layout.

A path ending in ``.dat`` gets the legacy format instead (:func:`write_legacy`): it can hold the
per-expert rows (``values`` of ``E · in_features``, each expert's mean ``x²``), but not the
per-expert counts, so an expert with no token is written as llama-imatrix writes partial data.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence

import numpy as np

from ..errors import ProbeError
from ._collect import ExpertStats, ModuleStats

__all__ = ["arch_for", "tensor_names", "expert_names", "write", "write_legacy"]

#: transformers model_type -> llama.cpp architecture, where the names differ
_ALIASES = {"mistral": "llama", "mixtral": "llama", "gpt_neox": "gptneox", "gpt_bigcode": "starcoder",
            "deepseek_v2": "deepseek2", "deepseek_v3": "deepseek2"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ProbeError('the imatrix format needs the gguf package; expected it installed; '
                         'run: pip install "probe[gguf]"') from None
    return gguf


def arch_for(model_type: str | None, arch: str | None = None):
    """The ``gguf.MODEL_ARCH`` for a transformers ``model_type`` (or an explicit llama.cpp ``arch``)."""
    gguf = _gguf()
    names = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    want = arch or _ALIASES.get(model_type or "", model_type or "")
    if want not in names and arch is None:  # qwen3_moe -> qwen3moe, qwen2_moe -> qwen2moe
        want = want.replace("_", "")
    if want not in names:
        raise ProbeError(f"no llama.cpp architecture for model_type {model_type!r}"
                         f"{'' if arch is None else f' (arch={arch!r})'}; expected one of gguf.MODEL_ARCH_NAMES; "
                         "pass arch= with the llama.cpp name, e.g. arch='llama'")
    return names[want]


def tensor_names(modules: list[str], model_type: str | None, arch: str | None = None) -> dict[str, str]:
    """``{module: gguf weight name}`` for the modules gguf-py's map knows (others are absent)."""
    gguf = _gguf()
    blocks = 1 + max([int(n) for m in modules for n in re.findall(r"(?:^|\.)(\d+)(?=\.|$)", m)] or [0])
    name_map = gguf.get_tensor_name_map(arch_for(model_type, arch), blocks)
    out = {}
    for module in modules:
        name = name_map.get_name(module + ".weight", try_suffixes=(".weight", ".bias"))
        if name is not None:
            out[module] = name
    return out


def expert_names(experts: list[ExpertStats], model_type: str | None, arch: str | None = None,
                 others: Sequence[str] = ()) -> dict[str, str]:
    """``{"<experts>.gate_proj" | ".up_proj" | ".down_proj": gguf name}`` of the fused experts
    modules (gguf-py's map of the per-projection HF names, e.g. ``blk.0.ffn_gate_exps.weight``;
    ``.down_proj`` where its input was captured)."""
    wanted = [f"{x.module}.{p}" for x in experts for p in
              (("gate_proj", "up_proj") if x.proj == "gate_up" else ("down_proj",))]
    return tensor_names(wanted + list(others), model_type, arch) if wanted else {}


def write(stats: list[ModuleStats], path: str, meta: dict, *, arch: str | None = None,
          datasets: list[str] | None = None, chunk_size: int = 512,
          experts: list[ExpertStats] | None = None) -> dict[str, str]:
    """Write the imatrix GGUF; returns ``{module: gguf weight name}`` of what was written."""
    gguf = _gguf()
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ProbeError(f"chunk_size must be an int >= 1; got {chunk_size!r}; pass 512 (llama-imatrix's default)")
    config = meta.get("model", {}).get("config", {}) or {}
    experts = experts or []
    names = tensor_names([s.module for s in stats], config.get("model_type"), arch) if stats else {}
    exp_names = {k: v for k, v in expert_names(experts, config.get("model_type"), arch,
                                                [s.module for s in stats]).items()
                 if k.endswith((".gate_proj", ".up_proj", ".down_proj")) and k not in names}
    by_key = {f"{x.module}.{p}": x for x in experts
              for p in (("gate_proj", "up_proj") if x.proj == "gate_up" else ("down_proj",))}
    missing = [s.module for s in stats if s.module not in names]
    lost = list(dict.fromkeys(x.module for x in experts if not any(by_key.get(k) is x for k in exp_names)))
    if experts and len(lost) == len({x.module for x in experts}) and arch is not None:
        try:
            own = f"--arch {gguf.MODEL_ARCH_NAMES[arch_for(config.get('model_type'))]} or no --arch"
        except ProbeError:
            own = "the llama.cpp name of this model's architecture"
        raise ProbeError(f"the llama.cpp architecture {arch!r} names none of the {len(lost)} experts modules "
                         f"({lost[0]}, …: no ffn_*_exps tensors); expected the model's own architecture "
                         f"(model_type {config.get('model_type')!r}); pass {own}")
    missing += lost
    if not names and not exp_names:
        raise ProbeError(f"none of the {len(stats)} modules has a llama.cpp tensor name for model_type "
                         f"{config.get('model_type')!r}; expected module paths of a transformers model; "
                         "pass arch= with the llama.cpp architecture")
    if missing:
        warnings.warn(f"probe: {len(missing)} module(s) have no llama.cpp tensor name and are left out of the "
                      "imatrix: " + ", ".join(missing[:5]) + (" …" if len(missing) > 5 else ""), stacklevel=3)
    seen: dict[str, str] = {}
    # name -> (in_sum [M, n], in_sum2 [M, n], counts [M]): M = 1, or E for an experts weight
    entries: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    tokens = max([s.tokens for s in stats if s.module in names] + [int(x.tokens.max()) for x in experts
                                                                   if x.tokens.size], default=0)
    for s in sorted((s for s in stats if s.module in names), key=lambda s: names[s.module]):
        name = names[s.module]
        if name in seen:
            raise ProbeError(f"modules {seen[name]!r} and {s.module!r} both map to {name!r}; expected one "
                             "module per llama.cpp tensor; pass arch= with the right architecture")
        seen[name] = s.module
        entries[name] = (s.sum_x.reshape(1, -1), s.sum_x2.reshape(1, -1), np.array([s.tokens]))  # M = 1
    for key, name in sorted(exp_names.items(), key=lambda kv: kv[1]):
        x = by_key[key]
        if name in seen:
            raise ProbeError(f"modules {seen[name]!r} and {key!r} both map to {name!r}; expected one "
                             "module per llama.cpp tensor; pass arch= with the right architecture")
        seen[name] = key
        entries[name] = (x.sum_x, x.sum_x2, x.tokens)
    every = {**names, **exp_names}
    datasets = list(datasets or meta.get("runs") or [])
    if str(path).endswith(".dat"):
        write_legacy(entries, path, chunk_size, math.ceil(tokens / chunk_size), datasets)
        return {m: every[m] for m in seen.values()}
    writer = gguf.GGUFWriter(path, arch=gguf.MODEL_ARCH_NAMES[arch_for(config.get("model_type"), arch)])
    # llama-imatrix writes no general.architecture: drop the key the writer adds by itself
    for kv in getattr(writer, "kv_data", []):
        kv.pop(gguf.Keys.General.ARCHITECTURE, None)
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", datasets)
    writer.add_uint32("imatrix.chunk_count", math.ceil(tokens / chunk_size))
    writer.add_uint32("imatrix.chunk_size", chunk_size)
    for name, (sum_x, sum_x2, counts) in entries.items():
        # llama-imatrix's shapes on disk: ne [n, M] and [1, M] less trailing 1s (gguf keeps
        # ggml_n_dims dimensions), so one row (a dense weight, M = 1) is 1-D: [n] and [1]
        shape = (lambda a: a.reshape(-1)) if sum_x2.shape[0] == 1 else (lambda a: a)
        writer.add_tensor(f"{name}.in_sum", shape(sum_x.astype(np.float32)))
        writer.add_tensor(f"{name}.in_sum2", shape(sum_x2.astype(np.float32)))
        writer.add_tensor(f"{name}.counts", shape(counts.astype(np.float32).reshape(-1, 1)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {m: every[m] for m in seen.values()}


def write_legacy(entries: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], path: str, chunk_size: int,
                 chunk_count: int, datasets: list[str]) -> None:
    """Write the legacy ``imatrix.dat`` (``llama-imatrix --output-format dat``,
    ``save_imatrix_legacy`` in ``tools/imatrix/imatrix.cpp``), little-endian::

        int32 n_entries
        per entry, sorted by name: int32 len, name, int32 ncall, int32 nval, float32 values[nval]
        int32 chunk_count, int32 len, the last dataset's name

    ``ncall = ceil(max(counts) / chunk_size)`` and ``values[e·n + i] = in_sum2[e, i] / counts[e] ·
    ncall``: the mean of ``x²`` per expert row, scaled by ``ncall``. It holds per-expert values
    but no per-expert counts; a row with no token is written as 1 (``ncall`` after scaling), as
    llama-imatrix writes partial data, and an entry with no token at all is left out."""
    import struct

    with open(path, "wb") as f:
        kept = sorted(name for name, (_, _, counts) in entries.items() if np.asarray(counts).sum() > 0)
        f.write(struct.pack("<i", len(kept)))
        for name in kept:
            _, sum_x2, counts = entries[name]
            counts = np.asarray(counts, np.float64).reshape(-1)
            ncall = int(-(-int(counts.max()) // chunk_size))
            seen = (counts > 0)[:, None]
            values = np.where(seen, sum_x2 / np.maximum(counts, 1)[:, None], 1.0) * ncall
            raw = name.encode()
            f.write(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, values.size))
            f.write(values.astype("<f4").tobytes())
        last = (datasets[-1] if datasets else "").encode()
        f.write(struct.pack("<ii", chunk_count, len(last)) + last)
