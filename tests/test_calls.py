"""Ways a model is driven besides ``model(**batch)``: its ``forward`` called directly,
``inputs_embeds``, static caches and 4-D masks, other threads, a Trainer that raises. Each is
checked against float64 numpy on what ``output_hidden_states=True`` returns for the same call."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import transformers as T

import probe
from conftest import VOCAB, batch, hook_state

STATS = ("moments", "position", "histogram")


def _base(kind: str, attn: str | None = None):
    torch.manual_seed(0)
    if kind == "llama":
        config = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=VOCAB)
        cls = T.LlamaModel
    elif kind == "gpt2":
        config = T.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=VOCAB)
        cls = T.GPT2Model
    else:
        config = T.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              vocab_size=VOCAB)
        cls = T.BertModel
    if attn is not None:
        config._attn_implementation = attn
    return cls(config).eval()


def _calls():
    return [batch(3, 9, "right", seed=0), batch(3, 9, "left", seed=1), batch(2, 7, "left", seed=2)]


def _check(run, chunks, names=None):
    """Every site against float64 numpy over the real tokens of ``chunks`` ([(hidden tuple, mask)])."""
    names = names or [f"hidden_states.{i}" for i in range(len(chunks[0][0]))]
    for i, name in enumerate(names):
        x = np.concatenate([h[i][m.bool()].double().numpy() for h, m in chunks])
        s = run[name]
        assert (s.tokens, s.count) == (x.shape[0], x.size), name
        assert s.min == np.float32(x.min()) and s.max == np.float32(x.max()), name
        assert abs(s.mean - x.mean()) <= 1e-6 * abs(x.mean()) + 1e-12, name
        assert abs(s.std - x.std()) <= 1e-6 * x.std(), name


def _reference(model, calls, **extra):
    with torch.no_grad():
        return [(model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **extra).hidden_states, mask)
                for ids, mask in calls]


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_forward_called_directly_equals_call(kind):
    """``model.forward(...)`` (sentence-transformers' way) skips the model's own hooks: the forward
    still begins and ends, reads the padding, and the sites keep matching forward after forward."""
    model = _base(kind)
    calls = _calls()
    chunks = _reference(model, calls)
    runs = []
    for direct in (True, False):
        with probe.capture(model, stats=STATS, strict=True, skip_first=1) as run:
            with torch.no_grad():
                for ids, mask in calls:
                    (model.forward if direct else model)(input_ids=ids, attention_mask=mask)
        runs.append(run)
    direct, called = runs
    for name in called.sites:
        a, b = direct[name], called[name]
        assert (a.count, a.tokens, a.min, a.max) == (b.count, b.tokens, b.min, b.max), name
        np.testing.assert_allclose([a.mean, a.std, a.kurtosis], [b.mean, b.std, b.kurtosis], rtol=1e-12)
        np.testing.assert_array_equal(a.position.tokens, b.position.tokens)  # positions over the mask
        np.testing.assert_array_equal(a.histogram_counts, b.histogram_counts)
    with probe.capture(model, stats=("moments",), strict=True) as run:
        with torch.no_grad():
            for ids, mask in calls:
                model.forward(input_ids=ids, attention_mask=mask)
    _check(run, chunks)


def test_forward_called_directly_after_one_that_raised():
    model = _base("llama")
    calls = _calls()
    with probe.capture(model, stats=("moments",), strict=True) as run:
        with torch.no_grad():
            model.forward(input_ids=calls[0][0], attention_mask=calls[0][1])
            boom = model.layers[1].register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
            with pytest.raises(RuntimeError, match="boom"):
                model.forward(input_ids=calls[1][0], attention_mask=calls[1][1])
            boom.remove()
            # known when the first layer is called more often than in a whole forward
            with pytest.warns(UserWarning, match="stopped before it finished"):
                model.forward(input_ids=calls[2][0], attention_mask=calls[2][1])
    _check(run, _reference(model, [calls[0], calls[2]]))


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_inputs_embeds_records_hidden_states_0(kind):
    """``hidden_states.0`` is the first layer's input, so it is there without the embedding."""
    model = _base(kind)
    calls = _calls()
    embeds = [model.get_input_embeddings()(ids).detach() for ids, _ in calls]
    with torch.no_grad():
        chunks = [(model(inputs_embeds=e, attention_mask=m, output_hidden_states=True).hidden_states, m)
                  for e, (_, m) in zip(embeds, calls)]
    with probe.capture(model, stats=("moments",), strict=True) as run:
        with torch.no_grad():
            for e, (_, mask) in zip(embeds, calls):
                model(inputs_embeds=e, attention_mask=mask)
    _check(run, chunks)
    assert probe.capture(model)._defs[0].read == "input"


def _generate_reference(model, ids_or_embeds, mask, **kw):
    key = "inputs_embeds" if ids_or_embeds.is_floating_point() else "input_ids"
    with torch.no_grad():
        out = model.generate(**{key: ids_or_embeds}, attention_mask=mask, max_new_tokens=4, do_sample=False,
                             pad_token_id=0, output_hidden_states=True, return_dict_in_generate=True, **kw)
    b = mask.shape[0]
    # step 0 is the prefill over the prompt's real tokens; every decode step adds one real token per row
    return [(step, mask if k == 0 else torch.ones(b, 1, dtype=torch.long)) for k, step in enumerate(out.hidden_states)]


def _generated(model, ids_or_embeds, mask, **kw):
    key = "inputs_embeds" if ids_or_embeds.is_floating_point() else "input_ids"
    with probe.capture(model, stats=("moments",), strict=True) as run:
        with torch.no_grad():
            model.generate(**{key: ids_or_embeds}, attention_mask=mask, max_new_tokens=4, do_sample=False,
                           pad_token_id=0, **kw)
    return run


def test_generate_from_inputs_embeds(tiny):
    model = tiny("llama")
    ids, mask = batch(2, 7, "left")
    embeds = model.get_input_embeddings()(ids).detach()
    chunks = _generate_reference(model, embeds, mask)
    run = _generated(model, embeds, mask)
    _check(run, chunks)
    assert run["hidden_states.0"].tokens == run["hidden_states.2"].tokens == int(mask.sum()) + 2 * 3


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generate_with_a_static_cache(tiny, attn):
    """generate builds a 4-D mask over the whole static cache: its diagonal says which tokens are real."""
    model = tiny("llama")
    model.config._attn_implementation = attn
    ids, mask = batch(2, 7, "left")
    chunks = _generate_reference(model, ids, mask, cache_implementation="static")
    run = _generated(model, ids, mask, cache_implementation="static")
    _check(run, chunks)
    assert run["hidden_states.1"].tokens == int(mask.sum()) + 2 * 3
    assert not run.result.meta["disabled"]


def _packed(t: int, split: int, dtype=torch.bool):
    """One row holding two sequences, ``[0, split)`` and ``[split, t)``, the last token padding:
    a block-diagonal causal mask (boolean True = attend, or additive)."""
    i = torch.arange(t)
    seq = (i >= split).long()
    attend = (i[None, :] <= i[:, None]) & (seq[None, :] == seq[:, None])
    attend[:, t - 1] = False
    attend[t - 1, :] = False
    if dtype == torch.bool:
        return attend[None, None], torch.cat([torch.ones(t - 1), torch.zeros(1)]).long()[None]
    add = torch.zeros(t, t).masked_fill(~attend, torch.finfo(dtype).min)
    return add[None, None].to(dtype), torch.cat([torch.ones(t - 1), torch.zeros(1)]).long()[None]


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_a_user_4d_mask(dtype):
    """A packed block-diagonal 4-D mask: the real tokens are its diagonal, positions restart."""
    model = _base("llama", attn="eager" if dtype != torch.bool else None)
    t, split = 9, 4
    m4, real = _packed(t, split, dtype)
    ids = torch.randint(3, VOCAB, (1, t), generator=torch.Generator().manual_seed(5))
    position_ids = torch.cat([torch.arange(split), torch.arange(t - split)])[None]
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=m4, position_ids=position_ids,
                       output_hidden_states=True).hidden_states
    for kw in (dict(position_ids=position_ids), {}):
        with probe.capture(model, stats=("moments", "position"), strict=True) as run:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=m4, **kw)
        if kw:
            _check(run, [(hidden, real)])
        # without position_ids, positions are counted over the mask: they restart at the second sequence
        expected = np.bincount(np.r_[np.arange(split), np.arange(t - 1 - split)], minlength=split)
        counts = run["hidden_states.1"].position.tokens
        np.testing.assert_array_equal(counts[:split], expected)
        assert counts.sum() == t - 1


