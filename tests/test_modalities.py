"""Models whose main input is not token ids: pixels (ViT's patch tokens, ConvNeXt's channels-first and
SAM's channels-last feature maps), log-mel features (Whisper's two stacks) and two-tower models
(CLIP's text and vision towers). Each is found by a discovery forward on its own main input and
checked against float64 numpy on what ``output_hidden_states=True`` returns, per channel and per
position."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as T

import probe
from probe.capture.sites import main_inputs, resolve

STATS = ("moments", "position")


def _vit():
    config = T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         image_size=32, patch_size=8)
    return T.ViTModel(config).eval(), 32


def _convnext():
    config = T.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32, patch_size=4)
    return T.ConvNextModel(config).eval(), 32


def _sam():
    config = T.SamVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                               patch_size=16, output_channels=16, window_size=2, global_attn_indexes=[1],
                               mlp_dim=64)
    return T.SamVisionModel(config).eval(), 64


def _tokens_last(h: torch.Tensor, layout: str) -> np.ndarray:
    """``[batch, tokens, channels]`` in float64: the reference reading of a returned hidden state."""
    if layout == "channels_first":
        h = h.flatten(2).transpose(1, 2)
    elif layout == "channels_last":
        h = h.flatten(1, -2)
    return h.double().numpy()


def _assert_site(s, x: np.ndarray) -> None:
    """Site ``s`` against ``x`` ``[batch, tokens, channels]`` (all tokens real)."""
    b, t, d = x.shape
    flat = x.reshape(-1, d)
    assert (s.tokens, s.count) == (b * t, x.size), s.name
    assert s.min == np.float32(x.min()) and s.max == np.float32(x.max()), s.name
    _assert_channels(s, flat)
    np.testing.assert_array_equal(s.position.tokens[:t], np.full(t, b))
    np.testing.assert_allclose(s.position.mean[:t], x.mean(axis=(0, 2)), rtol=1e-7, atol=1e-9 * np.abs(flat).max())


def _assert_channels(s, flat: np.ndarray) -> None:
    """Per-channel mean and variance of ``flat`` ``[tokens, channels]``: the CPU path sums float32
    powers of each chunk (docs/statistics.md: variance within ~1e-7 relative), so 1e-7 / 1e-6 with an
    absolute floor of 1e-9 of the data's scale; a token or channel read from the wrong axis is off
    by far more."""
    np.testing.assert_allclose(s.channel.mean, flat.mean(0), rtol=1e-7, atol=1e-9 * np.abs(flat).max())
    np.testing.assert_allclose(s.channel.var, flat.var(0), rtol=1e-6, atol=1e-9 * flat.var())


@pytest.mark.parametrize("make, layout", [(_vit, None), (_convnext, "channels_first"), (_sam, "channels_last")])
def test_images_are_discovered_on_pixels(make, layout):
    """A vision model is discovered by one forward on an image of its config's size; a feature map's
    tokens are its spatial positions (row-major) and its channels the feature axis, whichever side
    the channels are on."""
    torch.manual_seed(0)
    model, size = make()
    sites = resolve(model, "hidden_states")
    assert {s.source for s in sites} == {"discovery"}
    assert {s.spatial for s in sites} == {layout}
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(2, 3, size, size, generator=g), torch.randn(3, 3, size, size, generator=g)]
    with torch.no_grad():
        hidden = [model(pixel_values=p, output_hidden_states=True).hidden_states for p in images]
    with probe.capture(model, stats=STATS, strict=True) as run:
        with torch.no_grad():
            for p in images:
                model(pixel_values=p)
    assert sorted(run.sites) == sorted(f"hidden_states.{i}" for i in range(len(hidden[0])))
    for i in range(len(hidden[0])):
        parts = [_tokens_last(h[i], layout) for h in hidden]
        x = np.concatenate(parts)  # same grid in every batch
        _assert_site(run[f"hidden_states.{i}"], x)


def _whisper():
    config = T.WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                             decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
                             max_source_positions=12, max_target_positions=32, vocab_size=50, pad_token_id=0,
                             decoder_start_token_id=1)
    return T.WhisperModel(config).eval()


@pytest.mark.parametrize("direct", [False, True])
def test_whisper_has_encoder_and_decoder_stacks(direct):
    """An encoder-decoder on log-mel features: ``encoder_hidden_states.i`` over every frame,
    ``decoder_hidden_states.i`` over the decoder's real tokens, as transformers returns them."""
    torch.manual_seed(0)
    model = _whisper()
    g = torch.Generator().manual_seed(2)
    features = torch.randn(2, 16, 24, generator=g)
    ids = torch.randint(2, 50, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    with torch.no_grad():
        out = model(input_features=features, decoder_input_ids=ids, decoder_attention_mask=mask,
                    output_hidden_states=True)
    with probe.capture(model, stats=("moments",), strict=True) as run:
        with torch.no_grad():
            (model.forward if direct else model)(input_features=features, decoder_input_ids=ids,
                                                 decoder_attention_mask=mask)
    names = [f"encoder_hidden_states.{i}" for i in range(3)] + [f"decoder_hidden_states.{i}" for i in range(3)]
    assert sorted(run.sites) == sorted(names)
    for key, real in (("encoder_hidden_states", None), ("decoder_hidden_states", mask.bool())):
        for i, h in enumerate(out[key]):
            x = h.double().numpy() if real is None else h[real].double().numpy()
            x = x.reshape(-1, h.shape[-1])
            s = run[f"{key}.{i}"]
            assert (s.tokens, s.count) == x.shape[:1] + (x.size,), s.name
            assert s.min == np.float32(x.min()) and s.max == np.float32(x.max()), s.name
            _assert_channels(s, x)


def test_main_inputs_follow_the_config():
    """The discovery inputs are read from the (nested) config: image size and channels, mel bins and
    the frames a Whisper encoder requires, an AST spectrogram's size, W2V-BERT's stacked frames;
    none for token-id models."""
    vit, _ = _vit()
    (pixels,) = main_inputs(vit)
    assert tuple(pixels["pixel_values"].shape) == (2, 3, 32, 32)
    first, second = main_inputs(_whisper())
    assert tuple(first["input_features"].shape) == (2, 16, 24)
    assert tuple(second["input_features"].shape) == (2, 24, 16)
    ast = T.ASTModel(T.ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                 max_length=24, num_mel_bins=16))
    assert [tuple(c["input_values"].shape) for c in main_inputs(ast)] == [(2, 6400), (2, 1, 6400), (2, 24, 16)]
    w2v_bert = T.Wav2Vec2BertModel(T.Wav2Vec2BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                        intermediate_size=64, feature_projection_input_dim=24))
    assert tuple(main_inputs(w2v_bert)[1]["input_features"].shape) == (2, 64, 24)  # stacked frames' width
    llama = T.LlamaModel(T.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, vocab_size=32))
    assert main_inputs(llama) == []


