"""A statistic defined outside probe flows through everything once registered: capture, the rank
merge (probe.capture.sync), the file (writer and reader), probe.load and the exact file merge.

The toy statistic, per channel sum of squares and kept-token count, is declared here with its
state and nothing else: no file under src/ knows it."""

from __future__ import annotations

import datetime

import numpy as np
import pytest
import torch
import torch.distributed as dist

import probe
from probe import stats as registry
from probe.stats._base import StatBase, Tokens
from probe.stats._state import SPECS, Field, State, merge_rows
from conftest import free_port, rank_group, spawn_ranks


class SumSq(StatBase):
    """Per-channel sum of squares of the kept values, and the kept tokens."""

    name = "toy"
    chunked = True
    spec = State("toy", (
        Field("tokens", "int64", (), "sum", 0, "kept tokens"),
        Field("sumsq", "float64", ("D",), "sum", 0.0, "sum of x^2 per channel, units^2"),
    ))

    def dims(self, x: torch.Tensor) -> dict[str, int]:
        return {"D": x.shape[-1]}

    @classmethod
    def update_group(cls, stats: list, x: torch.Tensor, tokens: Tokens) -> None:
        if not cls._ready(stats, x):
            return
        w = tokens.keep.to(torch.float64).view(1, -1, 1)
        sumsq = (x.double().square() * w).sum(-2)  # [G, D]
        kept = tokens.keep.sum()
        for g, stat in enumerate(stats):
            stat.s["sumsq"] = stat.s["sumsq"] + sumsq[g]
            stat.s["tokens"] = stat.s["tokens"] + kept


@pytest.fixture
def toy():
    registry.register(SumSq)
    try:
        yield SumSq
    finally:
        registry.unregister("toy")
    assert "toy" not in registry.NAMES and "toy" not in SPECS


STATS = ("moments", "toy")