def test_masks_that_cannot_be_read_are_refused():
    from probe.capture.tokens import CallInputs, TokenContext, read_call

    context = TokenContext(1, 0, 0, 0)
    context.calls["odd"] = CallInputs(torch.ones(2, 1, 3, 6, dtype=torch.bool))  # 3 queries, 6 tokens
    with pytest.raises(probe.ProbeError, match=r"holds 2 x 6 tokens but the 4-D attention_mask is \(2, 1, 3, 6\)"):
        context.tokens("odd", 2, 6, torch.device("cpu"))
    context.calls["short"] = CallInputs(torch.ones(2, 1, 4, 3, dtype=torch.bool))  # 3 keys for 4 queries
    with pytest.raises(probe.ProbeError, match="fewer keys than the 4 queries.*pass cache_position"):
        context.tokens("short", 2, 4, torch.device("cpu"))
    # a sliding-window cache's mask: 8 keys kept, 9 tokens seen before these 2: the queries' keys are the last
    window = torch.zeros(2, 1, 2, 8, dtype=torch.bool)
    window[0, 0, 0, 6] = window[0, 0, 1, 7] = window[1, 0, 1, 7] = True  # row 1's first query is padding
    context.calls["window"] = CallInputs(window, past=9)
    tokens = context.tokens("window", 2, 2, torch.device("cpu"))
    assert tokens.valid.tolist() == [True, True, False, True]

    class BlockMask:  # what flex attention passes: no tensor to read
        shape = (2, 1, 6, 6)

    context.calls["flex"] = read_call({"attention_mask": BlockMask()})
    with pytest.raises(probe.ProbeError, match="BlockMask.*attn_implementation='sdpa'"):
        context.tokens("flex", 2, 6, torch.device("cpu"))


