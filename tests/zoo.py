"""The architecture zoo: every model type in transformers' ``MODEL_MAPPING_NAMES``, built tiny from
its config, run on a padded batch, and compared with ``output_hidden_states=True``.

``python tests/zoo.py [docs/architectures.md [jobs]]`` rewrites docs/architectures.md;
tests/test_zoo.py runs the same check.
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
from probe.capture.sites import _text_config, _with_image_tokens, main_inputs

#: generic shrink: config attribute -> tiny value (applied recursively to sub-configs)
SHRINK = {
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "embed_dim", "dim", "word_embed_proj_dim",
                     "embedding_size", "projection_dim", "text_embed_dim"), 32),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "d_ff", "n_inner", "hidden_dim", "encoder_ffn_dim",
                     "decoder_ffn_dim", "moe_intermediate_size", "shared_expert_intermediate_size"), 64),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers", "decoder_layers",
                     "num_decoder_layers", "depth"), 2),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "encoder_attention_heads",
                     "decoder_attention_heads", "num_heads"), 4),
    **dict.fromkeys(("num_key_value_heads", "n_kv_heads", "num_kv_heads"), 2),
    **dict.fromkeys(("head_dim", "d_kv", "attention_head_size", "v_head_dim"), 8),
    **dict.fromkeys(("rotary_dim", "qk_rope_head_dim", "qk_nope_head_dim"), 4),
    **dict.fromkeys(("kv_lora_rank", "q_lora_rank"), 16),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok",), 2),
}

#: a padded batch: two sequences of 7 token ids, the second with 3 padding tokens on the right
B, T, T_DEC = 2, 7, 5


#: left alone on the second try: head sizes that rotary sections or latent projections depend on
HEADS = {"head_dim", "d_kv", "attention_head_size", "v_head_dim", "rotary_dim", "qk_rope_head_dim",
         "qk_nope_head_dim", "kv_lora_rank", "q_lora_rank", "num_attention_heads", "n_head", "n_heads",
         "encoder_attention_heads", "decoder_attention_heads", "num_heads", "num_key_value_heads",
         "n_kv_heads", "num_kv_heads"}


def shrink(config, keep: frozenset = frozenset()) -> None:
    """Shrink ``config`` in place: every :data:`SHRINK` attribute not in ``keep``, in sub-configs too."""
    for key, value in list(vars(config).items()):
        if isinstance(value, transformers.PretrainedConfig):
            shrink(value, keep)
        elif key in SHRINK and key not in keep and isinstance(value, int) and not isinstance(value, bool):
            setattr(config, key, SHRINK[key])
        elif key == "head_dim" and value is None and key not in keep:  # left to derive, which some models do not
            setattr(config, key, SHRINK[key])
    _mrope(config)
    for key in ("layer_types", "block_types"):
        types = getattr(config, key, None)
        layers = next((getattr(config, k) for k in ("num_hidden_layers", "num_layers") if hasattr(config, k)), None)
        if isinstance(types, list) and isinstance(layers, int) and len(types) != layers:
            setattr(config, key, types[:layers])


def _shrunk_dict(d: dict, keep: frozenset) -> dict:
    widths = {v for k, v in d.items() if k in SHRINK and k not in keep and type(v) is int and v > SHRINK[k] >= 32}
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and "model_type" in value:  # a sub-config
            out[key] = _shrunk_dict(value, keep)
        elif key in SHRINK and key not in keep and type(value) is int:
            out[key] = SHRINK[key]
        elif not (type(value) is int and value in widths):  # else left for the class to derive again
            out[key] = value
    return out


def shrunk(config, keep: frozenset = frozenset()):
    """A new config of ``config``'s class from its shrunk values (:func:`shrink`), leaving out the
    values that repeat a shrunk width (SigLIP's ``projection_size``, a pooled width): the class
    derives those again from the shrunk ones, or sets its defaults. ``None`` when the class refuses."""
    try:
        new = type(config).from_dict(_shrunk_dict(config.to_dict(), keep))
    except Exception:
        return None
    shrink(new, keep)
    return new


def _mrope(config) -> None:
    """Multimodal rotary sections (a config that accepts ``mrope_section``) summing to half the head
    size, as the rotary split needs; models read ``[8, 12, 12]`` (head size 64) when none is given."""
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or "mrope_section" not in getattr(config, "ignore_keys_at_rope_validation", ()):
        return
    heads = getattr(config, "num_attention_heads", None)
    head = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    if not isinstance(head, int):
        return
    sections = list(rope.get("mrope_section") or [8, 12, 12])
    half, n = head // 2, len(sections)
    rope["mrope_section"] = [half - (n - 1) * (half // n)] + [half // n] * (n - 1)


#: left alone on the third try: every width (only depth and expert counts shrink)
WIDTHS = frozenset(SHRINK) - {"num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers",
                              "decoder_layers", "num_decoder_layers", "num_experts", "num_local_experts",
                              "n_routed_experts", "num_experts_per_tok"}

#: set everywhere they exist: backbones built in transformers, from no pretrained weights (no timm, no
#: download); a timm backbone config becomes a small transformers ResNet
OFFLINE = {"use_timm_backbone": False, "use_pretrained_backbone": False}


def _offline(config) -> None:
    for key, value in list(vars(config).items()):
        if getattr(value, "model_type", None) == "timm_backbone":  # a small ResNet built in transformers instead
            setattr(config, key, transformers.ResNetConfig(
                embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic",
                out_indices=list(getattr(value, "out_indices", None) or [1, 2, 3, 4])))
        elif isinstance(value, transformers.PretrainedConfig):
            _offline(value)
        elif key in OFFLINE:
            setattr(config, key, OFFLINE[key])


def _fit_special_tokens(config) -> None:
    """Grow the text vocabulary over the image placeholder token where a default config leaves it
    outside (LLaVA's ``image_token_id`` 32000 of a 32000-token Llama; the released model has 32064)."""
    text = _text_config(config)
    token = next((v for k in ("image_token_id", "image_token_index") if isinstance(v := getattr(config, k, None), int)),
                 None)
    if text is not None and token is not None and isinstance(text.vocab_size, int) and text.vocab_size <= token:
        text.vocab_size = token + 1


#: the most parameters a model built with full-size widths may have (its build and forward stay fast)
MAX_PARAMS = 30_000_000


def build(model_type: str, keep: frozenset = frozenset()):
    config = transformers.AutoConfig.for_model(model_type)
    _offline(config)
    small = shrunk(config, keep)
    if small is None:  # the class does not take its own values back: shrunk in place
        shrink(config, keep)
        small = config
    config = small
    _fit_special_tokens(config)
    if keep == WIDTHS:  # counted on the meta device first: nothing is allocated
        with torch.device("meta"):
            size = sum(p.numel() for p in transformers.AutoModel.from_config(config).parameters())
        if size > MAX_PARAMS:
            raise ValueError(f"{size / 1e6:.0f}M parameters with full-size widths")
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(config).eval()


#: clip length in samples for ``input_values`` (probe's discovery clips); the second clip's last
#: ``PAD_SAMPLES`` are padding
SAMPLES, PAD_SAMPLES = 6400, 2400


def inputs(model, order: int = 0) -> dict | None:
    """The ``order``-th way to feed a batch of 2 to ``model``'s main input: token ids (the second
    row padded) holding an image's placeholder tokens with that image (a vision-language model), the
    ids alone, then with an image too (CLIP-like); or each way :func:`probe.capture.sites.main_inputs` feeds
    it (images or videos, audio clips with the second padded and masked, log-mel features either way
    round), then each with token ids too. Other token ids the forward requires (``qformer_input_ids``)
    are given with every one; ``None`` when there is no ``order``-th way."""
    import inspect

    g = torch.Generator().manual_seed(0)
    config = model.config
    params = inspect.signature(model.forward).parameters
    vocab = getattr(_text_config(config), "vocab_size", None)

    def ids() -> dict:
        n = int(vocab or model.get_input_embeddings().num_embeddings)
        mask = torch.ones(B, T, dtype=torch.long)
        mask[1, T - 3:] = 0
        return {"input_ids": torch.randint(min(5, n - 1), n, (B, T), generator=g), "attention_mask": mask}

    built = main_inputs(model, B)
    if built:
        calls = [dict(c) for c in built]
        for call in calls:
            if "input_values" in call and call["input_values"].dim() == 2 and "attention_mask" in params:
                mask = torch.ones(B, SAMPLES, dtype=torch.long)
                mask[1, SAMPLES - PAD_SAMPLES:] = 0
                call["input_values"][1, SAMPLES - PAD_SAMPLES:] = 0
                call["attention_mask"] = mask
        if "input_ids" in params and isinstance(vocab, int):  # an image model that needs its text too
            calls += [{**c, **ids()} for c in calls if "attention_mask" not in c]
    else:
        calls = [ids()]
        images = main_inputs(model, B, main="pixel_values") if "pixel_values" in params else []
        if images:  # a vision-language model's text with an image's tokens first; a CLIP-like one's both
            try:
                with torch.no_grad():
                    calls.insert(0, _with_image_tokens(model, calls[0], images[0])())
            except Exception:
                pass
            calls.append({**calls[-1], **images[0]})
    if order >= len(calls):
        return None
    call = calls[order]
    if "use_cache" in params:
        call["use_cache"] = False  # hybrid caches of some models cannot report a length
    for name, p in params.items():
        if name == "decoder_input_ids" or (name.endswith("input_ids") and name not in call and p.default is p.empty):
            n = vocab or 16
            call[name] = torch.randint(min(5, n - 1), n, (B, T_DEC if name.startswith("decoder") else T), generator=g)
    return call


def _real(model, call: dict, key: str, h: torch.Tensor) -> torch.Tensor | None:
    """Which of ``h``'s ``[batch, tokens]`` positions are real, as transformers reads the batch."""
    prefix = "decoder_" if key.startswith("decoder_") else ""
    ids = call.get(prefix + "input_ids")
    mask = call.get(prefix + "attention_mask")
    if key.startswith(("vision_", "image_", "video_")):  # a vision tower's patches: all real
        return torch.ones(h.shape[:2], dtype=torch.bool)
    if ids is not None and mask is not None and (prefix or "input_ids" in call):
        if tuple(h.shape[:2]) != tuple(mask.shape):
            return None  # tokens the mask does not describe
        return mask.bool()
    if "input_values" in call and mask is not None and not prefix:
        frames = model._get_feature_vector_attention_mask(h.shape[1], mask)
        return frames.bool()
    return torch.ones(h.shape[:2], dtype=torch.bool)


def _stacks(out, prefix: str = "") -> list[tuple[str, tuple]]:
    """Every hidden-state tuple of ``out``, a tower's (CLIP's ``text_model_output``) named after it;
    Swin-like ``reshaped_hidden_states`` repeat ``hidden_states`` in another shape and are left out."""
    found = []
    for k, v in out.items():
        if k == "reshaped_hidden_states":
            continue
        if k.endswith("hidden_states") and isinstance(v, (tuple, list)) and v and all(
                isinstance(t, torch.Tensor) for t in v):
            found.append((prefix + k, tuple(v)))
        elif not prefix and isinstance(v, transformers.utils.ModelOutput):
            found += _stacks(v, k.removesuffix("_outputs").removesuffix("_output").removesuffix("_model") + "_")
    return found


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


def compare(model, call: dict) -> tuple[str, str]:
    """``("exact" | "refused" | "MISMATCH", detail)``: probe against ``output_hidden_states=True``."""
    torch.manual_seed(0)  # the same draws for a model that samples in its forward (ViTMAE's masking)
    with torch.no_grad():
        out = model(**call, output_hidden_states=True)
    stacks = _stacks(out)
    if not stacks:
        return "no hidden states", "returns no hidden_states tuple"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with probe.capture(model, stats=("moments",), strict=True) as run:
                torch.manual_seed(0)  # discovery restores the RNG state it found
                with torch.no_grad():
                    model(**call)
    except probe.ProbeError as err:
        return "refused", str(err).splitlines()[0][:200]
    names = []
    for key, hidden in stacks:
        for i, h in enumerate(hidden):
            name = f"{key}.{i}"
            names.append(name)
            if name not in run.sites:
                return "MISMATCH", f"no site {name} (sites {run.sites[:3]}...)"
            mask = _real(model, call, key, h)
            if mask is None:
                return "MISMATCH", f"{name}: shape {tuple(h.shape)} does not follow the batch, yet captured"
            x = h[mask].detach().double().numpy()
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


def _takes_hidden_states(model) -> bool:
    import inspect

    params = inspect.signature(model.forward).parameters
    return "output_hidden_states" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _check(model_type: str) -> tuple[str, str]:
    failed = ""  # the first try's error: the later ones undo part of the shrink
    tries = [(keep, order) for keep in (frozenset(), frozenset(HEADS), WIDTHS) for order in range(4)]
    for keep, order in tries:  # then full-size heads (rotary sections, MLA), full widths; time-major features
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = build(model_type, keep)
                if not _takes_hidden_states(model):
                    return "no hidden states", "forward takes no output_hidden_states"
                call = inputs(model, order)
                if call is None:
                    continue
                with torch.no_grad():
                    model(**call, output_hidden_states=True)
            break
        except Exception as err:
            failed = failed or f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
    else:
        return "cannot build", failed
    try:
        return compare(model, call)
    except Exception as err:  # probe broke the host's forward, or the comparison itself failed
        return "MISMATCH", f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"


def model_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    return sorted(MODEL_MAPPING_NAMES)


def modality(model_type: str) -> str:
    """What the model type's class is fed, read from the class alone: ``text``, ``text+image``,
    ``image``, ``video``, ``audio`` (samples), ``speech`` (log-mel features) or ``other``."""
    import inspect

    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    name = MODEL_MAPPING_NAMES[model_type]
    try:
        cls = getattr(transformers, name[0] if isinstance(name, (list, tuple)) else name)
        params = inspect.signature(cls.forward).parameters
    except Exception:
        return "other"
    main = cls.main_input_name if isinstance(cls.main_input_name, str) else cls.main_input_name[0]
    if main not in params:
        main = next((n for n in ("input_ids", "pixel_values", "input_values", "input_features") if n in params), main)
    if main == "input_ids":
        return "text+image" if "pixel_values" in params else "text"
    return {"pixel_values": "image", "pixel_values_videos": "video", "input_values": "audio",
            "input_features": "speech"}.get(main, "other")


def _row(kind: str) -> tuple[str, str, str]:
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    return (kind, *check(kind))


def main(out: str = "docs/architectures.md", jobs: str = "1") -> None:
    """Check every model type and write ``out``; ``jobs`` worker processes (each model type is built
    and run in one; CPU time counts them all)."""
    import multiprocessing
    import resource

    torch.set_num_threads(2 if int(jobs) == 1 else 1)
    transformers.logging.set_verbosity_error()
    rows, t0, c0 = [], time.time(), time.process_time()
    with multiprocessing.get_context("fork").Pool(int(jobs), maxtasksperchild=10) as pool:
        for kind, status, detail in pool.imap(_row, model_types()):
            rows.append((kind, status, detail))
            print(f"{kind:<32} {status:<12} {detail}", flush=True)
    cpu = time.process_time() - c0 + resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    Path(out).write_text(render(rows, time.time() - t0, cpu))


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
        "1. **discovery**: one forward on the model's main input, built from its config: 2 x 5 token ids",
        "   (decoder 2 x 3; with an image too where the forward needs one), 2 images of the config's",
        "   `image_size`, 2 clips of 6400 samples, or 2 log-mel inputs (`num_mel_bins` x `2 *",
        "   max_source_positions` frames where the config fixes them, else 64). Every module call is",
        "   recorded; each returned hidden state is matched to the call that produced or received that very",
        "   tensor (else exactly equal values, possibly in another axis order), and that call is hooked:",
        "   module, which call of it (a shared or looped layer is one site per call), output or input,",
        "   element. Encoder-decoders get `encoder_hidden_states.i` and `decoder_hidden_states.i`, each with",
        "   its own mask; two-tower models (CLIP-like) `text_hidden_states.i` and `vision_hidden_states.i`.",
        "   A feature map (`[batch, channels, height, width]`, or channels last) is read as",
        "   `height x width` tokens in row-major order with its channels as the feature axis;",
        "   `reshaped_hidden_states` (the same values as `hidden_states` in another shape) get no sites.",
        "   A returned tensor no module call produces or receives is refused with one line.",
        "2. **registry**: models that discovery cannot run, whose base forward transformers records",
        "   through `_can_record_outputs` with as many layers as the config has.",
        "3. **structure**: otherwise the longest `ModuleList` of identical blocks.",
        "",
        "## The zoo",
        "",
        "Every model type in transformers' `MODEL_MAPPING_NAMES` (transformers "
        f"{transformers.__version__}, torch {torch.__version__.split('+')[0]}), built tiny from its default config "
        "(hidden size 32, 2 layers, 4 heads, nested configs too: `tests/zoo.py`; where that breaks the config, "
        "again with full-size heads, then with every width full-size and only 2 layers), run on a batch of 2 "
        "of its main input and compared with `output_hidden_states=True`: 2 x 7 token ids with the second "
        "row's last 3 padded (decoder 2 x 5), with images where a multimodal forward needs them; images of "
        "the config's size; clips of 6400 samples, the second with its last 2400 samples padded and masked; "
        "log-mel features (also tried time-major). "
        "*exact*: every returned hidden state has a site of the same name whose count equals real tokens x "
        "channels, min and max are equal in float32, and mean and std are within 1e-6 relative of float64 "
        "numpy over the real tokens (an audio clip's real frames are the model's own frame mask). "
        "*refused*: probe raised one `ProbeError` line instead (given). *no hidden states*: the model "
        "defines no `output_hidden_states` (audio codecs, VQ-VAEs, ...), so there is nothing to reproduce; "
        "name modules in `sites=`. *cannot build*: the tiny model could "
        "not be built or run on the inputs above (a config the generic shrink breaks, a forward that needs "
        "inputs the zoo does not make); probe is not run.",
        "",
        f"Counts: **exact {counts.get('exact', 0)}**, refused {counts.get('refused', 0)}, "
        f"mismatch {counts.get('MISMATCH', 0)}, no hidden states {counts.get('no hidden states', 0)}; "
        f"built and run {built}; cannot build "
        f"{counts.get('cannot build', 0)}; total {total}. "
        f"Generated by `python tests/zoo.py` ({seconds:.0f} s wall time, {cpu:.0f} s CPU time); `make test-slow` "
        "runs the same check.",
        "",
        "By what the model is fed (`tests/zoo.py: modality`):",
        "",
        "| modality | exact | refused | mismatch | no hidden states | cannot build | total |",
        "|---|---|---|---|---|---|---|",
    ]
    kinds = {k: modality(k) for k, _, _ in rows}
    for m in ("text", "text+image", "image", "video", "audio", "speech", "other"):
        mine = [st for k, st, _ in rows if kinds[k] == m]
        if mine:
            lines.append(f"| {m} | {mine.count('exact')} | {mine.count('refused')} | {mine.count('MISMATCH')} | "
                         f"{mine.count('no hidden states')} | {mine.count('cannot build')} | {len(mine)} |")
    lines += ["", "| model type | modality | status | detail |", "|---|---|---|---|"]
    lines += [f"| {k} | {kinds[k]} | {s} | {d.replace('|', '/')} |" for k, s, d in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(*sys.argv[1:])
