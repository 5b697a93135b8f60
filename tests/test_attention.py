"""Attention sites (probe.capture.attention, probe.stats.attention) against attention recomputed
explicitly in float64 from the layers' weights and inputs.

Tolerances. The model runs in float32: its q and k come from float32 projections (D = 32 terms)
and its logits from float32 dots (d = 8 terms); each rounding is at most n·2^-24 of the sum of
the |terms| (Higham, Accuracy and Stability, eq. 3.5), so the logits agree with float64 to about
(32 + 8)·2^-24 ≈ 2.4e-6 of their scale; MaxLogit is compared at 1e-5 of the largest |logit| (+1e-6).
Entropies and probabilities are computed from those logits in float32 (a log-sum-exp over at most
12 keys): they agree to ~1e-6 absolute; compared at 2e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import probe
from probe.capture import attention as attn_mod
from probe.errors import SiteError

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.modeling_utils import AttentionInterface  # noqa: E402

V, D, H = 97, 32, 4


def llama(impl: str, kv: int = 2) -> nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=H,
                      num_key_value_heads=kv, max_position_embeddings=64, attn_implementation=impl)
    return LlamaForCausalLM(cfg).eval()


def gpt2(impl: str) -> nn.Module:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=V, n_embd=D, n_layer=2, n_head=H, n_positions=64, attn_implementation=impl)
    return GPT2LMHeadModel(cfg).eval()


def batch(side: str, b: int = 3, t: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    if side == "left":
        mask[1, :3] = 0
        mask[2, :7] = 0
    elif side == "right":
        mask[1, -4:] = 0
        mask[2, -8:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if side == "left":
        out["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return out


# ------------------------------------------------------------------ float64 reference q and k
def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos + rot * sin


def reference_qk(model: nn.Module, inputs: dict) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Per attention module path: q [B, H, T, d] and k [B, H, T, d] (kv heads repeated), float64,
    from the module's own input (a pre-hook of this test) and its weights, and the scaling."""
    found: dict[str, tuple] = {}
    handles = []
    for path in attn_mod.attention_modules(model):
        module = model.get_submodule(path)

        def hook(mod, args, kwargs, path=path):
            x = (args[0] if args else kwargs["hidden_states"]).detach().double()
            b, t, _ = x.shape
            if hasattr(mod, "c_attn"):  # GPT-2: Conv1D, x @ W + b
                w, bias = mod.c_attn.weight.detach().double(), mod.c_attn.bias.detach().double()
                q, k, _ = (x @ w + bias).split(D, dim=2)
                q = q.view(b, t, H, -1).transpose(1, 2)
                k = k.view(b, t, H, -1).transpose(1, 2)
            else:  # Llama: projections then rotary embeddings, kv heads repeated
                d = mod.head_dim
                q = (x @ mod.q_proj.weight.detach().double().T).view(b, t, -1, d).transpose(1, 2)
                k = (x @ mod.k_proj.weight.detach().double().T).view(b, t, -1, d).transpose(1, 2)
                cos, sin = (v.detach().double().unsqueeze(1) for v in kwargs["position_embeddings"])
                q, k = _rope(q, cos, sin), _rope(k, cos, sin)
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            found[path] = (q.numpy(), k.numpy(), float(mod.scaling) if hasattr(mod, "scaling")
                           else q.shape[-1] ** -0.5)

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return found


