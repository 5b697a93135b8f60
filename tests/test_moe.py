"""Mixture-of-experts: routing and per-expert input statistics against a float64 numpy reference
that recomputes the routing from the router logits the model produced (materialized by hooks of
the test's own), over padded batches; merges across windows, files and ranks; the per-expert
calibration exports (the imatrix read back with the gguf package)."""

from __future__ import annotations

import datetime
import json
import math
import socket

import numpy as np
import pytest
import torch
import transformers

import probe
from probe.capture.moe import moe_layers
from probe.capture.sites import resolve
from probe.capture.tokens import CallInputs, TokenContext
from probe.stats._state import ROUTER_BINS, merge_rows

VOCAB = 61


def _mixtral():
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=1, vocab_size=VOCAB, num_local_experts=8,
                                     num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(cfg).eval()


def _qwen3():
    torch.manual_seed(1)
    cfg = transformers.Qwen3MoeConfig(hidden_size=16, intermediate_size=32, moe_intermediate_size=12,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                      vocab_size=VOCAB, num_experts=12, num_experts_per_tok=3, norm_topk_prob=False)
    return transformers.Qwen3MoeForCausalLM(cfg).eval()


MODELS = {"mixtral": (_mixtral, True), "qwen3_moe": (_qwen3, False)}  # normalizes the top-k weights


def _batches(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (3, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 9 - 2 - i:] = 0  # right padding
        mask[2, : 1 + i] = 0  # left padding
        out.append((ids, mask))
    return out


class _Tape:
    """The routers' outputs and the experts' inputs of each forward, materialized (test hooks)."""

    def __init__(self, model):
        self.layers = moe_layers(model)
        modules = dict(model.named_modules())
        #: each layer's fused gate/up weights [E, 2I, D] in float64: the down input recomputed here
        self.gate_up = [modules[layer.experts].gate_up_proj.detach().double().numpy() for layer in self.layers]
        self.seen: list[dict] = []
        self.handles = []
        for i, layer in enumerate(self.layers):
            self.handles.append(modules[layer.router].register_forward_hook(self._router(i)))
            self.handles.append(modules[layer.experts].register_forward_pre_hook(self._experts(i)))

    def _router(self, i):
        def hook(module, args, output):
            self.seen[-1][("router", i)] = [t.detach().double().numpy().copy() for t in output]
        return hook

    def _experts(self, i):
        def hook(module, args):
            self.seen[-1][("experts", i)] = (args[0].detach().double().numpy().copy(), args[1].numpy().copy())
        return hook

    def run(self, model, batches):
        for ids, mask in batches:
            self.seen.append({"mask": mask.numpy().reshape(-1).astype(bool)})
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)

    def remove(self):
        for h in self.handles:
            h.remove()


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _reference(tape: _Tape, i: int, normalized: bool, forwards=None) -> dict:
    """float64 numpy: routing recomputed from the logits; per-expert sums over the real tokens."""
    e, k = tape.layers[i].n_experts, tape.layers[i].top_k
    ref = {"tokens": 0, "counts": np.zeros(e, np.int64), "weight_sum": np.zeros(e), "prob_sum": np.zeros(e),
           "ent": [], "weights": [], "x": [[] for _ in range(e)], "down": [[] for _ in range(e)]}
    gate_up = tape.gate_up[i]
    for f in (tape.seen if forwards is None else [tape.seen[j] for j in forwards]):
        real = f["mask"]
        logits, _, index = f[("router", i)]
        p = _softmax(logits)
        top = np.argsort(-p, -1, kind="stable")[:, :k]
        assert np.array_equal(np.sort(top, -1), np.sort(index.astype(np.int64), -1))  # the model's own routing
        w = np.take_along_axis(p, top, -1)
        if normalized:
            w = w / w.sum(-1, keepdims=True)
        x, idx = f[("experts", i)]
        assert np.array_equal(idx, index.astype(np.int64))
        ref["tokens"] += int(real.sum())
        ref["prob_sum"] += p[real].sum(0)
        ref["ent"] += list(-(p * np.log(p)).sum(-1)[real])
        for t in np.flatnonzero(real):
            for j in range(k):
                ref["counts"][top[t, j]] += 1
                ref["weight_sum"][top[t, j]] += w[t, j]
                ref["weights"].append(f[("router", i)][1][t, list(index[t]).index(top[t, j])])
                ref["x"][top[t, j]].append(x[t])
                gate, up = np.split(gate_up[top[t, j]] @ x[t], 2)
                ref["down"][top[t, j]].append(gate / (1 + np.exp(-gate)) * up)  # silu(gate) * up
    return ref


def _check_router(state: dict, ref: dict) -> None:
    assert int(state["tokens"]) == ref["tokens"]
    np.testing.assert_array_equal(state["counts"], ref["counts"])
    np.testing.assert_allclose(state["weight_sum"], ref["weight_sum"], rtol=1e-6)  # fp32 router vs fp64 here
    np.testing.assert_allclose(state["prob_sum"], ref["prob_sum"], rtol=1e-6)
    ent = np.array(ref["ent"])
    assert float(state["entropy_n"]) == len(ent)
    np.testing.assert_allclose(float(state["entropy_mean"]), ent.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(state["entropy_m2"]), ((ent - ent.mean()) ** 2).sum(), rtol=1e-4, atol=1e-9)
    e = len(ref["counts"])
    ebins = np.clip(np.floor(ent / math.log(e) * ROUTER_BINS), 0, ROUTER_BINS - 1).astype(int)
    np.testing.assert_array_equal(state["entropy_hist"], np.bincount(ebins, minlength=ROUTER_BINS))
    wbins = np.clip(np.floor(np.array(ref["weights"]) * ROUTER_BINS), 0, ROUTER_BINS - 1).astype(int)
    np.testing.assert_array_equal(state["weight_hist"], np.bincount(wbins, minlength=ROUTER_BINS))


