"""Training and scale: windows over steps, untouched gradients, gradient checkpointing,
generate(), torch.distributed (real gloo processes), accelerate offload, torch.compile and the
HF Trainer callback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import probe
from conftest import batch

ROOT = Path(__file__).resolve().parents[1]


def assert_same_stats(a, b, rtol=1e-12):
    assert a.sites == b.sites
    for name in a.sites:
        x, y = a[name], b[name]
        assert (x.count, x.tokens, x.min, x.max, x.absmax) == (y.count, y.tokens, y.min, y.max, y.absmax), name
        np.testing.assert_allclose([x.mean, x.std, x.skew, x.kurtosis], [y.mean, y.std, y.skew, y.kurtosis],
                                   rtol=rtol, err_msg=name)
        if x._state.get("histogram"):
            np.testing.assert_array_equal(x.histogram_counts, y.histogram_counts)


def test_windows_every_and_snapshot(tiny, tmp_path):
    model = tiny("llama")
    data = [batch(2, 8, "right", seed=i) for i in range(5)]
    with probe.capture(model, out=tmp_path / "w.h5", every=2, stats=("moments", "histogram")) as run:
        for ids, mask in data:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
    assert run.steps == [2, 4, 5]
    with probe.capture(model, stats=("moments", "histogram")) as whole:
        for ids, mask in data:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
    assert_same_stats(run.result, whole.result, rtol=1e-9)
    with probe.capture(model, stats=("moments", "histogram")) as third:
        for ids, mask in data[2:4]:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
    assert_same_stats(run.at(4), third.result, rtol=1e-9)


def test_gradients_bitwise_equal_and_nothing_held(tiny):
    model = tiny("gpt2").train()
    ids, mask = batch(2, 8, "right")

    def grads():
        model.zero_grad()
        torch.manual_seed(3)
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    want = grads()
    with probe.capture(model, skip_first=1) as c:
        got = grads()
        assert c._engine.cross._held == {} and c._forwards.call is None  # nothing of the forward is kept
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert c["hidden_states.2"].tokens == int(mask.sum()) - 2


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_counts_once(tiny, reentrant):
    sites = ["hidden_states", "model.layers.*.mlp", "model.layers.*.self_attn"]
    ids, mask = batch(2, 8, "right")

    def run(checkpointing):
        model = tiny("llama").train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        with probe.capture(model, sites=sites, stats=("moments", "histogram"), strict=True) as c:
            model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        return c.result

    plain, ckpt = run(False), run(True)
    assert ckpt["model.layers.0.mlp"].tokens == int(mask.sum())
    assert_same_stats(ckpt, plain, rtol=1e-12)


def test_generate_prefill_and_decode(tiny):
    model = tiny("llama")
    ids, mask = batch(2, 6, "left")
    with probe.capture(model, phases=True, stats=("moments", "position")) as run:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                 pad_token_id=0)
    assert out.shape[1] == 10
    pre, dec = run["hidden_states.2"], run["hidden_states.2@decode"]
    assert pre.tokens == int(mask.sum())
    assert dec.tokens == 2 * 3  # the 4th token is sampled from the 3rd decode step's logits
    real = mask.sum(1).tolist()
    decode_positions = sorted({r + k for r in real for k in range(3)})
    assert list(np.flatnonzero(dec.position.tokens)) == decode_positions


def test_decode_steps_merge_only_the_positions_they_reach(tiny, monkeypatch):
    """On CPU a chunk's per-position states (``position``, ``norm``) are built and merged over the
    positions its real tokens reach (a decode step: one): every field equals, bitwise, the merge
    over all ``max_positions`` positions, tokens past them included (``overflow``)."""
    from probe.stats import norm, position

    model = tiny("llama")
    ids, mask = batch(2, 6, "left")
    windows = []
    window = position.position_window

    def seen(tokens, p):
        windows.append(window(tokens, p))
        return windows[-1]

    def run(windowed: bool):
        monkeypatch.setattr(position, "position_window", seen if windowed else (lambda tokens, p: None))
        monkeypatch.setattr(norm, "position_window", seen if windowed else (lambda tokens, p: None))
        with probe.capture(model, stats=("position", "norm"), max_positions=8, strict=True) as c:
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                               pad_token_id=0)
        return c.result

    full, windowed = run(False), run(True)
    # rows of 6 and 3 real tokens: the prefill reaches [0, 6); decode step k positions 5 + k and
    # 2 + k, the first rows' past max_positions from step 3 on
    assert windows[0] == (0, 6) and (3, 7) in windows and (5, 6) in windows
    for name in full.sites:
        for kind in ("position", "norm"):
            want, got = full.total.sites[name][kind], windowed.total.sites[name][kind]
            for field in want:
                np.testing.assert_array_equal(got[field], want[field], err_msg=f"{name}.{kind}.{field}")
    assert int(full.total.sites["hidden_states.1"]["position"]["overflow"]) == 3  # the first row's 8, 9, 10
    assert list(np.flatnonzero(full["hidden_states.1"].position.tokens)) == list(range(8))


def test_distributed_two_ranks_equal_one_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    script = str(ROOT / "examples" / "distributed.py")
    two, one = tmp_path / "two.h5", tmp_path / "one.h5"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    script, "-o", str(two), "--every", "2"], check=True, env=env, cwd=tmp_path,
                   capture_output=True, timeout=300)
    subprocess.run([sys.executable, script, "-o", str(one)], check=True, env=env, cwd=tmp_path,
                   capture_output=True, timeout=300)
    a, b = probe.load(two), probe.load(one)
    assert a.steps == [2, 4] and a.meta["world_size"] == 2
    assert_same_stats(a, b, rtol=1e-9)
    for name in a.sites:
        np.testing.assert_array_equal(a[name].position.tokens, b[name].position.tokens)
    np.testing.assert_allclose(a.cross.cov, b.cross.cov, rtol=1e-9)


def test_accelerate_offload_coexists(tiny):
    accelerate = pytest.importorskip("accelerate")
    model = tiny("llama")
    ids, mask = batch(2, 8, "right")
    with probe.capture(model, stats=("moments",)) as ref:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    offloaded = accelerate.cpu_offload(tiny("llama"), execution_device=torch.device("cpu"))
    with probe.capture(offloaded, stats=("moments",), strict=True) as run:
        with torch.no_grad():
            offloaded(input_ids=ids, attention_mask=mask)
    assert_same_stats(run.result, ref.result)
    assert any(hasattr(m, "_hf_hook") for m in offloaded.modules())  # accelerate's hooks still there


def test_compile_inside_block_and_refusal(tiny):
    model = tiny("llama")
    ids, mask = batch(2, 8, "right")
    with probe.capture(model, stats=("moments",)) as ref:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    with probe.capture(model, stats=("moments",), strict=True) as run:
        compiled = torch.compile(model, backend="eager")
        with torch.no_grad():
            compiled(input_ids=ids, attention_mask=mask)
    assert run["hidden_states.1"].tokens == ref["hidden_states.1"].tokens
    np.testing.assert_allclose(run["hidden_states.2"].std, ref["hidden_states.2"].std, rtol=1e-6)
    with pytest.raises(probe.ProbeError, match="already compiled.*enter probe.capture\\(model\\) on the uncompiled"):
        probe.capture(compiled)


def test_trainer_callback_checks_options_when_built(tmp_path):
    """The callback validates through the same options as capture(): same messages, at once."""
    from probe.integrations import ProbeCallback

    with pytest.raises(probe.ProbeError, match=r"every must be an int >= 1 \(optimizer steps\); got 0"):
        ProbeCallback(out=tmp_path / "x.h5", every=0)
    with pytest.raises(probe.ProbeError, match=r"unknown stats \['bogus'\]"):
        ProbeCallback(out=tmp_path / "x.h5", stats=("moments", "bogus"))
    with pytest.raises(probe.ProbeError, match="skip_first must be an int >= 0; got -1"):
        ProbeCallback(out=tmp_path / "x.h5", skip_first=-1)
    assert not (tmp_path / "x.h5").exists()


def test_trainer_callback(tiny, tmp_path):
    from probe.integrations import ProbeCallback

    model = tiny("gpt2")
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 97, (8,), generator=g)} for _ in range(12)]
    data = [dict(r, labels=r["input_ids"], attention_mask=torch.ones(8, dtype=torch.long)) for r in rows]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "t"), per_device_train_batch_size=2,
                                          max_steps=5, report_to=[], logging_steps=100, save_strategy="no",
                                          use_cpu=True, disable_tqdm=True)
    cb = ProbeCallback(out=tmp_path / "train.h5", every=2, skip_first=1)
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()
    run = probe.load(tmp_path / "train.h5")
    assert run.steps == [2, 4, 5]
    assert run["hidden_states.1"].tokens == 5 * 2 * 7
    assert sum(run.at(s)["hidden_states.1"].tokens for s in run.steps) == 70