def reference_stats(q: np.ndarray, k: np.ndarray, scale: float, mask2d: np.ndarray, ids: np.ndarray) -> dict:
    """Per head over real queries (causal, keys real): max logit and where, entropies, sink mass."""
    b, h, t, _ = q.shape
    logits = np.einsum("bhtd,bhsd->bhts", q, k) * scale
    real = mask2d.astype(bool)
    allowed = np.tril(np.ones((t, t), bool))[None, None] & real[:, None, None, :]
    pos = np.cumsum(real, -1) - 1
    out = {"maxlogit": np.full(h, -np.inf), "at": np.full((h, 4), -1), "entropy": [[] for _ in range(h)],
           "norm": [[] for _ in range(h)], "sink": np.zeros((h, 4)), "n": 0, "scale": np.abs(logits).max()}
    for bi in range(b):
        for ti in range(t):
            if not real[bi, ti]:
                continue
            out["n"] += 1
            keys = np.flatnonzero(allowed[bi, 0, ti])
            for hi in range(h):
                z = logits[bi, hi, ti, keys]
                j = int(np.argmax(z))
                if z[j] > out["maxlogit"][hi]:
                    out["maxlogit"][hi] = z[j]
                    out["at"][hi] = (bi, pos[bi, ti], pos[bi, keys[j]], ids[bi, ti])
                p = np.exp(z - z.max())
                p /= p.sum()
                ent = float(-(p * np.log(p)).sum())
                out["entropy"][hi].append(ent)
                out["norm"][hi].append(ent / np.log(len(keys)) if len(keys) > 1 else 0.0)
                for jj in range(min(4, len(keys))):
                    out["sink"][hi, jj] += p[jj]
    return out


def check_site(view_state: dict, ref: dict) -> None:
    s = view_state
    assert int(s["tokens"]) == ref["n"]
    tol = 1e-5 * ref["scale"] + 1e-6
    np.testing.assert_allclose(s["maxlogit"], ref["maxlogit"], rtol=0, atol=tol)
    np.testing.assert_array_equal(s["maxlogit_at"], ref["at"])
    for hi in range(len(ref["entropy"])):
        e = np.array(ref["entropy"][hi])
        assert s["entropy_n"][hi] == len(e)
        np.testing.assert_allclose(s["entropy_mean"][hi], e.mean(), atol=2e-5)
        c = e - e.mean()
        np.testing.assert_allclose(s["entropy_m2"][hi] / len(e), (c ** 2).mean(), atol=2e-5)
        np.testing.assert_allclose(s["entropy_m3"][hi] / len(e), (c ** 3).mean(), atol=2e-5)
        np.testing.assert_allclose(s["entropy_m4"][hi] / len(e), (c ** 4).mean(), atol=2e-5)
        nrm = np.array(ref["norm"][hi])
        bins = np.clip(np.floor(nrm * 64), 0, 63).astype(int)
        near = np.abs(nrm * 64 - np.round(nrm * 64)) < 1e-3
        hist = np.asarray(s["entropy_hist"][hi])
        assert hist.sum() == len(nrm)
        assert np.abs(hist - np.bincount(bins, minlength=64)).sum() <= 2 * near.sum()
    np.testing.assert_allclose(s["sink"], ref["sink"], atol=2e-5 * ref["n"])
    assert (np.asarray(s["nonfinite"]) == 0).all()


CASES = [(make, impl, side) for make in ("llama", "gpt2") for impl in ("eager", "sdpa")
         for side in ("none", "left", "right")]
# flex attention on CPU (GPT-2 has no flex path): its BlockMask is read through its mask_mod
CASES += [("llama", "flex_attention", side) for side in ("none", "left", "right")]


@pytest.mark.parametrize("make,impl,side", CASES)
def test_against_float64(make, impl, side):
    if impl == "flex_attention":
        pytest.importorskip("torch.nn.attention.flex_attention")
    model = llama(impl) if make == "llama" else gpt2(impl)
    inputs = batch(side)
    refs = reference_qk(model, inputs)
    with probe.capture(model, sites="attention") as cap:
        with torch.no_grad():
            model(**inputs)
    run = _run(cap)
    assert sorted(refs) == sorted(n[: -len(":attention")] for n in run.sites)
    for path, (q, k, scale) in refs.items():
        ref = reference_stats(q, k, scale, inputs["attention_mask"].numpy(), inputs["input_ids"].numpy())
        check_site(run[path + ":attention"].state("attention"), ref)


def _run(cap):
    return cap.result if getattr(cap, "result", None) is not None else cap


def test_gqa_grouped_heads():
    """Llama with 4 query heads over 1 kv head (MQA) and 2 (GQA): query heads of one group differ."""
    for kv in (1, 2):
        model = llama("sdpa", kv=kv)
        inputs = batch("left")
        refs = reference_qk(model, inputs)
        with probe.capture(model, sites="model.layers.1.*:attention") as cap, torch.no_grad():
            model(**inputs)
        run = _run(cap)
        assert list(run.sites) == ["model.layers.1.self_attn:attention"]
        q, k, scale = refs["model.layers.1.self_attn"]
        check_site(run["model.layers.1.self_attn:attention"].state("attention"),
                   reference_stats(q, k, scale, inputs["attention_mask"].numpy(), inputs["input_ids"].numpy()))