def _check_down(view, ref: dict) -> None:
    """The down projection's input, recomputed here in float64 from the experts' input and weights:
    the model computed it in float32 (gate/up sums over D = 16 terms), so values agree to ~1e-6 of
    their scale; counts exactly."""
    counts = np.array([len(r) for r in ref["down"]])
    np.testing.assert_array_equal(view.tokens, counts)
    assert view.nonfinite.sum() == 0
    scale = max(np.abs(np.array(r)).max() for r in ref["down"] if r)
    for e, rows in enumerate(ref["down"]):
        if not rows:
            assert (view.count[e] == 0).all() and (view.absmax[e] == 0).all()
            continue
        x = np.array(rows)
        np.testing.assert_array_equal(view.count[e], np.full(x.shape[1], len(rows)))
        np.testing.assert_allclose(view.mean[e], x.mean(0), rtol=1e-5, atol=1e-5 * scale)
        np.testing.assert_allclose(view.var[e], x.var(0), rtol=1e-4, atol=1e-5 * scale ** 2)
        np.testing.assert_allclose(view.sum_x2[e], (x * x).sum(0), rtol=1e-4, atol=1e-5 * scale ** 2)
        np.testing.assert_allclose(view.absmax[e], np.abs(x).max(0), rtol=1e-5, atol=1e-6 * scale)