def test_two_towers_each_read_their_own_tokens():
    """CLIP returns each tower's states inside its own output: ``text_hidden_states.i`` over the
    text's real tokens (its padding mask), ``vision_hidden_states.i`` over every patch and CLS."""
    torch.manual_seed(0)
    config = T.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=60, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    model = T.CLIPModel(config).eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 60, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 5:] = 0
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, output_hidden_states=True)
    with probe.capture(model, stats=STATS, strict=True) as run:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    text, vision = out.text_model_output.hidden_states, out.vision_model_output.hidden_states
    assert sorted(run.sites) == sorted([f"text_hidden_states.{i}" for i in range(len(text))]
                                       + [f"vision_hidden_states.{i}" for i in range(len(vision))])
    for i, h in enumerate(text):
        x = h[mask.bool()].double().numpy()
        s = run[f"text_hidden_states.{i}"]
        assert (s.tokens, s.count) == (int(mask.sum()), x.size)
        assert s.min == np.float32(x.min()) and s.max == np.float32(x.max())
        _assert_channels(s, x)
    for i, h in enumerate(vision):
        _assert_site(run[f"vision_hidden_states.{i}"], h.double().numpy())


def _llava():
    vision = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=8)
    text = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, pad_token_id=0)
    config = T.LlavaConfig(vision_config=vision, text_config=text, image_token_id=99, vision_feature_layer=-1)
    return T.LlavaForConditionalGeneration(config).eval()


