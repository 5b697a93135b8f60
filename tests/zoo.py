"""The architecture zoo: every model type in transformers' ``MODEL_MAPPING_NAMES``, built tiny from
its config, run on a padded batch, and compared with ``output_hidden_states=True``.

``python tests/zoo.py`` rewrites docs/architectures.md; tests/test_zoo.py runs the same check.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a config that would fetch files fails fast instead of waiting

import numpy as np
import torch
import transformers

import probe

#: generic shrink: config attribute -> tiny value (applied recursively to sub-configs)
SHRINK = {
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "embed_dim", "dim", "word_embed_proj_dim",
                     "embedding_size", "projection_dim", "text_embed_dim"), 32),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "d_ff", "n_inner", "hidden_dim", "encoder_ffn_dim",
                     "decoder_ffn_dim", "moe_intermediate_size", "shared_expert_intermediate_size"), 64),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers", "decoder_layers",
                     "num_decoder_layers"), 2),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "encoder_attention_heads",
                     "decoder_attention_heads", "num_heads"), 4),
    **dict.fromkeys(("num_key_value_heads", "n_kv_heads", "num_kv_heads"), 2),
    **dict.fromkeys(("head_dim", "d_kv", "attention_head_size"), 8),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok",), 2),
}

#: a padded batch: two sequences of 7 token ids, the second with 3 padding tokens on the right
B, T, T_DEC = 2, 7, 5


#: left alone on the second try: head sizes that rotary sections or latent projections depend on
HEADS = {"head_dim", "d_kv", "attention_head_size", "num_attention_heads", "n_head", "n_heads",
         "encoder_attention_heads", "decoder_attention_heads", "num_heads", "num_key_value_heads",
         "n_kv_heads", "num_kv_heads"}


def shrink(config, keep: frozenset = frozenset()) -> None:
    for key, value in list(vars(config).items()):
        if isinstance(value, transformers.PretrainedConfig):
            shrink(value, keep)
        elif key in SHRINK and key not in keep and isinstance(value, int) and not isinstance(value, bool):
            setattr(config, key, SHRINK[key])
    for key in ("layer_types", "block_types"):
        types = getattr(config, key, None)
        layers = next((getattr(config, k) for k in ("num_hidden_layers", "num_layers") if hasattr(config, k)), None)
        if isinstance(types, list) and isinstance(layers, int) and len(types) != layers:
            setattr(config, key, types[:layers])


def build(model_type: str, keep: frozenset = frozenset()):
    config = transformers.AutoConfig.for_model(model_type)
    shrink(config, keep)
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(config).eval()


def inputs(model) -> dict:
    vocab = int(getattr(model.config, "vocab_size", None) or model.get_input_embeddings().num_embeddings)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(5, vocab - 1), vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T - 3:] = 0
    call = {"input_ids": ids, "attention_mask": mask}
    import inspect

    params = inspect.signature(model.forward).parameters
    if "use_cache" in params:
        call["use_cache"] = False  # hybrid caches of some models cannot report a length
    if "decoder_input_ids" in params:
        call["decoder_input_ids"] = torch.randint(min(5, vocab - 1), vocab, (B, T_DEC), generator=g)
    return call


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


def compare(model, call: dict) -> tuple[str, str]:
    """``("exact" | "refused" | "MISMATCH", detail)``: probe against ``output_hidden_states=True``."""
    with torch.no_grad():
        out = model(**call, output_hidden_states=True)
    stacks = [(k, v) for k, v in out.items() if k.endswith("hidden_states") and isinstance(v, (tuple, list)) and v
              and all(isinstance(t, torch.Tensor) for t in v)]
    if not stacks:
        return "cannot build", "returns no hidden_states tuple to compare with"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with probe.capture(model, stats=("moments",), strict=True) as run:
                with torch.no_grad():
                    model(**call)
    except probe.ProbeError as err:
        return "refused", str(err).splitlines()[0][:200]
    names = []
    for key, hidden in stacks:
        prefix = "decoder_" if key.startswith("decoder_") else ""
        mask = call.get(prefix + "attention_mask")
        ids = call[prefix + "input_ids"]
        mask = torch.ones_like(ids) if mask is None else mask
        for i, h in enumerate(hidden):
            name = f"{key}.{i}"
            names.append(name)
            if name not in run.sites:
                return "MISMATCH", f"no site {name} (sites {run.sites[:3]}...)"
            if tuple(h.shape[:2]) != tuple(mask.shape):
                return "MISMATCH", f"{name}: shape {tuple(h.shape)} does not follow the mask, yet captured"
            x = h[mask.bool()].double().numpy()
            s = run[name]
            if s.count != x.size:
                return "MISMATCH", f"{name}: count {s.count} != {x.size}"
            if not (s.min == np.float32(x.min()) and s.max == np.float32(x.max())):
                return "MISMATCH", f"{name}: min/max {s.min}/{s.max} != {x.min()}/{x.max()}"
            err = max(_rel(s.mean, x.mean()), _rel(s.std, x.std()))
            if err > 1e-6:
                return "MISMATCH", f"{name}: mean/std relative error {err:.2e}"
    if sorted(names) != sorted(run.sites):
        return "MISMATCH", f"sites {sorted(set(run.sites) - set(names))} are not hidden states"
    return "exact", f"{len(names)} sites"


#: seconds one model type may take (a config that builds a huge model, or waits on the network)
LIMIT_S = 60


class _Timeout(BaseException):  # not caught by the "except Exception" around a build
    pass


def _alarm(signum, frame):
    raise _Timeout(f"took more than {LIMIT_S} s")


def check(model_type: str) -> tuple[str, str]:
    """Status of one model type: exact, refused (one line why), cannot build, or MISMATCH."""
    use_alarm = hasattr(signal, "SIGALRM")
    if use_alarm:
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(LIMIT_S)
    try:
        return _check(model_type)
    except _Timeout as err:
        return "cannot build", str(err)
    finally:
        if use_alarm:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)


def _check(model_type: str) -> tuple[str, str]:
    for keep in (frozenset(), frozenset(HEADS)):  # second try: full-size heads (rotary sections, MLA)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = build(model_type, keep)
                call = inputs(model)
                with torch.no_grad():
                    model(**call, output_hidden_states=True)
            break
        except Exception as err:
            failed = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
    else:
        return "cannot build", failed
    try:
        return compare(model, call)
    except Exception as err:  # probe broke the host's forward, or the comparison itself failed
        return "MISMATCH", f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"


def model_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    return sorted(MODEL_MAPPING_NAMES)


def main(out: str = "docs/architectures.md") -> None:
    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()
    rows, t0, c0 = [], time.time(), time.process_time()
    for kind in model_types():
        status, detail = check(kind)
        rows.append((kind, status, detail))
        print(f"{kind:<32} {status:<12} {detail}", flush=True)
    Path(out).write_text(render(rows, time.time() - t0, time.process_time() - c0))


def render(rows: list[tuple[str, str, str]], seconds: float, cpu: float) -> str:
    """docs/architectures.md from ``(model type, status, detail)`` rows."""
    counts: dict[str, int] = {}
    for _, status, _ in rows:
        counts[status] = counts.get(status, 0) + 1
    total = len(rows)
    built = total - counts.get("cannot build", 0)
    lines = [
        "# Architectures",
        "",
        "How `sites=\"hidden_states\"` finds the tensors `output_hidden_states=True` returns (see `probe/capture/sites.py`):",
        "",
        "1. **discovery**: every model that takes `input_ids`: one forward on 2 x 5 token ids (decoder 2 x 3)",
        "   records every module call; each returned hidden state is matched to the call that produced or",
        "   received that very tensor (else exactly equal values, possibly in another axis order), and that call",
        "   is hooked: module, which call of it (a shared or looped layer is one site per call), output or input,",
        "   element. Encoder-decoders get `encoder_hidden_states.i` and `decoder_hidden_states.i`, each with its",
        "   own mask. A returned tensor no module call produces or receives is refused with one line.",
        "2. **registry**: models that cannot run on token ids alone, whose base forward transformers records",
        "   through `_can_record_outputs` with as many layers as the config has.",
        "3. **structure**: models that cannot run on token ids: the longest `ModuleList` of identical blocks.",
        "",
        "## The zoo",
        "",
        "Every model type in transformers' `MODEL_MAPPING_NAMES` (transformers "
        f"{transformers.__version__}, torch {torch.__version__.split('+')[0]}), built tiny from its default config "
        "(hidden size 32, 2 layers, 4 heads: `tests/zoo.py`), run on a padded batch of 2 x 7 token ids "
        "(the second row with 3 padding tokens; decoder 2 x 5), and compared with `output_hidden_states=True`. "
        "*exact*: every returned hidden state has a site of the same name whose count equals real tokens x "
        "channels, min and max are equal in float32, and mean and std are within 1e-6 relative of float64 "
        "numpy over the real tokens. *refused*: probe raised one `ProbeError` line instead (given). "
        "*cannot build*: the tiny model could not be built or run on token ids alone (vision, audio and "
        "multimodal models that need other inputs, or a config the generic shrink breaks); probe is not run.",
        "",
        f"Counts: **exact {counts.get('exact', 0)}**, refused {counts.get('refused', 0)}, "
        f"mismatch {counts.get('MISMATCH', 0)}; built and run {built}; cannot build "
        f"{counts.get('cannot build', 0)}; total {total}. "
        f"Generated by `python tests/zoo.py` ({seconds:.0f} s wall time, {cpu:.0f} s CPU time); `make test-slow` "
        "runs the same check.",
        "",
        "| model type | status | detail |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {s} | {d.replace('|', '/')} |" for k, s, d in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(*sys.argv[1:])
