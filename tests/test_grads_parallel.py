"""``capture(..., grads=True)`` under ``torch.compile`` inside the block, DDP and FSDP2: the
gradient statistics checked against autograd's own ``.grad`` of the retained hidden states
(``output_hidden_states=True`` + ``retain_grad()``) in float64 numpy.

Two references each time. The same run's retained gradients are the exact one: the tensors
probe's hooks saw are the ones the model returned, so ``test_grads._check``'s tolerances hold
(absmax exact, moments to float64 rounding). An uncompiled, undistributed run over the same
weights and batches is the independent one: DDP averages the *parameter* gradients across ranks
but leaves the gradient of an activation (∂ of the rank's own loss) alone, and FSDP2 computes
with all-gathered copies of the same weights, so there the gradients are bitwise those of the
plain run; a compiled backward (AOT autograd's decompositions) reassociates float32 sums, so
there they agree to a few float32 units in the last place.

DDP and FSDP2 run on real gloo processes (torch.multiprocessing spawn, bounded timeouts), world
size 2, each rank its own batches, ``every=1``: each window is the merge of the two ranks'
forwards of that step (``"data"`` placement, docs/distributed.md). FSDP2, per-layer compile and
FSDP2 with compile are ``slow`` (``make test-slow``); the whole-model compile and DDP run always.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import probe
from conftest import rank_group, spawn_ranks
from test_grads import _batch, _check, _model, _reference

TIMEOUT = 120  # seconds: a hang fails the test instead of waiting for gloo's 30-minute default
SITES = [f"hidden_states.{i}" for i in range(3)]
#: compiled against uncompiled gradients, elementwise relative to the site's largest |gradient|:
#: measured 7.6e-8 (about one float32 unit, 2^-24 = 6e-8, per reassociated sum over the two layers);
#: 2^-20 leaves 16 units of room and still fails on any real error
COMPILED_RTOL = 2.0 ** -20


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Width-32 models: a second thread only waits (conftest's one_thread)."""