def test_vision_language_model_has_its_image_tower_and_text_stacks():
    """LLaVA: discovery runs text holding an image's placeholder tokens with that image, so the
    vision tower's states (``image_hidden_states.i``, every patch and CLS) are sites beside the
    language model's (``hidden_states.i``, over real tokens, image tokens included); a text-only
    forward in the same capture adds to the text stack only."""
    torch.manual_seed(0)
    model = _llava()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 90, (2, 23), generator=g)
    ids[:, 2:18] = 99  # 16 patches of a 32 x 32 image, CLS dropped by the default feature selection
    mask = torch.ones(2, 23, dtype=torch.long)
    mask[1, 20:] = 0
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    text_ids = torch.randint(1, 90, (2, 9), generator=g)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, output_hidden_states=True)
        text_only = model(input_ids=text_ids, output_hidden_states=True)
    with probe.capture(model, stats=("moments",), strict=True) as run:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
            model(input_ids=text_ids)
    image = out.image_outputs.hidden_states
    assert sorted(run.sites) == sorted([f"image_hidden_states.{i}" for i in range(len(image))]
                                       + [f"hidden_states.{i}" for i in range(len(out.hidden_states))])
    for i, h in enumerate(image):
        x = h.double().numpy().reshape(-1, 32)
        s = run[f"image_hidden_states.{i}"]
        assert (s.tokens, s.count) == (2 * 17, x.size)
        _assert_channels(s, x)
    for i, (h, h_text) in enumerate(zip(out.hidden_states, text_only.hidden_states)):
        x = np.concatenate([h[mask.bool()].double().numpy(), h_text.double().numpy().reshape(-1, 32)])
        s = run[f"hidden_states.{i}"]
        assert (s.tokens, s.count) == (int(mask.sum()) + 18, x.size)
        assert s.min == np.float32(x.min()) and s.max == np.float32(x.max())
        _assert_channels(s, x)


def test_cross_layer_statistics_stay_within_one_stack():
    """R² pairs sites at the same (token, channel): Whisper's encoder frames and decoder tokens are
    not the same tokens, even when as many (12 and 12), so the matrices hold one stack, the
    encoder's, against float64 numpy; a ConvNeXt's stages of other sizes stay out of them too."""
    torch.manual_seed(0)
    model = _whisper()
    g = torch.Generator().manual_seed(5)
    features, ids = torch.randn(2, 16, 24, generator=g), torch.randint(2, 50, (2, 12), generator=g)
    with torch.no_grad():
        out = model(input_features=features, decoder_input_ids=ids, output_hidden_states=True)
    with probe.capture(model, stats=("moments", "cross"), strict=True) as run:
        with torch.no_grad():
            model(input_features=features, decoder_input_ids=ids)
    assert run.cross.sites == [f"encoder_hidden_states.{i}" for i in range(3)]
    x = np.stack([h.double().numpy().reshape(-1) for h in out.encoder_hidden_states])
    np.testing.assert_allclose(run.cross.r2_all, np.corrcoef(x) ** 2, rtol=1e-12, atol=1e-12)
    convnext, size = _convnext()
    with probe.capture(convnext, stats=("moments", "cross"), strict=True) as run:
        with torch.no_grad():
            convnext(pixel_values=torch.randn(2, 3, size, size, generator=g))
    assert run.cross.sites == ["hidden_states.0", "hidden_states.1"]  # the 8-channel 8 x 8 stage


def test_several_stacks_are_told_apart_in_show_and_plot(tmp_path):
    """With an encoder and a decoder, ``--site 1`` names both candidates instead of picking one,
    figure axes label each stack's layers ("enc 1", "dec 1"), and a depth line stops between the
    stacks."""
    from probe.present.plot import _labels, _stack_breaks
    from probe.present.report import resolve_site

    torch.manual_seed(0)
    model = _whisper()
    with probe.capture(model, out=tmp_path / "w.h5", stats=("moments",)) as run:
        with torch.no_grad():
            model(input_features=torch.randn(2, 16, 24), decoder_input_ids=torch.randint(2, 50, (2, 6)))
    run = probe.load(tmp_path / "w.h5")
    with pytest.raises(probe.ProbeError, match=r"several stacks have a layer 1 \(encoder_hidden_states.1, "
                                               r"decoder_hidden_states.1\)"):
        resolve_site(run, "1")
    assert resolve_site(run, "decoder_hidden_states.1") == "decoder_hidden_states.1"
    labels, title = _labels(run.sites)
    assert labels == ["enc 0", "enc 1", "enc 2", "dec 0", "dec 1", "dec 2"]
    assert title == "layer (enc = encoder_hidden_states, dec = decoder_hidden_states)"
    x, (y,), cuts = _stack_breaks(np.arange(6), run.sites, np.arange(6.0) * 10)
    assert cuts == [2.5] and x.tolist() == [0, 1, 2, 2.5, 3, 4, 5]
    assert np.isnan(y[3]) and np.array_equal(np.delete(y, 3), np.arange(6.0) * 10)