def test_chunks_agree(monkeypatch):
    """Small chunks of query rows give the same statistics as one chunk."""
    model = llama("eager")
    inputs = batch("right")
    states = []
    for chunk in (1 << 22, 3 * H * 12):  # one chunk; three query rows per chunk
        monkeypatch.setattr(attn_mod, "CHUNK_ELEMENTS", chunk)
        with probe.capture(model, sites="attention") as cap, torch.no_grad():
            model(**inputs)
        states.append(_run(cap)["model.layers.0.self_attn:attention"].state("attention"))
    for name in states[0]:
        np.testing.assert_allclose(states[0][name], states[1][name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_output_bitwise_and_restored(impl):
    model = gpt2(impl)
    inputs = batch("left")
    original = AttentionInterface.__dict__["get_interface"]
    with torch.no_grad():
        plain = model(**inputs).logits
        with probe.capture(model, sites="attention"):
            assert AttentionInterface.__dict__["get_interface"] is not original
            seen = model(**inputs).logits
    assert torch.equal(plain, seen)
    assert AttentionInterface.__dict__["get_interface"] is original
    with pytest.raises(RuntimeError, match="boom"):
        with probe.capture(model, sites="attention"):
            raise RuntimeError("boom")
    assert AttentionInterface.__dict__["get_interface"] is original
    assert not attn_mod._WATCHED and not attn_mod._CALLS


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_counts_once(reentrant):
    """A training step with gradient checkpointing re-runs each attention in backward: not counted twice."""
    model = llama("eager")
    model.train()
    model.config.attention_dropout = 0.0
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    inputs = batch("right")
    calls = []
    handle = model.model.layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))
    with probe.capture(model, sites="attention") as cap:
        out = model(**inputs, labels=inputs["input_ids"])
        out.loss.backward()
    handle.remove()
    assert len(calls) == 2  # the forward and its recompute in backward
    run = _run(cap)
    real = int(inputs["attention_mask"].sum())
    for name in run.sites:
        s = run[name].state("attention")
        assert int(s["tokens"]) == real
        assert (s["entropy_n"] == real).all()


def test_view_and_schedule():
    model = gpt2("sdpa")
    inputs = batch("none")
    with probe.capture(model, sites="attention", every=1) as cap, torch.no_grad():
        model(**inputs)
        model(**inputs)
    run = _run(cap)
    view = run["transformer.h.0.attn:attention"].attention
    assert view.heads == H
    assert view.maxlogit.shape == (H,)
    assert view.tokens == 2 * 3 * 12
    np.testing.assert_allclose(view.sink_mass.sum(-1) <= 1 + 1e-6, True)
    assert len(view.entropy_mean) == H


def test_errors():
    model = gpt2("eager")
    with pytest.raises(SiteError, match="matches no attention module"):
        probe.capture(model, sites="transformer.h.9.*:attention")
    model.transformer.h[0].attn.reorder_and_upcast_attn = True  # GPT-2's path that bypasses the interface
    with pytest.warns(UserWarning, match="did not call transformers' attention interface"):
        with probe.capture(model, sites="transformer.h.0.attn:attention"), torch.no_grad():
            model(**batch("none"))


def test_file_roundtrip_and_window_merge(tmp_path):
    """Two forwards in two windows of a file merge to the state of one window over both."""
    model = llama("eager")
    a, b = batch("left"), batch("right")
    path = str(tmp_path / "attn.h5")
    with probe.capture(model, path, sites="attention", every=1), torch.no_grad():
        model(**a)
        model(**b)
    with probe.capture(model, sites="attention") as cap, torch.no_grad():
        model(**a)
        model(**b)
    run = probe.load(path)
    assert len(run.steps) == 2
    for name in run.sites:
        got, want = run[name].state("attention"), _run(cap)[name].state("attention")
        for field in want:
            if got[field].dtype.kind == "i":  # counts and the MaxLogit's location: exact
                np.testing.assert_array_equal(got[field], want[field])
            else:
                np.testing.assert_allclose(got[field], want[field], rtol=1e-9, atol=1e-9)