def test_a_forward_on_another_thread_is_ignored(tiny):
    """A forward on another thread, run in the middle of the main thread's forward (as a background
    evaluation or nn.DataParallel's replicas would): ignored, and the main thread's calls all count."""
    model = tiny("llama")
    calls = _calls()
    main = threading.get_ident()
    other_ids, other_mask = batch(4, 5, "right", seed=9)

    def elsewhere(module, args):
        if threading.get_ident() == main:
            worker = threading.Thread(target=lambda: model(input_ids=other_ids, attention_mask=other_mask))
            worker.start()
            worker.join()

    inside = model.model.layers[1].register_forward_pre_hook(elsewhere)
    try:
        with pytest.warns(UserWarning, match="another thread"):
            with probe.capture(model, stats=("moments",), strict=True) as run:
                with torch.no_grad():
                    for ids, mask in calls:
                        model(input_ids=ids, attention_mask=mask)
    finally:
        inside.remove()
    _check(run, _reference(model, calls))


def test_trainer_that_raises_leaves_no_hook(tiny, tmp_path):
    from probe.integrations import ProbeCallback

    model = tiny("gpt2")
    before = hook_state(model)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 97, (8,), generator=g)} for _ in range(12)]
    data = [dict(r, labels=r["input_ids"], attention_mask=torch.ones(8, dtype=torch.long)) for r in rows]
    args = T.TrainingArguments(output_dir=str(tmp_path / "t"), per_device_train_batch_size=2, max_steps=5,
                               report_to=[], logging_steps=100, save_strategy="no", use_cpu=True,
                               disable_tqdm=True)

    class Boom(T.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise RuntimeError("boom at step 3")

    cb = ProbeCallback(out=tmp_path / "train.h5", every=2)
    trainer = T.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb, Boom()])
    with pytest.raises(RuntimeError, match="boom at step 3"):
        trainer.train()
    assert hook_state(model) == before and cb.capture is None
    run = probe.load(tmp_path / "train.h5")
    assert run.steps[0] == 2 and run["hidden_states.1"].tokens == 3 * 2 * 8  # steps 1-3 were recorded


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_direct_forward_reads_nothing_on_the_host(kind, monkeypatch):
    """Opening a forward at its first layer and reading the layer's 4-D mask stays on the device."""
    import functools

    from probe.capture.forward import Forwards
    from probe.stats import _base as stats_base

    monkeypatch.setattr(stats_base, "DENSE_CPU", False)  # the path an accelerator takes
    inside = [0, 0]

    def guard(name, original):
        @functools.wraps(original)
        def wrapper(self, *args, **kwargs):
            if inside[0]:
                raise AssertionError(f"Tensor.{name} called inside a probe hook")
            return original(self, *args, **kwargs)

        return wrapper

    def hooked(method):
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            inside[0] += 1
            inside[1] += 1
            try:
                return method(*args, **kwargs)
            finally:
                inside[0] -= 1

        return wrapper

    model = _base(kind)
    ids, mask = batch(3, 9, "left")
    for name in ("item", "tolist", "__bool__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))
    for name in ("open", "close", "observe"):
        monkeypatch.setattr(Forwards, name, hooked(getattr(Forwards, name)))
    with probe.capture(model, skip_first=1, strict=True, sample_size=16) as run:
        with torch.no_grad():
            model.forward(input_ids=ids, attention_mask=mask)
            model.forward(input_ids=ids, attention_mask=mask)
    monkeypatch.undo()
    assert inside[1] > 2 * len(run.sites)
    assert run["hidden_states.1"].tokens == 2 * (int(mask.sum()) - 3)


def _module_reference(model, calls, names):
    """Each named module's output over the real tokens of ``calls``, from hooks on a plain call."""
    seen: dict[str, list] = {n: [] for n in names}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(
        lambda m, a, out, n=n: seen[n].append(out[0] if isinstance(out, tuple) else out)) for n in names]
    try:
        chunks = []
        for ids, mask in calls:
            for n in names:
                seen[n].clear()
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
            chunks.append((tuple(seen[n][0] for n in names), mask))
    finally:
        for h in handles:
            h.remove()
    return chunks


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_named_sites_under_a_direct_forward_read_the_mask(kind):
    """Modules named in ``sites=`` under ``model.forward(...)``: the forward is followed through the
    model's frame, so its mask is read (left- and right-padded calls), and each forward counts once."""
    model = _base(kind)
    calls = _calls()
    glob = "layers.*.mlp" if kind == "llama" else "encoder.layer.*.intermediate"
    before = hook_state(model)
    with probe.capture(model, sites=[glob], stats=("moments",), strict=True) as run:
        with torch.no_grad():
            for ids, mask in calls:
                model.forward(input_ids=ids, attention_mask=mask)
            run.snapshot()
            model.forward(input_ids=calls[0][0], attention_mask=calls[0][1])
    assert hook_state(model) == before
    names = list(run.sites)
    assert len(names) == 2
    chunks = _module_reference(model, calls + calls[:1], names)
    _check(run, chunks, names)
    assert run.steps == [3, 4]  # the fourth forward was settled at exit, as its own window
    # default sites and a named one together: the order is unknown, the frame still says it
    with probe.capture(model, sites=["hidden_states", glob], stats=("moments",), strict=True) as run:
        with torch.no_grad():
            for ids, mask in calls:
                model.forward(input_ids=ids, attention_mask=mask)
    _check(run, _reference(model, calls))
    _check(run, _module_reference(model, calls, names), names)
    # a schedule skipping every second forward: each skipped one ends with its frame too
    with probe.capture(model, sites=[glob], stats=("moments",), strict=True, schedule=lambda n: n % 2 == 0) as run:
        with torch.no_grad():
            for ids, mask in calls:
                model.forward(input_ids=ids, attention_mask=mask)
    _check(run, _module_reference(model, calls[::2], names), names)


