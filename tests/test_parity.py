"""Parity with ``output_hidden_states=True``: the same tensors, reduced by probe, equal float64
numpy over HF's own tensors (count exact, mean/std within 1e-6 relative, min/max exact)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import probe
from conftest import FAMILIES, batch


def _reference(hidden, mask, position, skip_first):
    keep = mask.bool() & (position >= skip_first)
    return [h[keep].double().numpy() for h in hidden]


def _positions(mask):
    return mask.long().cumsum(-1) - 1


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


def check_parity(model, ids, mask, skip_first, guard=None):
    import contextlib

    call = dict(input_ids=ids, attention_mask=mask)
    with torch.no_grad():  # first, so that transformers installs its own hooks before the guard
        ref = model(**call, output_hidden_states=True).hidden_states
    with guard(model) if guard else contextlib.nullcontext():
        with probe.capture(model, skip_first=skip_first, strict=True, stats=("moments", "position")) as run:
            with torch.no_grad():
                model(**call)
    assert run.sites == [f"hidden_states.{i}" for i in range(len(ref))]
    position = _positions(mask) if mask is not None else torch.arange(ids.shape[1]).expand_as(ids)
    m = mask if mask is not None else torch.ones_like(ids)
    worst = 0.0
    for name, x in zip(run.sites, _reference(ref, m, position, skip_first)):
        s = run[name]
        assert s.count == x.size
        assert s.tokens == x.shape[0]
        assert s.min == x.min() and s.max == x.max() and s.absmax == np.abs(x).max()
        errs = [_rel(s.mean, x.mean()), _rel(s.std, x.std())]
        errs += [np.max(np.abs(s.channel.mean - x.mean(0)) / np.maximum(np.abs(x.mean(0)), 1e-300))]
        assert max(errs) <= 1e-6, (name, errs)
        np.testing.assert_array_equal(s.channel.min, x.min(0))
        np.testing.assert_array_equal(s.channel.max, x.max(0))
        np.testing.assert_allclose(s.channel.std, x.std(0), rtol=1e-6)
        worst = max(worst, *errs)
    # per-position stats cover every real token, skip_first or not
    last = run[run.sites[-1]]
    all_real = ref[-1][m.bool()].double().numpy()
    pos = position[m.bool()].numpy()
    for p in range(min(4, len(last.position))):
        sel = all_real[pos == p]
        assert last.position.tokens[p] == sel.shape[0]
        np.testing.assert_allclose(last.position.mean[p], sel.mean(), rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(last.position.std[p], sel.std(), rtol=1e-6)
        assert last.position.absmax[p] == np.abs(sel).max()
    return worst


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pad", [None, "right", "left"])
@pytest.mark.parametrize("skip_first", [0, 1])
def test_hidden_states_parity(tiny, family, pad, skip_first, assert_hooks_restored):
    model = tiny(family)
    ids, mask = batch(3, 9, pad)
    check_parity(model, ids, mask, skip_first, assert_hooks_restored)


def test_tie_uses_final_norm(tiny):
    """The last site is the final-norm output, not the last block's output."""
    model = tiny("llama")
    with torch.no_grad():
        hs = model(input_ids=batch()[0], output_hidden_states=True).hidden_states
        block_out = model.model.layers[-1](hs[-2], position_embeddings=model.model.rotary_emb(hs[-2],
                                           torch.arange(hs[-2].shape[1])[None]))
    assert not torch.allclose(block_out if isinstance(block_out, torch.Tensor) else block_out[0], hs[-1])
    sites = probe.capture(model)._defs
    # transformers' registry (read "last_hidden_state") or discovery (the same field of the output)
    assert sites[-1].module == "model" and "last_hidden_state" in (sites[-1].read, sites[-1].index)
    assert (sites[0].module, sites[0].read) in (("model.layers.0", "input"), ("model.embed_tokens", "output"))


def test_no_mask_and_position_ids(tiny):
    model = tiny("llama")
    ids, _ = batch(2, 6)
    with probe.capture(model, stats=("position",)) as run:
        with torch.no_grad():
            model(input_ids=ids, position_ids=torch.arange(10, 16)[None])
    p = run["hidden_states.1"].position
    assert list(np.flatnonzero(p.tokens)) == list(range(10, 16))


def test_kv_cache_decode_lands_at_true_position(tiny):
    model = tiny("llama")
    ids, _ = batch(1, 5)
    with probe.capture(model, stats=("position",)) as run:
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True,
                  attention_mask=torch.ones(1, 6, dtype=torch.long))
    assert list(run["hidden_states.2"].position.tokens) == [1] * 6


def test_positional_mask_is_read(tiny):
    """attention_mask passed positionally is found through the forward signature."""
    model = tiny("bert")
    ids, mask = batch(2, 7, "right")
    with probe.capture(model, stats=("moments",)) as run:
        with torch.no_grad():
            model(ids, mask)
    assert run["hidden_states.1"].tokens == int(mask.sum())


def test_custom_sites(tiny):
    model = tiny("llama")
    ids, mask = batch(2, 7, "right")
    with torch.no_grad():
        ref = {}
        h = model.model.layers[1].mlp.register_forward_hook(lambda m, a, o: ref.setdefault("mlp", o))
        model(input_ids=ids, attention_mask=mask)
        h.remove()
    with probe.capture(model, sites=["model.layers.*.mlp", "model.norm"], stats=("moments",)) as run:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    assert run.sites == ["model.layers.0.mlp", "model.layers.1.mlp", "model.norm"]
    x = ref["mlp"][mask.bool()].double().numpy()
    assert run["model.layers.1.mlp"].count == x.size
    assert _rel(run["model.layers.1.mlp"].std, x.std()) < 1e-6
    by_callable = probe.capture(model, sites=lambda name, m: name.endswith("self_attn"))
    assert by_callable.sites == ["model.layers.0.self_attn", "model.layers.1.self_attn"]


def test_structural_fallback():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return x + self.lin(x)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(Block() for _ in range(3))

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    net = Net()
    x = torch.randn(2, 5, 4)
    with probe.capture(net, stats=("moments",)) as run:
        with torch.no_grad():
            net(x)
    assert run.sites == [f"hidden_states.{i}" for i in range(4)]
    assert run["hidden_states.0"].max == x.max().item()


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_registry_fallback_parity(tiny, family, monkeypatch):
    """Where discovery cannot run (a model needing other inputs), transformers' recorder registry
    gives the sites; here it is forced on models discovery would handle, and is exact as well."""
    from probe.capture import sites as sites_mod

    monkeypatch.setattr(sites_mod, "discover", lambda model: (None, "forced off"))
    model = tiny(family)
    defs = probe.capture(model)._defs
    if not defs or defs[0].source != "registry":
        pytest.skip("this transformers release exposes no recorder registry probe can read")
    ids, mask = batch(3, 9, "left")
    check_parity(model, ids, mask, 0)