def _check_experts(view, ref: dict) -> None:
    counts = np.array([len(r) for r in ref["x"]])
    np.testing.assert_array_equal(view.tokens, counts)
    for e, rows in enumerate(ref["x"]):
        if not rows:
            assert (view.count[e] == 0).all() and (view.absmax[e] == 0).all() and np.isnan(view.mean[e]).all()
            continue
        x = np.array(rows)
        np.testing.assert_array_equal(view.count[e], np.full(x.shape[1], len(rows)))
        np.testing.assert_allclose(view.mean[e], x.mean(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(view.var[e], x.var(0), rtol=1e-7, atol=1e-12)
        np.testing.assert_allclose(view.sum_x2[e], (x * x).sum(0), rtol=1e-9)
        np.testing.assert_array_equal(view.absmax[e], np.abs(x).max(0).astype(np.float32))


@pytest.mark.parametrize("kind", list(MODELS))
def test_routing_and_experts_exact_over_real_tokens(kind, tmp_path):
    make, normalized = MODELS[kind]
    model = make()
    batches = _batches(3, 5)
    tape = _Tape(model)
    with probe.capture(model, tmp_path / "moe.h5", sites="moe", every=1) as c:
        tape.run(model, batches)
    tape.remove()
    run = probe.load(tmp_path / "moe.h5")
    assert run.sites == [s for layer in tape.layers for s in (
        layer.router + ":router", layer.experts + ":experts", layer.experts + ":down_proj")]
    assert {"router", "experts"} <= set(run.stats)
    for i, layer in enumerate(tape.layers):
        ref = _reference(tape, i, normalized)
        _check_router(run[layer.router + ":router"].state("router"), ref)
        _check_router(c.result[layer.router + ":router"].state("router"), ref)
        _check_experts(run[layer.experts + ":experts"].experts, ref)
        _check_down(run[layer.experts + ":down_proj"].experts, ref)
        r = run[layer.router + ":router"].router
        assert r.top_k == layer.top_k and r.never_routed == [int(e) for e in np.flatnonzero(ref["counts"] == 0)]
        mean = ref["counts"].mean()
        assert r.max_over_mean == pytest.approx(ref["counts"].max() / mean)
        assert r.cv == pytest.approx(ref["counts"].std() / mean)
        # per window: one forward each, exact too
        for w in range(len(batches)):
            one = _reference(tape, i, normalized, [w])
            np.testing.assert_array_equal(run.rows[w].state(layer.router + ":router", "router")["counts"],
                                          one["counts"])


@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("host_reads", [True, False])
def test_down_projection_input_per_expert_for_every_implementation(kind, impl, host_reads, monkeypatch):
    """transformers runs fused experts as a loop per expert (eager), one batched matmul or one
    grouped matmul: the down projection's input is followed inside each, the model's output is
    bitwise what it is without probe, and padding never counts — on CPU's paths (the rows written
    in place, the shifted sums) and on the ones an accelerator takes (``DENSE_CPU`` off)."""
    from probe.stats import _base

    monkeypatch.setattr(_base, "DENSE_CPU", host_reads)
    make, normalized = MODELS[kind]
    model = make()
    model.set_experts_implementation(impl)
    batches = _batches(2, 11)
    with torch.no_grad():
        plain = [model(input_ids=ids, attention_mask=mask).logits for ids, mask in batches]
    tape = _Tape(model)
    with probe.capture(model, sites="model.layers.*.mlp.experts:down_proj") as c:
        tape.run(model, batches)
        with torch.no_grad():
            seen = [model(input_ids=ids, attention_mask=mask).logits for ids, mask in batches]
    tape.remove()
    assert all(torch.equal(a, b) for a, b in zip(plain, seen))
    assert not c.result.meta.get("disabled")
    for i, layer in enumerate(tape.layers):
        ref = _reference(tape, i, normalized)
        v = c.result[layer.experts + ":down_proj"].experts
        assert v.channels == tape.gate_up[i].shape[1] // 2
        # the second pass of the batches doubles every sum; the reference holds the first
        doubled = {"down": [r + r for r in ref["down"]]}
        _check_down(v, doubled)


def test_down_projection_of_an_unknown_forward_is_refused(recwarn):
    """An experts forward that never multiplies by down_proj: its site is disabled with one line,
    the experts' input site and the forward go on."""
    model = _mixtral()
    experts = model.model.layers[0].mlp.experts
    with probe.capture(model, sites="moe") as c:
        experts.forward = lambda h, i, w: torch.zeros_like(h)  # noqa: E731
        try:
            model(input_ids=torch.tensor([[3, 4, 5]]))
        finally:
            del experts.forward
    why = c.result.meta["disabled"]["model.layers.0.mlp.experts:down_proj"]
    assert "no multiplication by down_proj seen" in why and "capture '<experts>:experts' only" in why
    assert c.result["model.layers.0.mlp.experts:experts"].experts.tokens.sum() == 3 * 2
    assert c.result["model.layers.1.mlp.experts:down_proj"].experts.tokens.sum() == 3 * 2
    assert torch.overrides._get_current_function_mode_stack() == []
    with probe.capture(model, sites="moe"):  # a forward that raises inside the experts leaves nothing pushed
        experts.forward = lambda h, i, w: 1 / 0  # noqa: E731
        try:
            with pytest.raises(ZeroDivisionError):
                model(input_ids=torch.tensor([[3, 4, 5]]))
        finally:
            del experts.forward
        assert torch.overrides._get_current_function_mode_stack() == []


def test_files_and_ranks_merge_exactly(tmp_path):
    from probe.capture.sync import merge_windows
    import torch.distributed as dist

    model = _mixtral()
    a, b = _batches(2, 1), _batches(2, 2)
    for name, part in (("a", a), ("b", b)):
        with probe.capture(model, tmp_path / f"{name}.h5", sites="moe"):
            for ids, mask in part:
                model(input_ids=ids, attention_mask=mask)
    merged = probe.merge([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "ab.h5")
    with probe.capture(model, sites="moe", every=1, distributed=False) as once:
        for ids, mask in a + b:
            model(input_ids=ids, attention_mask=mask)
    names = once.result.sites
    for name in names:
        kind = "router" if name.endswith(":router") else "experts"
        got, want = merged.total.sites[name][kind], once.result.total.sites[name][kind]
        for f in want:
            np.testing.assert_allclose(got[f], want[f], rtol=1e-12, atol=1e-12, err_msg=f"{name}.{f}")
    # the rank merge (one-process gloo group) goes through the declared reductions
    if dist.is_initialized():  # pragma: no cover
        pytest.skip("a process group is already initialized")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rows = list(once.result.rows)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        synced = merge_windows(rows, names, ["moments", "router", "experts"], False)
    finally:
        dist.destroy_process_group()
    total = merge_rows(synced)
    for name in names:
        kind = "router" if name.endswith(":router") else "experts"
        for f, v in once.result.total.sites[name][kind].items():
            np.testing.assert_allclose(total.sites[name][kind][f], v, rtol=1e-12, atol=1e-12)


def _ranked(rank: int, world: int, port: int, folder: str) -> None:
    """One rank of test_counts_per_rank: its own batches (seed 10 + rank), one merged file."""
    import os

    from conftest import rank_group

    with rank_group(rank, world, port, folder, 120):
        model = _mixtral()
        with probe.capture(model, os.path.join(folder, "ranks.h5"), sites="moe", every=1):
            for ids, mask in _batches(2 + rank, 10 + rank):  # uneven: rank 1 runs one batch more
                with torch.no_grad():
                    model(input_ids=ids, attention_mask=mask)


def test_counts_per_rank(tmp_path, capsys):
    """Under torch.distributed each router site records its counts per capturing rank
    (``rank_counts[r]``, per window and in total), equal to the routing recomputed in float64 from
    each rank's own router logits; their sum is the merged counts; ``probe show`` names the
    experts some rank never routed to."""
    from conftest import spawn_ranks

    spawn_ranks(_ranked, 2, tmp_path, timeout=300)
    run = probe.load(tmp_path / "ranks.h5")
    model = _mixtral()
    refs = []
    for rank in range(2):
        tape = _Tape(model)
        tape.run(model, _batches(2 + rank, 10 + rank))
        tape.remove()
        refs.append(tape)
    layers = refs[0].layers
    for i, layer in enumerate(layers):
        r = run[layer.router + ":router"].router
        want = np.stack([_reference(tape, i, True)["counts"] for tape in refs])
        np.testing.assert_array_equal(r.rank_counts, want)
        np.testing.assert_array_equal(r.counts, want.sum(0))
        assert r.idle_on_a_rank == [int(e) for e in np.flatnonzero((want == 0).any(0) & (want.sum(0) > 0))]
        # per window: window 3 is rank 1's third batch alone
        third = run.at(3)[layer.router + ":router"].router
        np.testing.assert_array_equal(third.rank_counts[0], 0)
        np.testing.assert_array_equal(third.rank_counts[1], _reference(refs[1], i, True, forwards=[2])["counts"])
    from probe.cli import main
    from probe.present.experts import moe_table

    rows = moe_table(run)
    assert [r["ranks"] for r in rows] == [2, 2] and rows[0]["rank_counts"] == run[rows[0]["router"]].router.rank_counts.tolist()
    assert main(["show", str(tmp_path / "ranks.h5")]) == 0
    assert "idle on a rank" in capsys.readouterr().out
    # a one-process file merges with it rank by rank (its one row is rank 0's)
    with probe.capture(model, tmp_path / "one.h5", sites="moe") as one:
        for ids, mask in _batches(1, 20):
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
    both = probe.merge([tmp_path / "ranks.h5", tmp_path / "one.h5"], tmp_path / "both.h5")
    for layer in layers:
        site = layer.router + ":router"
        a, b = run[site].router, one.result[site].router
        assert b.rank_counts.shape == (1, a.n_experts)
        np.testing.assert_array_equal(both[site].router.rank_counts,
                                      a.rank_counts + np.pad(b.rank_counts, ((0, 1), (0, 0))))


def test_idle_on_a_rank_named():
    from probe.results.moe import RouterView

    state = {"tokens": np.int64(5), "counts": np.array([6, 4, 0]), "weight_sum": np.ones(3), "prob_sum": np.ones(3),
             "entropy_n": np.float64(5), "entropy_mean": np.float64(0.5), "entropy_m2": np.float64(0.1),
             "entropy_hist": np.zeros(64, np.int64), "weight_hist": np.zeros(64, np.int64),
             "nonfinite": np.int64(0), "rank_counts": np.array([[6, 0, 0], [0, 4, 0]])}
    r = RouterView(state)
    assert r.idle_on_a_rank == [0, 1] and r.never_routed == [2]
    del state["rank_counts"]  # a file written before the field: one row, the counts
    assert RouterView(state).rank_counts.tolist() == [[6, 4, 0]] and RouterView(state).idle_on_a_rank == []


def test_flattened_tensors_read_the_forward_tokens():
    """A plain site on the router (its logits, [batch·seq, E]) and on the experts' input
    ([batch·seq, D]) gets the tokens of the forward: padding is left out."""
    model = _mixtral()
    batches = _batches(2, 3)
    tape = _Tape(model)
    with probe.capture(model, sites=["model.layers.0.mlp.gate", "model.layers.1.mlp.experts:input"],
                       stats=("moments",)) as c:
        tape.run(model, batches)
    tape.remove()
    logits = np.concatenate([f[("router", 0)][0][f["mask"]] for f in tape.seen])
    x = np.concatenate([f[("experts", 1)][0][f["mask"]] for f in tape.seen])
    for name, ref in (("model.layers.0.mlp.gate", logits), ("model.layers.1.mlp.experts:input", x)):
        s = c.result[name]
        assert s.tokens == ref.shape[0]
        np.testing.assert_allclose(s.channel.mean, ref.mean(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(s.channel.var, ref.var(0), rtol=1e-7, atol=1e-12)


def test_flattened_tensor_of_another_size_is_refused():
    ctx = TokenContext(1, 0, 0, 0)
    ctx.calls[""] = CallInputs(mask=torch.ones(2, 5, dtype=torch.bool))
    assert ctx.flat_tokens("", 10, torch.device("cpu")).valid.shape == (10,)
    with pytest.raises(probe.ProbeError, match=r"holds 7 rows but its forward has 2 x 5 = 10 tokens"):
        ctx.flat_tokens("", 7, torch.device("cpu"))


def test_site_names_and_selection():
    model = _qwen3()
    names = [s.name for s in resolve(model, "linear_inputs")]
    assert "model.layers.0.mlp.experts:experts" in names and "model.layers.1.mlp.experts:experts" in names
    assert "model.layers.0.mlp.experts:down_proj" in names and "model.layers.1.mlp.experts:down_proj" in names
    assert [s.name for s in resolve(model, "model.layers.*.mlp.experts:down_proj")] == [
        "model.layers.0.mlp.experts:down_proj", "model.layers.1.mlp.experts:down_proj"]
    assert [s.name for s in resolve(model, "model.layers.*.mlp.gate:router")] == [
        "model.layers.0.mlp.gate:router", "model.layers.1.mlp.gate:router"]
    assert [s.name for s in resolve(model, "model.layers.1.mlp.experts:experts")] == [
        "model.layers.1.mlp.experts:experts"]
    with pytest.raises(probe.ProbeError, match="matches no mixture-of-experts router"):
        resolve(model, "model.layers.*.mlp.experts:router")
    with pytest.raises(probe.ProbeError, match="found no mixture-of-experts layer"):
        resolve(transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)), "moe")


def test_router_site_refuses_an_unknown_output(recwarn):
    """A router that returns only its logits: its site is disabled with one line and never raises
    into the forward (which fails on its own here, as the block expects three values)."""
    model = _mixtral()
    gate = model.model.layers[0].mlp.gate
    original = gate.forward
    with probe.capture(model, sites="moe") as c:
        gate.forward = lambda h: original(h)[0]  # noqa: E731 - logits only: the block then fails below
        try:
            with pytest.raises(Exception):
                model(input_ids=torch.tensor([[3, 4, 5]]))
        finally:
            gate.forward = original
        model(input_ids=torch.tensor([[3, 4, 5]]))
    assert "model.layers.0.mlp.gate:router" in c.result.meta["disabled"]
    assert "not (logits, weights, indices)" in c.result.meta["disabled"]["model.layers.0.mlp.gate:router"]
    # the other layer, called as transformers calls it, is recorded (the failed forward is not)
    assert c.result["model.layers.1.mlp.experts:experts"].experts.tokens.sum() == 3 * 2
    assert c.result["model.layers.1.mlp.gate:router"].router.tokens == 3


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A calibration run of tiny Qwen3-MoE (linear_inputs: the experts included) and its tape."""
    model = _qwen3()
    batches = _batches(2, 7)
    tape = _Tape(model)
    path = tmp_path_factory.mktemp("calib") / "calib.h5"
    with probe.capture(model, path, sites="linear_inputs", stats=("moments", "histogram")):
        tape.run(model, batches)
    tape.remove()
    return tape, path


def test_imatrix_per_expert_layout(calibrated, tmp_path):
    gguf = pytest.importorskip("gguf")
    tape, path = calibrated
    with pytest.warns(UserWarning, match="experts with little or no calibration data") if any(
            (_reference(tape, i, False)["counts"] == 0).any() for i in range(2)) else _nothing():
        names = probe.export("imatrix", path, tmp_path / "imatrix.gguf")
    assert names["model.layers.0.mlp.experts.gate_proj"] == "blk.0.ffn_gate_exps.weight"
    assert names["model.layers.1.mlp.experts.up_proj"] == "blk.1.ffn_up_exps.weight"
    # an architecture without expert tensors would leave every expert out: refused, naming the model's own
    with pytest.raises(probe.ProbeError, match=r"'qwen3' names none of the 2 experts modules .*pass --arch "
                                               r"qwen3moe or no --arch"):
        probe.export("imatrix", path, tmp_path / "other.gguf", arch="qwen3")
    assert not (tmp_path / "other.gguf").exists()
    reader = gguf.GGUFReader(str(tmp_path / "imatrix.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    for i, layer in enumerate(tape.layers):
        ref = _reference(tape, i, False)
        e, d = layer.n_experts, 16
        sum2 = np.array([np.square(np.array(r)).sum(0) if r else np.zeros(d) for r in ref["x"]])
        for proj in ("gate", "up"):
            base = f"blk.{i}.ffn_{proj}_exps.weight"
            t2, tc = tensors[base + ".in_sum2"], tensors[base + ".counts"]
            # llama-imatrix's layout of a MUL_MAT_ID weight: ggml ne = [D, E] and [1, E]
            assert list(t2.shape) == [d, e] and list(tc.shape) == [1, e]
            np.testing.assert_allclose(np.asarray(t2.data).reshape(e, d), sum2, rtol=1e-6, atol=1e-30)
            np.testing.assert_array_equal(np.asarray(tc.data).reshape(e), ref["counts"].astype(np.float32))
        # the down projection's input per expert, [I, E] in ggml order (I = 12, moe_intermediate_size)
        down2 = np.array([np.square(np.array(r)).sum(0) if r else np.zeros(12) for r in ref["down"]])
        base = f"blk.{i}.ffn_down_exps.weight"
        t2, tc = tensors[base + ".in_sum2"], tensors[base + ".counts"]
        assert list(t2.shape) == [12, e] and list(tc.shape) == [1, e]
        # float32 model vs float64 recompute (see _check_down)
        np.testing.assert_allclose(np.asarray(t2.data).reshape(e, 12), down2, rtol=1e-4, atol=1e-5 * down2.max())
        np.testing.assert_array_equal(np.asarray(tc.data).reshape(e), ref["counts"].astype(np.float32))
        assert names[layer.experts + ".down_proj"] == base
    assert f"blk.0.attn_q.weight.in_sum2" in tensors


def _read_legacy(path) -> tuple[dict, int, str]:
    """llama-imatrix's legacy .dat, read field by field (tools/imatrix/imatrix.cpp)."""
    buf = open(path, "rb").read()
    at = 0

    def i32():
        nonlocal at
        at += 4
        return int(np.frombuffer(buf, "<i4", 1, at - 4)[0])

    out = {}
    for _ in range(i32()):
        n = i32()
        name = buf[at:at + n].decode()
        at += n
        ncall, nval = i32(), i32()
        out[name] = (ncall, np.frombuffer(buf, "<f4", nval, at).copy())
        at += 4 * nval
    chunks, n = i32(), i32()
    dataset = buf[at:at + n].decode()
    assert at + n == len(buf)
    return out, chunks, dataset


def test_imatrix_legacy_dat_per_expert(calibrated, tmp_path):
    """The legacy .dat holds each expert's mean x² row scaled by ncall (no per-expert counts: an
    expert with no token is 1 · ncall, as llama-imatrix writes partial data)."""
    pytest.importorskip("gguf")
    tape, path = calibrated
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe.export("imatrix", path, tmp_path / "imatrix.dat", chunk_size=4)
    entries, chunks, dataset = _read_legacy(tmp_path / "imatrix.dat")
    assert list(entries) == sorted(entries) and dataset == path.name  # the runs as imatrix.datasets names them
    for i, layer in enumerate(tape.layers):
        ref = _reference(tape, i, False)
        counts = ref["counts"]
        ncall = math.ceil(counts.max() / 4)
        for proj, rows, d in (("gate", ref["x"], 16), ("up", ref["x"], 16), ("down", ref["down"], 12)):
            got_ncall, values = entries[f"blk.{i}.ffn_{proj}_exps.weight"]
            want = np.array([np.square(np.array(r)).mean(0) if r else np.ones(d) for r in rows]) * ncall
            assert got_ncall == ncall and values.shape == (layer.n_experts * d,)
            np.testing.assert_allclose(values.reshape(-1, d), want, rtol=1e-4 if proj == "down" else 1e-6)
    assert chunks >= 1 and "blk.0.attn_q.weight" in entries


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_smoothquant_amax_and_coverage_per_expert(calibrated, tmp_path):
    tape, path = calibrated
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scales = probe.export("smoothquant", path, tmp_path / "act_scales.pt")
        doc = probe.export("amax", path, tmp_path / "amax.json", min_tokens=4)
    from probe.export import expert_coverage

    rows = expert_coverage(path, min_tokens=4)
    for i, layer in enumerate(tape.layers):
        ref = _reference(tape, i, False)
        absmax = np.array([np.abs(np.array(r)).max(0) if r else np.zeros(16) for r in ref["x"]], np.float32)
        np.testing.assert_array_equal(scales[layer.experts + ".gate_up_proj"].numpy(), absmax)
        entry = doc["experts"][layer.experts + ".gate_up_proj"]
        assert entry["tokens"] == ref["counts"].tolist()
        np.testing.assert_array_equal(np.array(entry["amax"], np.float32), absmax.max(1))
        down = np.array([np.abs(np.array(r)).max(0) if r else np.zeros(12) for r in ref["down"]])
        assert scales[layer.experts + ".down_proj"].shape == (layer.n_experts, 12)
        np.testing.assert_allclose(scales[layer.experts + ".down_proj"].numpy(), down, rtol=1e-5,
                                   atol=1e-6 * down.max())
        entry = doc["experts"][layer.experts + ".down_proj"]
        assert entry["tokens"] == ref["counts"].tolist() and np.shape(entry["channel_amax"]) == (layer.n_experts, 12)
        np.testing.assert_allclose(entry["amax"], down.max(1), rtol=1e-5, atol=1e-6 * down.max())
        assert rows[i]["zero"] == [int(e) for e in np.flatnonzero(ref["counts"] == 0)]
        assert rows[i]["below"] == [int(e) for e in np.flatnonzero((ref["counts"] > 0) & (ref["counts"] < 4))]
    assert json.loads((tmp_path / "amax.json").read_text())["coverage"][0]["module"] == tape.layers[0].experts


def test_show_plot_and_cli_report_the_experts(tmp_path, capsys):
    from probe.cli import main
    from probe.present.experts import coverage_table, moe_table
    from probe.present.plot import figures

    model = _qwen3()
    with probe.capture(model, tmp_path / "run.h5", sites=["hidden_states", "linear_inputs", "moe"],
                       stats=("moments", "histogram")):
        for ids, mask in _batches(1, 9):
            model(input_ids=ids, attention_mask=mask)
    run = probe.load(tmp_path / "run.h5")
    rows = moe_table(run)
    assert [r["router"] for r in rows] == ["model.layers.0.mlp.gate:router", "model.layers.1.mlp.gate:router"]
    for r in rows:
        counts = np.array(r["counts"])
        assert counts.sum() == r["k"] * r["tokens"] and r["never_routed"] == list(np.flatnonzero(counts == 0))
    cov = coverage_table(run, 5)
    for r, c in zip(rows, cov):
        counts = np.array(r["counts"])
        assert c["zero"] == list(np.flatnonzero(counts == 0)) and c["below"] == list(
            np.flatnonzero((counts > 0) & (counts < 5)))
    assert main(["show", str(tmp_path / "run.h5")]) == 0
    assert "mixture of experts: routing per layer" in capsys.readouterr().out
    assert main(["show", str(tmp_path / "run.h5"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["moe"][1]["counts"] == rows[1]["counts"]
    for site in ("model.layers.1.mlp.gate:router", "model.layers.1.mlp.experts:down_proj"):
        assert main(["show", str(tmp_path / "run.h5"), "--site", site]) == 0  # its layer's routing row
        text = capsys.readouterr().out
        assert "mixture of experts: routing per layer" in text and "model.layers.1.mlp.gate:router" in text
    assert run["model.layers.1.mlp.gate:router"].tokens == rows[1]["tokens"]
    with pytest.raises(probe.ProbeError, match="the run captured 'experts', but at other sites"):
        run["model.layers.1.mlp.gate:router"].experts
    assert main(["show", str(tmp_path / "run.h5"), "--quant", "int8", "--min-tokens", "5"]) == 0
    assert "expert coverage" in capsys.readouterr().out
    assert main(["export", "imatrix", str(tmp_path / "run.h5"), "-o", str(tmp_path / "i.gguf"), "--min-tokens",
                 "5"]) == 0
    out = capsys.readouterr().out
    assert f"model.layers.0.mlp.experts: 12 experts, tokens {cov[0]['least']}..{cov[0]['most']}" in out
    figs = figures(run, kinds="experts")
    assert list(figs) == ["experts.png"]
    image = figs["experts.png"].axes[0].images[0].get_array()
    want = np.array([np.array(r["counts"]) / (np.sum(r["counts"]) / 12) for r in rows])
    np.testing.assert_allclose(np.ma.filled(image, 0.0), np.where(want > 0, want, 0.0))
    # the colour bar lies under the heat map (beside it, its label took the bar chart's place), and
    # the bar chart's own axis says it counts layers
    fig = figs["experts.png"]
    heat, bars, colour = fig.axes[0], fig.axes[1], fig.axes[2]
    fig.draw_without_rendering()
    hb, cb = heat.get_position(), colour.get_position()
    assert cb.y1 <= hb.y0 and cb.x0 >= hb.x0 - 0.02 and cb.x1 <= hb.x1 + 0.02, (hb, cb)
    assert bars.get_ylabel() == "layer" and heat.get_ylabel() == "layer"
    assert colour.get_xlabel().startswith("share") and not colour.get_ylabel()
    # the per-site figures run over the sites that hold their statistics' kind, not over the MoE
    # sites (no empty rows or columns for them); an index label stays an index in run.sites
    general = [n for n in run.sites if run[n].has("moments")]
    assert 0 < len(general) < len(run.sites)
    figs = figures(run, kinds=["channels", "depth"])
    grid = figs["channels_absmax.png"].axes[0].images[0].get_array()
    assert grid.shape[0] == len(general) and not np.ma.getmaskarray(grid).all(axis=1).any()
    depth = figs["depth.png"].axes[2]
    assert [t.get_text() for t in depth.get_xticklabels()] == [str(run.sites.index(n)) for n in general]
    assert depth.get_xlabel() == "site (index in run.sites)"
    assert sorted(depth.lines[0].get_xdata()) == list(range(len(general)))
    with probe.capture(model, tmp_path / "hm.h5", sites=["hidden_states", "moe"]):  # layers, by name
        for ids, mask in _batches(1, 9):
            model(input_ids=ids, attention_mask=mask)
    hm = probe.load(tmp_path / "hm.h5")
    depth = figures(hm, kinds="depth")["depth.png"].axes[2]
    assert [t.get_text() for t in depth.get_xticklabels()] == ["0", "1", "2"]
    assert depth.get_xlabel() == "layer (hidden_states index)"
    # a run of MoE sites alone: each skipped kind says why, under its own name
    with probe.capture(model, tmp_path / "moe.h5", sites="moe"):
        for ids, mask in _batches(1, 9):
            model(input_ids=ids, attention_mask=mask)
    assert main(["plot", str(tmp_path / "moe.h5"), "-o", str(tmp_path / "figs")]) == 0
    err = capsys.readouterr().err
    assert "skipped depth: plot kind 'depth' needs histogram statistics, and no site of this run holds them " \
           "(its sites hold experts, router statistics only)" in err, err


def test_general_tables_reprs_and_grads_leave_the_moe_sites_to_their_own(tmp_path):
    """probe show's moments and geometry tables leave out the MoE sites (their table shows them),
    the views' reprs show routing, a grads run has no gradient site for them, and the Capture's
    repr names the statistics its MoE sites run."""
    from probe.present import report, research

    model = _qwen3().train()
    c = probe.capture(model, tmp_path / "g.h5", sites=["hidden_states", "moe"], grads=True)
    assert "'router', 'experts']" in repr(c).splitlines()[0]
    with c:
        for ids, mask in _batches(1, 4):
            model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    run = probe.load(tmp_path / "g.h5")
    assert not [n for n in run.sites if "@grad" in n and ":" in n] and not run.meta.get("disabled")
    assert run["hidden_states.1"].grad is not None and run["model.layers.0.mlp.gate:router"].grad is None
    general = [e["site"] for e in report.summary(run)["sites"]]
    assert general and all(n.startswith("hidden_states") for n in general)
    assert all(e["site"].startswith("hidden_states") for e in research.summary(run)["sites"])
    r = run["model.layers.0.mlp.gate:router"]
    assert repr(r) == f"SiteView('model.layers.0.mlp.gate:router', {r.router!r})"
    assert f"tokens={r.router.tokens}," in repr(r) and "nan" not in repr(r)
    x = run["model.layers.0.mlp.experts:down_proj"]
    assert repr(x).startswith("SiteView('model.layers.0.mlp.experts:down_proj', ExpertsView(E=12, D=12, tokens=")


def test_generate_counts_prefill_and_decode_tokens():
    """Under generate (KV cache) the decode forwards' [batch·1, D] rows are real tokens; the
    prefill's padding is not."""
    model = _mixtral()
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1] * 5])
    with probe.capture(model, sites="moe") as c:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    for layer in moe_layers(model):
        r = c.result[layer.router + ":router"].router
        assert r.tokens == 8 + 2 * 2 and r.counts.sum() == 2 * r.tokens  # 8 real prompt tokens, 2 decode steps
        assert c.result[layer.experts + ":experts"].experts.tokens.sum() == 2 * r.tokens


def test_an_expert_empty_in_one_part_merges_as_the_identity():
    from probe.stats._state import empty_state, merge_states

    rng = np.random.default_rng(0)
    xa, xb = rng.normal(size=(5, 4)), rng.normal(size=(7, 4))

    def state(rows_per_expert):
        s = empty_state("experts", {"E": 2, "D": 4})
        for e, x in enumerate(rows_per_expert):
            if len(x):
                s["tokens"][e], s["n"][e], s["mean"][e] = len(x), len(x), x.mean(0)
                s["m2"][e], s["absmax"][e] = ((x - x.mean(0)) ** 2).sum(0), np.abs(x).max(0)
        return s

    merged = merge_states("experts", [state([xa, []]), state([xb, xb])])  # expert 1: no token in part one
    both = np.concatenate([xa, xb])
    np.testing.assert_allclose(merged["mean"][0], both.mean(0), rtol=1e-12)
    np.testing.assert_allclose(merged["m2"][0], ((both - both.mean(0)) ** 2).sum(0), rtol=1e-12)
    np.testing.assert_allclose(merged["mean"][1], xb.mean(0), rtol=1e-12)
    np.testing.assert_allclose(merged["m2"][1], ((xb - xb.mean(0)) ** 2).sum(0), rtol=1e-12)
    np.testing.assert_array_equal(merged["tokens"], [12, 7])
    np.testing.assert_array_equal(merged["absmax"][1], np.abs(xb).max(0).astype(np.float32))


def _switch():
    torch.manual_seed(2)
    cfg = transformers.SwitchTransformersConfig(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=24, num_layers=2,
                                                num_decoder_layers=2, num_heads=2, num_experts=4, encoder_sparse_step=1,
                                                decoder_sparse_step=1, expert_capacity=64)
    return transformers.SwitchTransformersForConditionalGeneration(cfg).eval()


def test_experts_held_as_modules_per_expert_over_real_tokens():
    """Switch Transformers holds its experts as a ModuleDict of MLPs (``wi``, ``wo``): per-expert
    inputs of the first and the last Linear, over real tokens, against float64 numpy that
    recomputes the top-1 routing from the router logits; the output is bitwise unchanged."""
    model = _switch()
    layers = moe_layers(model)
    assert [(x.experts, x.n_experts, x.top_k, x.router) for x in layers][:1] == [
        ("encoder.block.0.layer.1.mlp.experts", 4, 1, None)]
    modules = dict(model.named_modules())
    seen: list[dict] = []
    hooks = []
    for i, layer in enumerate(layers):
        router = modules[layer.experts.rsplit(".", 1)[0] + ".router"]
        hooks.append(router.register_forward_hook(  # logits [batch, seq, E] -> [n, E]
            lambda m, a, out, i=i: (seen[-1] if seen else {}).__setitem__(
                ("logits", i), out[2].detach().double().numpy().reshape(-1, out[2].shape[-1]))))
        hooks.append(modules[layer.experts].register_forward_pre_hook(
            lambda m, a, i=i: (seen[-1] if seen else {}).__setitem__(("x", i), a[0].detach().double().numpy().copy())))
    g = torch.Generator().manual_seed(3)
    batches = []
    for j in range(2):
        ids = torch.randint(3, VOCAB, (3, 7), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 5 - j:] = 0
        batches.append((ids, mask, torch.randint(3, VOCAB, (3, 4), generator=g)))
    with torch.no_grad():
        plain = [model(input_ids=i, attention_mask=a, decoder_input_ids=d).logits for i, a, d in batches]
    seen.clear()
    picked = [x.name for x in resolve(model, "linear_inputs")]
    assert "encoder.block.0.layer.1.mlp.experts:down_proj" in picked and not [n for n in picked if ".expert_" in n]
    with probe.capture(model, sites="moe") as c:
        with torch.no_grad():
            for ids, mask, dec in batches:
                seen.append({"enc": mask.numpy().reshape(-1).astype(bool), "dec": np.ones(dec.numel(), bool)})
                assert torch.equal(model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
                                   plain[len(seen) - 1])
    for h in hooks:
        h.remove()
    assert not c.result.meta.get("disabled")
    for i, layer in enumerate(layers):
        experts = modules[layer.experts]
        wi = [experts[f"expert_{e}"].wi.weight.detach().double().numpy() for e in range(4)]
        ref: dict = {"x": [[] for _ in range(4)], "down": [[] for _ in range(4)]}
        for f in seen:
            real = f["enc" if layer.experts.startswith("encoder") else "dec"]
            top = np.argmax(f[("logits", i)], -1)  # top-1, capacity 64: no token dropped
            for t in np.flatnonzero(real):
                x = f[("x", i)][t]
                ref["x"][top[t]].append(x)
                ref["down"][top[t]].append(np.maximum(wi[top[t]] @ x, 0.0))  # relu(wi x), dropout off
        _check_experts(c.result[layer.experts + ":experts"].experts, ref)
        _check_down(c.result[layer.experts + ":down_proj"].experts, ref)


def _expert_rows(rng, n, e, k, d, per_slot):
    """Packed experts rows ``[n, k + W]`` (distinct experts per token) and the rows each expert reads."""
    index = np.stack([rng.permutation(e)[:k] for _ in range(n)])
    x = rng.normal(size=(n, k, d) if per_slot else (n, d)).astype(np.float32) * 3 + 1
    return index, x


def _pack(index, x):
    return torch.from_numpy(np.concatenate([index.astype(np.float32), x.reshape(len(x), -1)], 1))


def _fold_reference(index, x, valid, e, per_slot):
    """float64 numpy over the finite values of the rows routed to each expert by real tokens."""
    n, k = index.shape
    rows = [[] for _ in range(e)]
    for t in np.flatnonzero(valid):
        for j in range(k):
            rows[index[t, j]].append(x[t, j] if per_slot else x[t])
    return rows


@pytest.mark.parametrize("per_slot", [False, True])
@pytest.mark.parametrize("case", ["plain", "cancellation", "nan_routed", "nan_padding"])
@pytest.mark.parametrize("host_reads", [True, False])
@pytest.mark.parametrize("e", [6, 40])  # the routing product, or a scatter per slot past 16·k experts
def test_expert_fold_paths_against_float64(per_slot, case, host_reads, e, monkeypatch):
    """The CPU fast path (shifted one-pass sums by one product with the routing one-hot) and the
    two-pass masked path give the float64 reference; a chunk the fast path cannot do exactly (a
    channel whose mean lies ~10⁵ standard deviations from the chunk's, a non-finite routed value) is
    redone by the two-pass path (a non-finite routed value) or has that expert's rows redone in
    two passes (cancellation), and a non-finite value in a padding row changes nothing."""
    from probe.stats import _base
    from probe.stats._base import Tokens
    from probe.stats.experts import Experts

    monkeypatch.setattr(_base, "DENSE_CPU", host_reads)
    two_pass = []
    orig = Experts._two_pass
    monkeypatch.setattr(Experts, "_two_pass", lambda self, *a: two_pass.append(1) or orig(self, *a))
    rng = np.random.default_rng(3)
    k, d, n = 2, 5, 40
    index, x = _expert_rows(rng, n, e, k, d, per_slot)
    valid = np.ones(n, bool)
    valid[30:] = False
    if case == "cancellation":  # expert 0's tokens hold channel 2 at 1e4 + tiny noise
        for t in np.flatnonzero((index == 0).any(1)):
            j = list(index[t]).index(0)
            if per_slot:
                x[t, j, 2] = 1e4 + rng.normal() * 1e-1
            else:
                x[t, 2] = 1e4 + rng.normal() * 1e-1
    elif case == "nan_routed":
        (x[3] if not per_slot else x[3, 1])[1] = np.nan
    elif case == "nan_padding":
        (x[35] if not per_slot else x[35, 0])[4] = np.inf
    stat = Experts()
    stat.configure(e, k, per_slot)
    tokens = Tokens(torch.from_numpy(valid), torch.from_numpy(valid), torch.arange(n), torch.zeros(n, dtype=torch.long),
                    torch.full((n,), -1), 0)
    for half in (slice(0, 20), slice(20, n)):  # two chunks: the merge too
        stat.update(_pack(index[half], x[half]), tokens.slice(half.start, half.stop))
    if case != "nan_padding":  # there either path may run: the numbers are the same
        assert bool(two_pass) == (not host_reads or case == "nan_routed")
    st = {f: v.numpy() for f, v in stat.state_dict().items()}
    rows = _fold_reference(index, x.astype(np.float64), valid, e, per_slot)
    for ex, r in enumerate(rows):
        r = np.array(r).reshape(-1, d)
        fin = np.isfinite(r)
        assert st["tokens"][ex] == len(r) and st["nonfinite"][ex] == (~fin).sum()
        np.testing.assert_array_equal(st["n"][ex], fin.sum(0))
        if not len(r):
            assert (st["absmax"][ex] == 0).all() and (st["m2"][ex] == 0).all()
            continue
        for c in range(d):
            v = r[fin[:, c], c]
            np.testing.assert_allclose(st["mean"][ex, c], v.mean(), rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(st["m2"][ex, c], ((v - v.mean()) ** 2).sum(), rtol=1e-9, atol=1e-12)
            assert st["absmax"][ex, c] == np.float32(np.abs(v).max())