@pytest.fixture
def fresh_compiler():
    """Dynamo's caches emptied before and after: a frame compiled by an earlier test (or one past
    its recompile limit, which then runs eagerly) would otherwise decide what this test sees."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def _retained(model, runner, ids, mask) -> list[np.ndarray]:
    """One forward and backward through ``runner``; per site, float64 [real tokens, D] of autograd's
    .grad of the hidden states it returned (``model``'s parameter gradients are zeroed first)."""
    model.zero_grad()
    res = runner(input_ids=ids, attention_mask=mask, labels=ids, output_hidden_states=True)
    for h in res.hidden_states:
        h.retain_grad()
    res.loss.backward()
    keep = mask.bool().numpy()
    return [h.grad.double().numpy()[keep] for h in res.hidden_states]


def _near(view, g: np.ndarray) -> None:
    """One site's gradient view against a reference ``g`` that differs by float32 reassociation
    (elementwise within COMPILED_RTOL of the largest |g|): counts exact, the rest to that bound."""
    assert view.count == g.size and view.tokens == g.shape[0]
    scale = np.abs(g).max()
    assert abs(view.absmax - scale) <= COMPILED_RTOL * scale
    assert abs(view.mean - g.mean()) <= COMPILED_RTOL * scale
    np.testing.assert_allclose(view.std, g.std(), rtol=COMPILED_RTOL)
    np.testing.assert_allclose(view.channel.mean, g.mean(0), rtol=0, atol=COMPILED_RTOL * scale)


# ---------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("how", ["model", pytest.param("layers", marks=pytest.mark.slow)])
def test_grads_under_torch_compile_inside_the_block(how, fresh_compiler):
    """Compiled inside the block (the whole model, or each decoder layer): probe's hooks run
    eagerly at graph breaks, the gradient hook sits on the compiled region's output, and the
    backward (AOT autograd's compiled one) hands it that output's gradient."""
    batches = [_batch(20), _batch(21)]
    want = _reference(_model(), batches)  # uncompiled
    model = _model()
    compiler = CompileCounterWithBackend("aot_eager")  # AOT autograd: the backward is compiled too
    if how == "model":
        runner = torch.compile(model, backend=compiler)
    else:
        for layer in model.model.layers:
            layer.compile(backend=compiler)
        runner = model
    with probe.capture(model, grads=True, every=1, strict=True) as c:
        same = [_retained(model, runner, ids, mask) for ids, mask in batches]
    model.zero_grad()
    assert compiler.frame_count > 0  # graphs were compiled and ran, not the eager model
    assert c.steps == [1, 2]
    for k, step in enumerate(c.steps):
        for i, site in enumerate(SITES):
            view = c.at(step)[site].grad
            _check(view, same[k][i])  # the same run's .grad: exact
            _near(view, want[k][i])  # the uncompiled run's: float32 reassociation only
    for i, site in enumerate(SITES):
        _check(c.result[site].grad, np.concatenate([s[i] for s in same]))


def test_fullgraph_compile_says_why_it_cannot_break(fresh_compiler):
    """fullgraph=True forbids the graph breaks probe's hooks need: the compiler's own error
    says so and names the fix (probe.capture.forward.EAGER_REASON)."""
    from torch._dynamo.exc import Unsupported

    model = _model()
    runner = torch.compile(model, backend="aot_eager", fullgraph=True)
    ids, mask = _batch(22)
    with pytest.warns(UserWarning, match="3 of 3 sites recorded nothing"):  # the forward stopped at its first hook
        with probe.capture(model, grads=True) as c:
            with pytest.raises(Unsupported, match="compile without fullgraph=True while probe.capture is open"):
                runner(input_ids=ids, attention_mask=mask, labels=ids)
    assert c.result[SITES[1]].tokens == 0


# ---------------------------------------------------------------------------- DDP and FSDP2
def _rank_batches(rank: int) -> list[int]:
    return [30 + 2 * k + rank for k in range(2)]  # rank 0: seeds 30, 32; rank 1: 31, 33


def _worker(rank: int, world: int, port: int, folder: str, mode: str) -> None:
    with rank_group(rank, world, port, folder, TIMEOUT):
        model = _model()
        if mode == "ddp":
            runner = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            runner = torch.compile(model, backend="aot_eager") if mode == "fsdp_compile" else model
        got = {}
        # DDP: the wrapper is what a training loop holds and hands to probe (its sites are the model's)
        watched = runner if mode == "ddp" else model
        with probe.capture(watched, os.path.join(folder, "g.h5"), grads=True, every=1, strict=True) as c:
            for k, seed in enumerate(_rank_batches(rank)):
                ids, mask = _batch(seed)
                for i, g in enumerate(_retained(model, runner, ids, mask)):
                    got[f"b{k}s{i}"] = g
        np.savez(os.path.join(folder, f"rank{rank}.npz"), **got)
        if rank:  # every rank holds the merged result: keep it to compare with rank 0's file
            from probe.store import write_run

            write_run(c.result, os.path.join(folder, f"result{rank}.h5"))


def _check_ranks(tmp_path, mode: str) -> None:
    spawn_ranks(_worker, 2, tmp_path, mode, timeout=3 * TIMEOUT)
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    plain = {r: _reference(_model(), [_batch(s) for s in _rank_batches(r)]) for r in range(2)}
    for r in range(2):  # the ranks' activation gradients are the plain run's on their own batches
        for k in range(2):
            for i in range(3):
                g, p = ranks[r][f"b{k}s{i}"], plain[r][k][i]
                if mode == "fsdp_compile":
                    assert np.abs(g - p).max() <= COMPILED_RTOL * np.abs(p).max()
                else:
                    np.testing.assert_array_equal(g, p, err_msg=f"{mode} rank {r} batch {k} site {i}")
    run, other = probe.load(tmp_path / "g.h5"), probe.load(tmp_path / "result1.h5")
    assert run.steps == other.steps == [1, 2] and run.meta["world_size"] == 2
    for k, step in enumerate(run.steps):  # window k: both ranks' k-th forward
        for i, site in enumerate(SITES):
            both = np.concatenate([ranks[r][f"b{k}s{i}"] for r in range(2)])
            for r in (run, other):
                _check(r.at(step)[site].grad, both)
    for i, site in enumerate(SITES):
        _check(run[site].grad, np.concatenate([ranks[r][f"b{k}s{i}"] for r in range(2) for k in range(2)]))


def test_grads_under_ddp(tmp_path):
    _check_ranks(tmp_path, "ddp")


@pytest.mark.slow  # ~50 s on a busy 2-core machine: two processes, FSDP2's all-gathers over gloo
def test_grads_under_fsdp2(tmp_path):
    _check_ranks(tmp_path, "fsdp")


@pytest.mark.slow  # ~2 min: each rank compiles
def test_grads_under_fsdp2_compiled_inside_the_block(tmp_path):
    _check_ranks(tmp_path, "fsdp_compile")