@pytest.mark.parametrize("sites", ["hidden_states", "layers.*.mlp"])
def test_direct_forward_that_raises_on_its_first_call(sites):
    """The first ``model.forward`` raises half-way: it is left out whole, with one warning."""
    model = _base("llama")
    calls = _calls()
    with probe.capture(model, sites=sites, stats=("moments",), strict=True) as run:
        with torch.no_grad():
            boom = model.layers[1].register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
            with pytest.raises(RuntimeError, match="boom"):
                model.forward(input_ids=calls[0][0], attention_mask=calls[0][1])
            boom.remove()
            with pytest.warns(UserWarning, match="stopped before it finished") as caught:
                for ids, mask in calls[1:]:
                    model.forward(input_ids=ids, attention_mask=mask)
    assert sum("stopped before it finished" in str(w.message) for w in caught) == 1
    names = list(run.sites)
    chunks = (_reference(model, calls[1:]) if sites == "hidden_states"
              else _module_reference(model, calls[1:], names))
    _check(run, chunks, names)


@pytest.mark.parametrize("pad", ["right", "left"])
def test_a_head_that_does_not_pass_the_mask_on(pad):
    """``RwkvForCausalLM`` passes its base model the ids but not the mask (RWKV does not use it):
    the head's call still says which of those very tokens are padding, as for the base model."""
    torch.manual_seed(0)
    config = T.RwkvConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                          intermediate_size=64, context_length=64)
    model = T.RwkvForCausalLM(config).eval()
    calls = [batch(3, 9, pad, seed=0), batch(2, 7, pad, seed=1)]
    with torch.no_grad():
        chunks = [(model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states, mask)
                  for ids, mask in calls]
    for direct in (False, True):
        with probe.capture(model, stats=("moments",), strict=True) as run:
            with torch.no_grad():
                for ids, mask in calls:
                    (model.forward if direct else model)(input_ids=ids, attention_mask=mask)
        _check(run, chunks)
        real = sum(int(m.sum()) for _, m in calls)
        assert run["hidden_states.2"].tokens == real < sum(m.numel() for _, m in calls)