def _planted(tmp_path, spike_step: int = 11, steps: int = 14):
    """A run of ``steps`` forwards (every=1) where the forward ``spike_step`` (1-based) has layer 1's
    queries scaled by 30, so its logits (q·k, linear in q, RoPE included) are 30 times larger."""
    model = llama("eager")
    path = str(tmp_path / "spike.h5")
    g = torch.Generator().manual_seed(5)
    q_proj = model.model.layers[1].self_attn.q_proj
    batches = [{"input_ids": torch.randint(0, V, (2, 12), generator=g),
                "attention_mask": torch.ones(2, 12, dtype=torch.long)} for _ in range(steps)]
    spiked = batches[spike_step - 1]
    original = q_proj.weight.detach().clone()
    with torch.no_grad():  # the float64 reference of the spiked forward, outside the capture
        q_proj.weight.mul_(30.0)
        q, k, scale = reference_qk(model, spiked)["model.layers.1.self_attn"]
        q_proj.weight.copy_(original)
    planted = reference_stats(q, k, scale, spiked["attention_mask"].numpy(), spiked["input_ids"].numpy())
    with probe.capture(model, path, sites="attention", every=1), torch.no_grad():
        for s, inputs in enumerate(batches, 1):
            if s == spike_step:
                q_proj.weight.mul_(30.0)
            model(**inputs)
            if s == spike_step:
                q_proj.weight.copy_(original)
    return path, planted


def test_timeline_finds_planted_maxlogit(tmp_path):
    from probe.present.timeline import timeline

    path, planted = _planted(tmp_path)
    run = probe.load(path)
    tl = timeline(run)
    site = "model.layers.1.self_attn:attention"
    series = tl.series["maxlogit"][site]
    assert len(series) == 14
    np.testing.assert_allclose(series[10], planted["maxlogit"].max(), rtol=1e-5)
    events = [e for e in tl.events if e.series == "maxlogit"]
    assert [e.step for e in events] == [11]
    e = events[0]
    head = int(np.argmax(planted["maxlogit"]))
    assert (e.site, e.channel) == (site, head)
    # the row counts sequences since the capture began: forward 11's rows are 20 and 21
    row, pos, _, tok = planted["at"][head]
    assert (e.row, e.position, e.token) == (20 + row, pos, tok)


