"""Files other tools read, computed from probe runs: quantization calibration and TensorBoard.

Recipe::

    with probe.capture(model, "calib.h5", sites="linear_inputs", stats=("moments", "histogram")) as run:
        for batch in loader:
            model(**batch)
    probe.export("smoothquant", "calib.h5", "act_scales.pt")   # SmoothQuant smooth_lm(model, scales, alpha)
    probe.export("imatrix", "calib.h5", "imatrix.gguf")        # llama-quantize --imatrix imatrix.gguf
    probe.export("amax", ["shard0.h5", "shard1.h5"], "amax.json")  # per-tensor / per-channel amax, ModelOpt
    probe.export("tensorboard", "train.h5", "logs/")         # every window at its step (any sites)

Every format reads the input sites of a run (``sites="linear_inputs"`` or ``"<module>:input"``)
and keys them by module path; a mixture-of-experts layer's experts (``"<experts>:experts"`` and
``":down_proj"`` sites, included in ``linear_inputs``) are written per expert. Several runs are
merged exactly first. :func:`expert_coverage` lists the experts that saw no or few tokens (the
CLI prints it; each export warns). See ``docs/calibration.md`` and ``docs/moe.md``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal, get_args

from ..errors import ProbeError
from ..store import check_writable
from ._collect import ExpertStats, ModuleStats, as_runs, collect, collect_experts, coverage

__all__ = ["export", "Format", "FORMATS", "collect", "ModuleStats", "ExpertStats", "collect_experts",
           "expert_coverage"]

#: the formats, in one place: the signature's type, the check below and the CLI's choices derive from it
Format = Literal["smoothquant", "imatrix", "amax", "tensorboard"]
FORMATS: tuple[str, ...] = get_args(Format)
#: the file each format writes, as named in the examples of errors about the output path
FILES = {"smoothquant": "act_scales.pt", "imatrix": "imatrix.gguf", "amax": "amax.json"}


def _meta(runs) -> dict[str, Any]:
    first = runs[0].meta
    model = first.get("model", {})
    return {
        "model": model.get("name_or_path") or model.get("class"),
        "runs": [os.path.basename(r.path) if getattr(r, "path", None) else f"run {i}" for i, r in enumerate(runs)],
        "skip_first": max(int(r.meta.get("skip_first") or 0) for r in runs),
        "model_meta": model,
    }


def expert_coverage(runs, min_tokens: int = 1) -> list[dict[str, Any]]:
    """Per mixture-of-experts layer of ``runs`` (merged): the experts that saw no token and those
    that saw fewer than ``min_tokens`` (:func:`probe.export._collect.coverage`); ``[]`` without
    experts sites.

    Raises:
        ProbeError: ``min_tokens`` is not an int >= 1, or the runs do not merge.
    """
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 1:
        raise ProbeError(f"min_tokens must be an int >= 1; got {min_tokens!r}; pass e.g. 16")
    return coverage(collect_experts(runs), min_tokens)


def _warn_coverage(experts: list[ExpertStats], min_tokens: int, empty: str = "as zeros with count 0") -> None:
    rows = [r for r in coverage(experts, min_tokens) if r["zero"] or r["below"]]
    if rows:
        import warnings

        parts = [f"{r['module']}: {len(r['zero'])} of {r['experts']} with no token"
                 + (f", {len(r['below'])} with < {min_tokens}" if r["below"] else "") for r in rows]
        warnings.warn(f"probe: experts with little or no calibration data (an expert with no token is written "
                      f"{empty}): " + "; ".join(parts[:4]) + (" …" if len(parts) > 4 else "")
                      + "; calibrate on more or more varied text", stacklevel=3)


def export(fmt: Format, runs, path: str | os.PathLike, *,
           overwrite: bool = False, arch: str | None = None, datasets: Sequence[str] | None = None,
           chunk_size: int = 512, min_tokens: int = 1) -> dict[str, Any]:
    """Write the calibration file ``fmt`` for the linear-layer inputs captured in ``runs``.

    Args:
        fmt: ``"smoothquant"`` (``torch.save`` of ``{module: float32 [in_features]}`` per-channel
            max |x|), ``"imatrix"`` (llama.cpp GGUF: ``Σ x²`` per channel and token counts) or
            ``"amax"`` (JSON: per-tensor and per-channel amax, FP8/INT8 scales, ModelOpt
            ``quant_cfg`` entries) from input sites; ``"tensorboard"`` (event files in the folder
            ``path``: each window's histograms and scalars at its step, for any sites; one run).
        runs: a run file, a :class:`probe.results.run.Run`, a finished capture, or a sequence of them
            (merged exactly: counts and sums add, maxima take the maximum).
        path: the file to write.
        overwrite: replace ``path`` if it exists.
        arch: ``imatrix`` only: the llama.cpp architecture (default: from the model's
            ``model_type``), used to map module paths to GGUF tensor names.
        datasets: ``imatrix`` only: ``imatrix.datasets`` (default: the run file names).
        chunk_size: ``imatrix`` only: ``imatrix.chunk_size`` (llama.cpp's default 512).
        min_tokens: experts that saw fewer tokens are named in the coverage warning.

    Returns:
        What was written: ``{module: tensor}`` (smoothquant; an experts module's
        ``"<experts>.gate_up_proj"`` is ``[E, D]`` and ``"<experts>.down_proj"`` ``[E, I]``),
        ``{module: gguf name}`` (imatrix; an experts module's ``"<experts>.gate_proj"`` /
        ``".up_proj"`` / ``".down_proj"`` map to ``blk.N.ffn_gate_exps.weight`` / ``ffn_up_exps``
        / ``ffn_down_exps``; a ``path`` ending in ``.dat`` gets llama-imatrix's legacy format) or
        the JSON document (amax; experts under ``"experts"``).

    Raises:
        ProbeError: an unknown format, an existing ``path`` without ``overwrite``, runs without
            input sites or moments, runs of different models.

    Example:
        >>> import probe, torch, transformers
        >>> model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        ...     hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...     vocab_size=50))
        >>> with probe.capture(model, sites="linear_inputs", stats=("moments", "histogram")) as run:
        ...     _ = model(torch.tensor([[1, 2, 3]]))
        >>> import tempfile, os
        >>> out = os.path.join(tempfile.mkdtemp(), "act_scales.pt")
        >>> sorted(probe.export("smoothquant", run, out))[0]
        'model.layers.0.mlp.down_proj'
    """
    if fmt not in FORMATS:
        raise ProbeError(f"export format must be one of {list(FORMATS)}; got {fmt!r}; pass e.g. 'smoothquant'")
    path = os.fspath(path)
    if fmt == "tensorboard":
        from .tensorboard import write_tensorboard

        runs = as_runs(runs)
        if len(runs) != 1:
            raise ProbeError(f"tensorboard export takes one run; got {len(runs)}; "
                             "merge them first with probe merge, or export each to its own folder")
        return {"logdir": write_tensorboard(runs[0], path)}
    check_writable(path, overwrite, name="path", file=FILES[fmt])
    runs = as_runs(runs)
    stats = collect(runs)
    experts = collect_experts(runs)
    if not stats and not any(int(x.tokens.sum()) for x in experts):
        raise ProbeError("no input site saw any token; expected a capture that ran forwards; "
                         "run the model inside the with-block")
    expert_coverage(runs, min_tokens)  # validates min_tokens
    legacy = fmt == "imatrix" and path.endswith(".dat")  # llama.cpp's legacy file has no per-expert counts
    _warn_coverage(experts, min_tokens, "as 1 per call, as llama.cpp's legacy writer does" if legacy
                   else "as zeros with count 0")
    meta = _meta(runs)
    if fmt == "smoothquant":
        from .smoothquant import write

        return write(stats, path, experts)
    if fmt == "imatrix":
        from .imatrix import write as write_imatrix

        return write_imatrix(stats, path, {"model": meta["model_meta"], "runs": meta["runs"]}, arch=arch,
                             datasets=list(datasets) if datasets is not None else None, chunk_size=chunk_size,
                             experts=experts)
    from .amax import write as write_amax

    info = {k: meta[k] for k in ("model", "runs", "skip_first")}
    return write_amax(stats, path, info, experts)