def test_sequence_first_encoder_layers_as_named_sites():
    """``nn.TransformerEncoder`` without ``batch_first``: its layers' ``[sequence, batch, D]`` outputs
    are read batch-major through ``src_key_padding_mask``, so padding is left out and ``skip_first``
    drops each row's first token, not batch row 0."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0)
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    calls = [(torch.randn(7, 3, 16), batch(3, 7, "right", seed=0)[1]),
             (torch.randn(5, 2, 16), batch(2, 5, "left", seed=1)[1])]
    names = ["layers.0", "layers.1"]
    seen: dict[str, list] = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: seen[n].append(out))
               for n in names]
    with torch.no_grad():
        for src, mask in calls:
            model(src, src_key_padding_mask=mask == 0)
    for h in handles:
        h.remove()
    chunks = [(tuple(seen[n][k].transpose(0, 1) for n in names), mask) for k, (_, mask) in enumerate(calls)]
    for skip in (0, 1):
        with probe.capture(model, sites=names, stats=("moments", "position"), strict=True,
                           skip_first=skip) as run:
            with torch.no_grad():
                for src, mask in calls:
                    model(src, src_key_padding_mask=mask == 0)
        if skip == 0:
            _check(run, chunks, names)
            # positions over each row's real tokens: right padding 0..n-1, left padding too
            expected = np.bincount(np.concatenate([np.arange(int(n)) for _, m in calls for n in m.sum(1)]))
            np.testing.assert_array_equal(run["layers.1"].position.tokens[:len(expected)], expected)
        else:
            assert run["layers.1"].tokens == sum(int(m.sum()) - m.shape[0] for _, m in calls)
    # a square batch (4 x 4, padded): the layers' batch_first says it
    src, mask = torch.randn(4, 4, 16), batch(4, 4, "right", seed=2)[1]
    assert int(mask.sum()) < mask.numel()
    seen["layers.1"].clear()
    handle = model.layers[1].register_forward_hook(lambda m, a, out: seen["layers.1"].append(out))
    with torch.no_grad():
        model(src, src_key_padding_mask=mask == 0)
    handle.remove()
    with probe.capture(model, sites=["layers.1"], stats=("moments",), strict=True) as run:
        with torch.no_grad():
            model(src, src_key_padding_mask=mask == 0)
    _check(run, [((seen["layers.1"][0].transpose(0, 1),), mask)], ["layers.1"])


def _xlnet():
    torch.manual_seed(0)
    config = T.XLNetConfig(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=2, d_inner=64)
    return T.XLNetModel(config).eval()


def test_xlnet_layers_as_named_sites():
    """XLNet's layers run ``[sequence, batch, D]``: read batch-major against ``output_hidden_states``;
    a square batch cannot be told apart and is refused in one line."""
    model = _xlnet()
    calls = [batch(3, 9, "right", seed=0), batch(2, 7, "left", seed=1)]
    chunks = _reference(model, calls)
    with probe.capture(model, sites=["layer.0", "layer.1"], stats=("moments",), strict=True) as run:
        with torch.no_grad():
            for ids, mask in calls:
                model(input_ids=ids, attention_mask=mask)
    assert run.sites == ["layer.0", "layer.1"]
    _check(run, [(h[1:], m) for h, m in chunks], ["layer.0", "layer.1"])
    ids, mask = batch(4, 4, "right", seed=3)
    with pytest.raises(probe.ProbeError, match=r"batch size and sequence length are both 4.*pad the batch"):
        with probe.capture(model, sites=["layer.0", "layer.1"], strict=True):
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("head", [False, True])
def test_audio_sample_mask_becomes_a_frame_mask(head):
    """A padded clip's ``attention_mask`` covers its samples; the states are frames: the frames' mask
    is the model's own (``_get_feature_vector_attention_mask``), in forward and called directly."""
    torch.manual_seed(0)
    config = T.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                              conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                              num_conv_pos_embedding_groups=2, feat_extract_norm="layer", do_stable_layer_norm=True,
                              vocab_size=12)
    model = (T.Wav2Vec2ForCTC if head else T.Wav2Vec2Model)(config).eval()
    base = model.wav2vec2 if head else model
    g = torch.Generator().manual_seed(1)
    clips = []
    for b, samples, real in ((2, 400, (400, 250)), (3, 320, (320, 200, 90))):
        values, mask = torch.randn(b, samples, generator=g), torch.zeros(b, samples, dtype=torch.long)
        for row, n in enumerate(real):
            mask[row, :n] = 1
            values[row, n:] = 0.0
        clips.append((values, mask))
    chunks = []
    with torch.no_grad():
        for values, mask in clips:
            hidden = model(values, attention_mask=mask, output_hidden_states=True).hidden_states
            chunks.append((hidden, base._get_feature_vector_attention_mask(hidden[0].shape[1], mask)))
    assert all(int(m.sum()) < m.numel() for _, m in chunks)
    for direct in (False, True):
        with probe.capture(model, stats=("moments",), strict=True) as run:
            with torch.no_grad():
                for values, mask in clips:
                    (model.forward if direct else model)(values, attention_mask=mask)
        _check(run, chunks)