def test_tensorboard_carries_maxlogit(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from probe.export.tensorboard import write_tensorboard

    path, planted = _planted(tmp_path, spike_step=3, steps=4)
    run = probe.load(path)
    write_tensorboard(run, tmp_path / "tb")
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    site = "model.layers.1.self_attn:attention"
    got = acc.Scalars(f"probe/maxlogit/{site}")
    assert [s.step for s in got] == list(run.steps)
    from probe.results.run import Run

    want = [Run(run.meta, [row])[site].attention.max for row in run.rows]
    np.testing.assert_allclose([s.value for s in got], want, rtol=1e-6)  # TensorBoard stores float32
    np.testing.assert_allclose(got[2].value, planted["maxlogit"].max(), rtol=1e-5)
    assert f"probe/attention_entropy/{site}" in acc.Tags()["scalars"]


def test_nested_captures_both_record():
    model = gpt2("eager")
    inputs = batch("left")
    with probe.capture(model, sites="attention") as outer:
        with probe.capture(model, sites="transformer.h.1.*:attention") as inner, torch.no_grad():
            model(**inputs)
        assert AttentionInterface.__dict__["get_interface"] is not attn_mod._PATCH[0]  # the outer's still on
    assert not attn_mod._CALLS and not attn_mod._PATCH
    a = _run(outer)["transformer.h.1.attn:attention"].state("attention")
    b = _run(inner)["transformer.h.1.attn:attention"].state("attention")
    for field in a:
        np.testing.assert_array_equal(a[field], b[field])
    assert int(a["tokens"]) == int(inputs["attention_mask"].sum())


def test_show_prints_maxlogit_table(tmp_path, capsys):
    import json

    from probe.cli import main

    path, planted = _planted(tmp_path, spike_step=2, steps=2)
    assert main(["show", path]) == 0
    text = capsys.readouterr().out
    assert "MaxLogit" in text and "model.layers.1.self_attn:attention" in text
    assert main(["show", path, "--json"]) == 0
    rows = {r["site"]: r for r in json.loads(capsys.readouterr().out)["attention"]}
    r = rows["model.layers.1.self_attn:attention"]
    head = int(np.argmax(planted["maxlogit"]))
    np.testing.assert_allclose(r["maxlogit"], planted["maxlogit"].max(), rtol=1e-5)
    assert r["head"] == head
    assert (r["query"], r["key"], r["token"]) == tuple(int(v) for v in planted["at"][head][1:])
    site = "model.layers.1.self_attn:attention"
    assert main(["show", path, "--site", site]) == 0  # a site with only its own statistic: its own table
    text = capsys.readouterr().out
    assert site in text and "MaxLogit" in text and "hidden-state geometry" not in text
    assert probe.load(path)[site].tokens == r["tokens"] == probe.load(path)[site].attention.tokens > 0


def _rank(rank: int, world: int, port: int, folder: str) -> None:
    """One rank: rebuilds every rank's attention windows (uneven batch counts), merges its own across
    the gloo group with the tensor collectives; the result must equal the file merge of all of them
    (the MaxLogit argmax per head included), on every rank."""
    from probe.capture.sync import merge_windows
    from probe.stats._state import merge_rows
    from conftest import rank_group

    with rank_group(rank, world, port, folder, 120):
        model = llama("eager")
        rows = []
        for r in range(world):
            g = torch.Generator().manual_seed(10 + r)
            with probe.capture(model, sites="attention", every=1, distributed=False) as c, torch.no_grad():
                for _ in range(2 + r):
                    model(input_ids=torch.randint(0, V, (2, 9), generator=g))
            rows.append(list(c.result.rows))
        merged = merge_windows(rows[rank], c.sites, ["attention"], False)
        for got in merged:
            want = merge_rows([w for rs in rows for w in rs if w.step == got.step])
            for name in c.sites:
                mine, ref = got.sites[name]["attention"], want.sites[name]["attention"]
                for field in ref:
                    np.testing.assert_allclose(mine[field], ref[field], rtol=1e-9, err_msg=f"{name}.{field}")


@pytest.mark.slow
def test_two_ranks_merge_like_files(tmp_path):
    from conftest import spawn_ranks

    spawn_ranks(_rank, 2, tmp_path, timeout=240)


def test_bert_bidirectional_against_eager_probabilities():
    """An encoder (non-causal, right padding): entropies and sink masses against the probabilities
    eager attention returns (output_attentions=True), taken to float64."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=H,
                                 intermediate_size=64, max_position_embeddings=64,
                                 attn_implementation="eager")).eval()
    inputs = batch("right")
    with torch.no_grad():
        probs = [p.double().numpy() for p in model(**inputs, output_attentions=True).attentions]
    with probe.capture(model, sites="attention") as cap, torch.no_grad():
        model(**inputs)
    run = _run(cap)
    names = [n for n in run.sites]
    assert len(names) == 2
    real = inputs["attention_mask"].numpy().astype(bool)
    for name, p in zip(names, probs):
        s = run[name].state("attention")
        ent, sink = [], np.zeros((H, 4))
        for b in range(p.shape[0]):
            keys = np.flatnonzero(real[b])
            for t in np.flatnonzero(real[b]):
                q = p[b][:, t][:, keys]  # [H, allowed]
                ent.append(-(q * np.log(np.maximum(q, 1e-300))).sum(-1))
                sink += q[:, :4]
        ent = np.array(ent)  # [n, H]
        np.testing.assert_allclose(s["entropy_mean"], ent.mean(0), atol=2e-5)
        np.testing.assert_allclose(s["sink"], sink, atol=2e-5 * len(ent))
        assert int(s["tokens"]) == int(real.sum())
