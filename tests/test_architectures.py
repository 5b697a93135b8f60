"""Models and calling patterns outside the decoder-only mainstream: each gives the numbers
``output_hidden_states=True`` gives (float64 numpy on HF's own tensors), or one clear refusal."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import transformers as T

import probe
from conftest import VOCAB, batch
from zoo import compare


def _padded():
    ids, mask = batch(3, 8, "right")
    return ids, mask


def _check_stack(run, hidden, mask, prefix):
    assert [s for s in run.sites if s.startswith(prefix + ".")] == [f"{prefix}.{i}" for i in range(len(hidden))]
    for i, h in enumerate(hidden):
        x = h[mask.bool()].double().numpy()
        s = run[f"{prefix}.{i}"]
        assert s.count == x.size and s.tokens == x.shape[0]
        assert s.min == np.float32(x.min()) and s.max == np.float32(x.max())
        assert abs(s.mean - x.mean()) <= 1e-6 * abs(x.mean()) + 1e-12
        assert abs(s.std - x.std()) <= 1e-6 * x.std()


def _capture(model, call, **kw):
    with probe.capture(model, stats=("moments",), strict=True, **kw) as run:
        with torch.no_grad():
            model(**call)
    return run


def test_inference_mode_equals_no_grad(tiny):
    model = tiny("llama")
    ids, mask = batch(3, 9, "left")
    runs = []
    for ctx in (torch.no_grad, torch.inference_mode):
        with probe.capture(model, strict=True, skip_first=1, sample_size=8) as run:
            with ctx():
                model(input_ids=ids, attention_mask=mask)
            with torch.no_grad():  # a later forward outside inference mode still updates the states
                model(input_ids=ids, attention_mask=mask)
        runs.append(run)
    a, b = runs
    for name in a.sites:
        assert b[name].tokens == a[name].tokens == 2 * (int(mask.sum()) - 3)
        assert b[name].mean == a[name].mean and b[name].std == a[name].std and b[name].max == a[name].max
    np.testing.assert_array_equal(a.cross.r2, b.cross.r2)


def test_falcon_last_entry_is_final_norm():
    torch.manual_seed(0)
    model = T.FalconModel(T.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         vocab_size=VOCAB)).eval()
    ids, mask = _padded()
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    run = _capture(model, dict(input_ids=ids, attention_mask=mask))
    _check_stack(run, hidden, mask, "hidden_states")
    last = [s for s in run.result.meta["sites"] if s["name"] == "hidden_states.2"][0]
    assert (last["module"], last["read"]) in (("ln_f", "output"), ("", "output"))


def test_albert_shared_layer_is_one_site_per_call():
    torch.manual_seed(0)
    model = T.AlbertModel(T.AlbertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                         intermediate_size=64, embedding_size=16, vocab_size=VOCAB)).eval()
    ids, mask = _padded()
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(hidden) == 4
    run = _capture(model, dict(input_ids=ids, attention_mask=mask))
    _check_stack(run, hidden, mask, "hidden_states")
    defs = probe.capture(model)._defs
    assert [d.call for d in defs[1:3]] == [0, 1] and defs[1].module == defs[2].module


def test_t5_encoder_and_decoder_states_use_their_own_masks():
    torch.manual_seed(0)
    model = T.T5Model(T.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=VOCAB)).eval()
    ids, mask = _padded()
    dec = torch.randint(3, VOCAB, (3, 8), generator=torch.Generator().manual_seed(1))
    for dec_mask in (None, batch(3, 8, "right", seed=1)[1].flip(0)):
        call = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        if dec_mask is not None:
            call["decoder_attention_mask"] = dec_mask
        with torch.no_grad():
            out = model(**call, output_hidden_states=True)
        run = _capture(model, call)
        assert run.sites[:3] == [f"encoder_hidden_states.{i}" for i in range(3)]
        _check_stack(run, out.encoder_hidden_states, mask, "encoder_hidden_states")
        _check_stack(run, out.decoder_hidden_states, torch.ones_like(dec) if dec_mask is None else dec_mask,
                     "decoder_hidden_states")


def test_t5_decoder_block_named_by_hand_reads_the_decoder_call():
    torch.manual_seed(0)
    model = T.T5Model(T.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=VOCAB)).eval()
    ids, mask = _padded()
    dec = torch.randint(3, VOCAB, (3, 8))
    dec_mask = torch.ones(3, 8, dtype=torch.long)
    dec_mask[0, 4:] = 0
    for call, want in ((dict(decoder_input_ids=dec), 24), (dict(decoder_input_ids=dec, decoder_attention_mask=dec_mask),
                                                            20)):
        with probe.capture(model, sites=["encoder.block.1", "decoder.block.1"], stats=("moments",),
                           strict=True) as run:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, **call)
        assert int(mask.sum()) != want
        assert run["encoder.block.1"].tokens == int(mask.sum())
        assert run["decoder.block.1"].tokens == want  # the decoder's own mask, or all decoder tokens


def test_nested_tensor_encoder_never_breaks_the_forward():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    x = torch.randn(3, 8, 16)
    _, mask = _padded()
    pad = ~mask.bool()
    with torch.no_grad():
        want = enc(x, src_key_padding_mask=pad)
        ref = []
        hs = [m.register_forward_hook(lambda m, a, o: ref.append(o.to_padded_tensor(0.0, (3, 8, 16))
                                                                  if o.is_nested else o)) for m in enc.layers]
        enc(x, src_key_padding_mask=pad)
        for h in hs:
            h.remove()
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no site disabled, nothing silent
            with probe.capture(enc, stats=("moments",)) as run:
                got = enc(x, src_key_padding_mask=pad)
    assert torch.equal(got.to_padded_tensor(0.0) if got.is_nested else got, want)
    for i, h in enumerate(ref, start=1):
        ref_x = h[mask.bool()].double().numpy()
        s = run[f"hidden_states.{i}"]
        assert s.count == ref_x.size
        assert s.max == np.float32(ref_x.max()) and abs(s.std - ref_x.std()) <= 1e-6 * ref_x.std()


def test_any_hook_input_type_never_breaks_the_forward(tiny):
    """Whatever a site receives (here: a module returning a dict of non-tensors), the forward runs."""

    class Odd(torch.nn.Module):
        def forward(self, x):
            return {"a": "not a tensor"}

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.odd = Odd()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            self.odd(x)
            return self.lin(x)

    net = Net()
    x = torch.randn(2, 3, 4)
    with pytest.warns(UserWarning, match="site 'odd'.*disabled"):
        with probe.capture(net, sites=["odd", "lin"]) as run:
            y = net(x)
    assert torch.equal(y, net(x))
    assert run["lin"].tokens == 6 and "odd" in run.result.meta["disabled"]


def test_squeezebert_layers_that_never_fire_are_found_or_reported():
    torch.manual_seed(0)
    model = T.SqueezeBertModel(T.SqueezeBertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                   intermediate_size=64, embedding_size=32,
                                                   vocab_size=VOCAB)).eval()
    ids, mask = _padded()
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    run = _capture(model, dict(input_ids=ids, attention_mask=mask))  # discovery finds modules that run
    _check_stack(run, hidden, mask, "hidden_states")
    # the encoder calls layer.forward directly: naming those layers records nothing, and probe says so
    with pytest.warns(UserWarning, match=r"2 of 2 sites recorded nothing: encoder.layers.0 \(never fired\)"):
        with probe.capture(model, sites=["encoder.layers.0", "encoder.layers.1"], stats=("moments",)) as run:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
    assert run.result.meta["disabled"]["encoder.layers.1"] == "never fired"


def test_all_padding_site_is_reported(tiny):
    model = tiny("bert")
    ids, _ = batch(2, 5)
    with pytest.warns(UserWarning, match="saw no real token"):
        with probe.capture(model, stats=("moments",)):
            with torch.no_grad():
                model(input_ids=ids, attention_mask=torch.zeros_like(ids))


def test_forward_that_raises_halfway_counts_nowhere(tiny):
    model = tiny("llama")
    ids, mask = batch(2, 6, "right")
    calls = {"n": 0}

    def boom(module, args, output):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.cuda.OutOfMemoryError("simulated")

    with probe.capture(model, strict=True) as run:
        h = model.model.layers[1].register_forward_hook(boom)
        with torch.no_grad():
            with pytest.warns(UserWarning, match="stopped before it finished"):
                with pytest.raises(torch.cuda.OutOfMemoryError):
                    model(input_ids=ids, attention_mask=mask)
            model(input_ids=ids, attention_mask=mask)  # the retry
        h.remove()
    for name in run.sites:
        assert run[name].tokens == int(mask.sum())
    assert run.steps == [2] and len(run.cross.sites) == len(run.sites)


def test_mask_that_cannot_describe_the_tensor_is_refused(tiny):
    model = tiny("llama")
    ids, mask = batch(2, 6)
    with pytest.raises(probe.ProbeError, match=r"attention_mask is 2 x 9.*capture sites that keep"):
        with probe.capture(model, stats=("moments",), strict=True):
            with torch.no_grad():
                model(input_ids=ids, attention_mask=torch.ones(2, 9, dtype=torch.long))


def test_decode_without_mask_positions_continue_after_the_cache(tiny):
    model = tiny("llama")
    ids, _ = batch(1, 5)
    with probe.capture(model, stats=("position",)) as run:
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
            model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
    assert list(run["hidden_states.2"].position.tokens) == [1] * 6


def test_discovery_leaves_the_model_as_it_was(assert_hooks_restored):
    """The discovery forward's own hooks, and those transformers installs on first being asked for
    hidden states, are all gone afterwards."""
    torch.manual_seed(0)
    model = T.T5Model(T.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=VOCAB)).eval()
    ids, mask = _padded()
    rng = torch.random.get_rng_state()
    with assert_hooks_restored(model):
        run = _capture(model, dict(input_ids=ids, attention_mask=mask, decoder_input_ids=ids))
    assert torch.equal(torch.random.get_rng_state(), rng)
    with torch.no_grad():  # transformers still records hidden states when asked
        assert len(model(input_ids=ids, decoder_input_ids=ids, output_hidden_states=True).decoder_hidden_states) == 3
    assert len(run.sites) == 6


def test_site_metadata_says_what_each_site_is():
    torch.manual_seed(0)
    model = T.AlbertModel(T.AlbertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                         intermediate_size=64, embedding_size=16, vocab_size=VOCAB)).eval()
    defs = probe.capture(model)._defs
    assert all(d.source == "discovery" for d in defs)
    assert [d.describe() for d in defs[1:3]] == [
        "encoder.albert_layer_groups.0 call 0 output (discovery)",
        "encoder.albert_layer_groups.0 call 1 output (discovery)"]
    run = _capture(model, dict(input_ids=_padded()[0]))
    meta = {s["name"]: s for s in run.result.meta["sites"]}
    assert meta["hidden_states.2"]["call"] == 1 and meta["hidden_states.2"]["source"] == "discovery"


@pytest.mark.parametrize("kind", ["albert", "t5", "falcon", "squeezebert", "bart", "xlnet", "bloom", "gpt_neo"])
def test_zoo_subset(kind):
    import zoo

    status, detail = zoo.check(kind)
    assert status == "exact", detail


def test_zoo_compare_detects_a_wrong_site(monkeypatch):
    """The zoo comparison can fail: a site shifted by one layer is reported as a mismatch."""
    import zoo

    model = zoo.build("bert")
    call = zoo.inputs(model)
    from probe.capture import sites as sites_mod

    real = sites_mod.hidden_state_sites

    def shifted(m):
        sites = real(m)
        return [sites[0]] + [sites_mod.Site(s.name, sites[1].module, sites[1].read, sites[1].index)
                             for s in sites[1:]]

    monkeypatch.setattr(sites_mod, "hidden_state_sites", shifted)
    status, _ = compare(model, call)
    assert status == "MISMATCH"


def test_encoder_called_on_its_own_is_one_forward_with_its_own_mask():
    torch.manual_seed(0)
    model = T.T5Model(T.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=VOCAB)).eval()
    ids, mask = _padded()
    with torch.no_grad():
        hidden = model.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    with pytest.warns(UserWarning, match=r"3 of 6 sites recorded nothing: decoder_hidden_states.0 \(never fired\)"):
        with probe.capture(model, stats=("moments",), strict=True) as run:
            with torch.no_grad():
                model.encoder(input_ids=ids, attention_mask=mask)
                model.encoder(input_ids=ids, attention_mask=mask)
    for i, h in enumerate(hidden):
        x = h[mask.bool()].double().numpy()
        assert run[f"encoder_hidden_states.{i}"].count == 2 * x.size
        assert run[f"encoder_hidden_states.{i}"].max == np.float32(x.max())


def test_backbone_called_on_its_own_reads_its_own_mask(tiny):
    model = tiny("llama")
    ids, mask = batch(3, 9, "left")
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    with probe.capture(model, stats=("moments",), strict=True) as run:
        with torch.no_grad():
            model.model(input_ids=ids, attention_mask=mask)  # the base model, without the LM head
            model(input_ids=ids, attention_mask=mask)
    for i, h in enumerate(hidden):
        x = h[mask.bool()].double().numpy()
        assert run[f"hidden_states.{i}"].count == 2 * x.size
        assert run[f"hidden_states.{i}"].max == np.float32(x.max())