def _batches(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, 97, (2, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 9 - 2 - i:] = 0  # right padding: excluded tokens
        out.append((ids, mask))
    return out


def _reference(model, batches) -> dict[str, tuple[int, np.ndarray]]:
    """float64 numpy over the materialized hidden states: per site (kept tokens, sum of squares)."""
    out: dict[str, tuple[int, np.ndarray]] = {}
    for ids, mask in batches:
        with torch.no_grad():
            hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        keep = mask.numpy().astype(bool)
        for i, h in enumerate(hs):
            x = h.double().numpy()[keep]  # [kept tokens, D]
            n, s = out.get(f"hidden_states.{i}", (0, 0.0))
            out[f"hidden_states.{i}"] = (n + x.shape[0], s + (x * x).sum(0))
    return out


def _capture(model, batches, out=None, **kw):
    with probe.capture(model, out, stats=STATS, overwrite=True, **kw) as c:
        for ids, mask in batches:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
    return c


def _check(state: dict, want: tuple[int, np.ndarray]) -> None:
    assert int(state["tokens"]) == want[0]
    np.testing.assert_allclose(state["sumsq"], want[1], rtol=1e-9)


def test_unknown_until_registered(tiny):
    with pytest.raises(probe.ProbeError, match="unknown stats"):
        probe.capture(tiny("llama"), stats=STATS)


def test_toy_statistic_capture_file_load_merge(tiny, toy, tmp_path):
    model = tiny("llama")
    first, second = _batches(3, 1), _batches(2, 2)
    want = _reference(model, first)
    c = _capture(model, first, tmp_path / "a.h5")
    run = probe.load(tmp_path / "a.h5")
    assert "toy" in run.stats and set(run.sites) == set(want)
    for name, ref in want.items():
        _check(run.total.sites[name]["toy"], ref)
        _check(c.result.total.sites[name]["toy"], ref)

    # two files merged exactly equal one pass over both files' batches
    _capture(model, second, tmp_path / "b.h5")
    merged = probe.merge([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "ab.h5")
    once = _capture(model, first + second).result
    both = _reference(model, first + second)
    for name in want:
        got, one = merged.total.sites[name]["toy"], once.total.sites[name]["toy"]
        _check(got, both[name])
        assert int(got["tokens"]) == int(one["tokens"])
        np.testing.assert_allclose(got["sumsq"], one["sumsq"], rtol=1e-12)
        # the moments, merged alongside, agree too
        np.testing.assert_array_equal(merged.total.sites[name]["moments"]["n"], once.total.sites[name]["moments"]["n"])


def test_toy_statistic_rank_merge(tiny, toy):
    """probe.capture.sync in a one-process gloo group: the toy state goes through the declared
    reductions (dims agreed, identity states, packed all_reduce) and equals the file merge."""
    from probe.capture.sync import merge_windows

    if dist.is_initialized():  # pragma: no cover - the suite never leaves a group behind
        pytest.skip("a process group is already initialized")
    model = tiny("llama")
    batches = _batches(3, 3)
    c = _capture(model, batches, every=1, distributed=False)
    rows = list(c.result.rows)
    # two windows under one label: the rank merges them before reducing
    rows[1] = type(rows[1])(rows[0].step, rows[1].sites, rows[1].cross)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        merged = merge_windows(rows, c.sites, [k for k in c.stats if k != "cross"], False)
    finally:
        dist.destroy_process_group()
    steps = sorted({int(r.step) for r in rows})
    assert [w.step for w in merged] == steps
    want = _reference(model, batches)
    total = merge_rows(merged)
    for name in c.sites:
        _check(total.sites[name]["toy"], want[name])
        for step, got in zip(steps, merged):
            ref = merge_rows([r for r in rows if r.step == step]).sites[name]["toy"]
            assert int(got.sites[name]["toy"]["tokens"]) == int(ref["tokens"])
            np.testing.assert_allclose(got.sites[name]["toy"]["sumsq"], ref["sumsq"], rtol=1e-12)


def _llama():
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=97)
    return transformers.LlamaForCausalLM(cfg).eval()


def _rank(rank: int, world: int, port: int, folder: str) -> None:
    """One rank: registers the toy (a fresh process knows only the built-in statistics), rebuilds
    every rank's windows (uneven batch counts, one capture per rank) and merges its own across
    the group; the result must equal the file merge of all of them, on every rank."""
    from probe.capture.sync import merge_windows

    registry.register(SumSq)
    with rank_group(rank, world, port, folder, 120):
        model = _llama()
        rows = [list(_capture(model, _batches(2 + r, 10 + r), every=1, distributed=False).result.rows)
                for r in range(world)]
        c = _capture(model, _batches(1, 10), distributed=False)
        merged = merge_windows(rows[rank], c.sites, [k for k in c.stats if k != "cross"], False)
        for got in merged:
            want = merge_rows([w for rs in rows for w in rs if w.step == got.step])
            for name in c.sites:
                mine, ref = got.sites[name]["toy"], want.sites[name]["toy"]
                assert int(mine["tokens"]) == int(ref["tokens"]), (name, got.step)
                np.testing.assert_allclose(mine["sumsq"], ref["sumsq"], rtol=1e-12, err_msg=name)


def test_toy_statistic_two_ranks(tmp_path):
    spawn_ranks(_rank, 2, tmp_path, timeout=240)


def test_toy_statistic_unregistered_when_read(tiny, tmp_path):
    """A file holding a statistic this process has not registered says so, one line, on reading the
    statistic and on merging (which would otherwise drop its data), instead of answering 'not captured'."""
    model = tiny("llama")
    registry.register(SumSq)
    try:
        paths = []
        for i in range(2):
            paths.append(tmp_path / f"r{i}.h5")
            _capture(model, _batches(1, 3 + i), out=paths[-1])
        want = probe.load(paths[0])[1].state("toy")
        assert set(want) == {"tokens", "sumsq"}
    finally:
        registry.unregister("toy")
    run = probe.load(paths[0])
    with pytest.raises(probe.ProbeError, match="'toy' was captured but is not registered"):
        run[1].state("toy")
    with pytest.raises(probe.ProbeError, match=r"statistics \['toy'\] that this process has not registered"):
        probe.merge(paths, tmp_path / "m.h5")


def test_registered_statistic_is_written_by_the_writer_process(tiny, toy, tmp_path, monkeypatch):
    """The host sends the declaration of a statistic registered at run time with each commit, so
    probe's writer process writes it too: no commit falls back to the host process (where a failed
    HDF5 write could still crash the job at exit)."""
    from probe.store.writer import Writer

    def here(*args, **kwargs):
        raise AssertionError("a commit was written in the host process")

    monkeypatch.setattr(Writer, "_append_here", here)
    model = tiny("llama")
    data = _batches(3, 4)
    with probe.capture(model, tmp_path / "w.h5", stats=STATS, every=1):
        for ids, mask in data:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
    run = probe.load(tmp_path / "w.h5")
    assert run.steps == [1, 2, 3]
    for name, ref in _reference(model, data).items():
        _check(run.total.sites[name]["toy"], ref)
