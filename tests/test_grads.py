"""``capture(..., grads=True)``: the statistics of ∂loss/∂activation at every site, checked against
autograd's own ``.grad`` of the retained hidden states (``retain_grad()``) in float64 numpy; exact
under gradient accumulation and gradient checkpointing; nothing for forwards without a backward;
the model's own gradients untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import probe
from probe.present.timeline import timeline


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Width-32 models: a second thread only waits (conftest's one_thread)."""


def _model(layers=2):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=97)
    return transformers.LlamaForCausalLM(cfg).train()


def _batch(seed, b=2, t=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, t - 3:] = 0  # right padding: never counted
    return ids, mask


def _reference(model, batches):
    """Per site, float64 [tokens, D] of autograd's .grad over the real tokens, one array per batch."""
    out = []
    for ids, mask in batches:
        model.zero_grad()
        res = model(input_ids=ids, attention_mask=mask, labels=ids, output_hidden_states=True)
        for h in res.hidden_states:
            h.retain_grad()
        res.loss.backward()
        keep = mask.bool().numpy()
        out.append([h.grad.double().numpy()[keep] for h in res.hidden_states])
    model.zero_grad()
    return out


def _check(view, g, skip=0):
    """One site's gradient view against float64 ``g[tokens, D]`` (real tokens, first ``skip`` of
    each sequence already removed when ``skip``)."""
    assert view.count == g.size and view.tokens == g.shape[0]
    assert view.absmax == np.abs(g).max()  # exact: float32 values
    np.testing.assert_allclose(view.mean, g.mean(), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(view.std, g.std(), rtol=1e-6)
    d = g - g.mean()
    np.testing.assert_allclose(view.kurtosis, (d ** 4).mean() / (d ** 2).mean() ** 2 - 3, rtol=1e-5)
    np.testing.assert_allclose(view.channel.mean, g.mean(0), rtol=1e-7, atol=1e-12)
    norms = np.linalg.norm(g, axis=1)
    np.testing.assert_allclose(view.norm.mean, norms.mean(), rtol=1e-6)
    assert view.norm.max == pytest.approx(norms.max(), rel=1e-6)
    q = view.abs_quantile(0.99)
    a = np.abs(g).ravel()
    lo, hi = np.quantile(a, 0.99, method="lower"), np.quantile(a, 0.99, method="higher")
    assert lo * (1 - 2 ** -7) <= q <= hi * (1 + 2 ** -7)


def test_grads_equal_autograd_retain_grad(tmp_path):
    model = _model()
    batches = [_batch(0)]
    want = _reference(model, batches)[0]
    params = []
    with probe.capture(model, out=tmp_path / "g.h5", grads=True) as c:
        ids, mask = batches[0]
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        params = [p.grad.clone() for p in model.parameters()]
    run = probe.load(tmp_path / "g.h5")
    assert run.sites[3:] == [f"hidden_states.{i}@grad" for i in range(3)]
    for i, g in enumerate(want):
        for r in (run, c.result):
            view = r[f"hidden_states.{i}"].grad
            assert view is r[f"hidden_states.{i}@grad"]
            _check(view, g)
        # the top-k: the largest |gradient| and where it sits
        t = run[f"hidden_states.{i}"].grad.topk
        assert abs(t["value"][0]) == np.abs(g).max()
    # the model's own gradients are bitwise those of a run without probe
    model.zero_grad()
    ids, mask = batches[0]
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert all(torch.equal(p.grad, q) for p, q in zip(model.parameters(), params))


def test_gradient_accumulation_windows_and_merge():
    model = _model()
    batches = [_batch(1), _batch(2), _batch(3)]
    want = _reference(model, batches)
    with probe.capture(model, grads=True, every=1) as per:
        for ids, mask in batches:  # accumulate: three forwards and backwards, then one step
            model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    with probe.capture(model, grads=True) as whole:
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    model.zero_grad()
    assert per.steps == [1, 2, 3]
    for k, step in enumerate(per.steps):  # each window holds its own forward's gradient
        for i, g in enumerate(want[k]):
            _check(per.at(step)[f"hidden_states.{i}"].grad, g)
    for i in range(3):
        _check(whole.result[f"hidden_states.{i}"].grad, np.concatenate([w[i] for w in want]))


def test_skip_first_applies_to_gradients():
    model = _model()
    ids, mask = _batch(4)
    want = _reference(model, [(ids, mask)])[0]
    first = np.zeros(mask.shape, dtype=bool)
    first[:, 0] = True
    keep = ~first[mask.bool().numpy()]  # real tokens past position 0
    with probe.capture(model, grads=True, skip_first=1) as c:
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    model.zero_grad()
    for i, g in enumerate(want):
        view = c.result[f"hidden_states.{i}"].grad
        assert view.count == g[keep].size
        assert view.absmax == np.abs(g[keep]).max()
        np.testing.assert_allclose(view.std, g[keep].std(), rtol=1e-6)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_counts_once(reentrant):
    batches = [_batch(5)]
    want = _reference(_model(), batches)[0]
    model = _model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    with probe.capture(model, grads=True) as c:
        ids, mask = batches[0]
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    for i, g in enumerate(want):
        _check(c.result[f"hidden_states.{i}"].grad, g)
    assert c.result["hidden_states.1"].tokens == int(batches[0][1].sum())  # activations counted once


def test_eval_forwards_record_no_gradient():
    model = _model().eval()
    ids, mask = _batch(6)
    with probe.capture(model, grads=True, every=1) as c:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        model(input_ids=ids, attention_mask=mask)  # grad mode, never backpropagated
    assert c.steps == [1, 2]
    for step in c.steps:
        w = c.at(step)
        assert w["hidden_states.1"].tokens == int(mask.sum())
        assert w["hidden_states.1"].grad.count == 0


def test_timeline_reads_gradient_series():
    model = _model()
    batches = [_batch(10 + k) for k in range(3)]
    want = _reference(model, batches)
    with probe.capture(model, grads=True, every=1) as c:
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    model.zero_grad()
    tl = timeline(c.result)
    assert tl.sites == ["hidden_states.0", "hidden_states.1", "hidden_states.2"]  # gradients are series, not sites
    for k in range(3):
        for i in range(3):
            assert tl.series["grad_absmax"][f"hidden_states.{i}"][k] == np.abs(want[k][i]).max()


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_sites_inside_a_layer(reentrant):
    """A submodule's output inside a checkpointed layer: non-reentrant checkpointing keeps the first
    forward's graph, so its gradient is recorded once and equals the run without checkpointing;
    reentrant checkpointing makes it under no_grad, so it records none (documented)."""
    sites = ["hidden_states", "model.layers.*.mlp"]
    ids, mask = _batch(7)

    def run(checkpointing):
        model = _model()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        with probe.capture(model, grads=True, sites=sites) as c:
            model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        return c.result

    plain, ckpt = run(False), run(True)
    for name in plain.sites:
        if name.endswith("@grad"):
            continue
        a, b = plain[name].grad, ckpt[name].grad
        assert a.count > 0
        if reentrant and ".mlp" in name:
            assert b.count == 0
            continue
        assert (b.count, b.absmax) == (a.count, a.absmax), name
        np.testing.assert_allclose(b.std, a.std, rtol=1e-6)


def test_trainer_callback_grads_and_tensorboard(tmp_path):
    """ProbeCallback(grads=True): each optimizer step's window holds the gradients of its two
    accumulated micro-batches; the TensorBoard export carries them as sites of their own."""
    from probe.export.tensorboard import write_tensorboard
    from probe.integrations import ProbeCallback

    model = _model()
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 97, (8,), generator=g) for _ in range(8)]
    data = [{"input_ids": r, "labels": r, "attention_mask": torch.ones(8, dtype=torch.long)} for r in rows]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "t"), per_device_train_batch_size=2,
                                          gradient_accumulation_steps=2, max_steps=2, report_to=[],
                                          logging_steps=100, save_strategy="no", use_cpu=True, disable_tqdm=True)
    cb = ProbeCallback(out=tmp_path / "train.h5", every=1, grads=True)
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()
    run = probe.load(tmp_path / "train.h5")
    assert run.steps == [1, 2]
    for step in run.steps:
        w = run.at(step)["hidden_states.1"]
        assert w.tokens == w.grad.tokens == 2 * 2 * 8 and w.grad.absmax > 0
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_tensorboard(run, tmp_path / "tb")
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    got = {e.step: e.value for e in acc.Scalars("probe/absmax/hidden_states.1@grad")}
    assert got == {s: pytest.approx(run.at(s)["hidden_states.1"].grad.absmax, rel=1e-6) for s in run.steps}


def test_backward_after_the_block_records_nothing():
    model = _model()
    ids, mask = _batch(8)
    with probe.capture(model, grads=True) as c:
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()  # after exit: the hooks fire, nothing is folded, nothing raises
    assert c.result["hidden_states.1"].tokens > 0 and c.result["hidden_states.1"].grad.count == 0
    assert all(p.grad is not None for p in model.parameters())