def _head_llama(attn: str = "eager"):
    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=VOCAB, attn_implementation=attn)
    return T.LlamaForCausalLM(config).eval()


def test_head_model_direct_forward_hidden_states_with_named_sites():
    """``LlamaForCausalLM.forward(...)`` with the default sites and a named glob: the base model's
    pre-hook opens the forward, which is the head's frame's, so the named modules (read in the
    head's own call) also count only real tokens (left- and right-padded), and each forward once."""
    model = _head_llama()
    calls = _calls()
    names = ["model.layers.0.mlp", "model.layers.1.mlp"]
    with probe.capture(model, sites=["hidden_states", "model.layers.*.mlp"], stats=STATS, strict=True,
                       every=1) as run:
        with torch.no_grad():
            for ids, mask in calls:
                model.forward(input_ids=ids, attention_mask=mask)
    assert list(run.sites) == [f"hidden_states.{i}" for i in range(3)] + names
    _check(run, _reference(model, calls))
    _check(run, _module_reference(model, calls, names), names)
    assert run.steps == [1, 2, 3]  # one window a forward: each forward counted once


def test_head_model_direct_forward_hidden_states_with_attention():
    """``sites=["hidden_states", "attention"]`` under ``LlamaForCausalLM.forward(...)``: the
    attention sites read the head's mask (no site is disabled), exact against float64 numpy."""
    from test_attention import batch as attention_batch
    from test_attention import check_site, reference_qk, reference_stats

    model = _head_llama()
    for side in ("left", "right"):
        inputs = attention_batch(side)
        refs = reference_qk(model, inputs)
        with probe.capture(model, sites=["hidden_states", "attention"], stats=STATS) as run:
            with torch.no_grad():
                model.forward(**inputs)
        assert run.meta["disabled"] == {}
        assert sorted(n for n in run.sites if n.endswith(":attention")) == sorted(p + ":attention" for p in refs)
        mask = inputs["attention_mask"]
        _check(run, _reference(model, [(inputs["input_ids"], mask)], position_ids=inputs.get("position_ids")))
        for path, (q, k, scale) in refs.items():
            ref = reference_stats(q, k, scale, mask.numpy(), inputs["input_ids"].numpy())
            check_site(run[path + ":attention"].state("attention"), ref)


def test_head_model_direct_forward_hidden_states_with_moe():
    """``sites=["hidden_states", "moe"]`` under ``MixtralForCausalLM.forward(...)``: routers,
    experts and down projections count only real tokens (left- and right-padded), exact against
    float64 numpy, none disabled."""
    from test_moe import _batches, _check_down, _check_experts, _check_router, _mixtral, _Tape
    from test_moe import _reference as _moe_reference

    model = _mixtral()
    batches = _batches(3, 5)
    tape = _Tape(model)
    try:
        tape.run(model, batches)
    finally:
        tape.remove()
    with probe.capture(model, sites=["hidden_states", "moe"], every=1) as run:
        with torch.no_grad():
            for ids, mask in batches:
                model.forward(input_ids=ids, attention_mask=mask)
    assert run.meta["disabled"] == {}
    assert run.steps == [1, 2, 3]
    _check(run, _reference(model, batches))
    for i, layer in enumerate(tape.layers):
        ref = _moe_reference(tape, i, normalized=True)
        _check_router(run[layer.router + ":router"].state("router"), ref)
        _check_experts(run[layer.experts + ":experts"].experts, ref)
        _check_down(run[layer.experts + ":down_proj"].experts, ref)
