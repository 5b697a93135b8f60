"""Capture under torch.distributed with uneven batch counts: real gloo processes on localhost
(torch.multiprocessing spawn, bounded timeouts), compared against one process over the same
batches and against the file merge of the ranks' own windows."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import probe
from conftest import rank_group, spawn_ranks

TIMEOUT = 120  # seconds: a hang fails the test instead of waiting for gloo's 30-minute default


def _model():
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=97)
    return transformers.LlamaForCausalLM(cfg).eval()


def _batches(n: int):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        ids = torch.randint(3, 97, (2, 10), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 10 - 2 * (i % 4):] = 0  # uneven lengths, right padding
        out.append((ids, mask))
    return out


def _shard(n: int, world: int, rank: int) -> list[int]:
    return [i for i in range(n) if i % world == rank]


OPTIONS = dict(skip_first=1, max_positions=16, sample_size=64)


def _worker(rank: int, world: int, port: int, folder: str, n: int, every: int | None) -> None:
    with rank_group(rank, world, port, folder, TIMEOUT):
        model = _model()
        data = _batches(n)
        out = os.path.join(folder, "dist.h5")
        with probe.capture(model, out, every=every, overwrite=True, **OPTIONS) as run:
            for i in _shard(n, world, rank):
                with torch.no_grad():
                    model(input_ids=data[i][0], attention_mask=data[i][1])
        if rank:  # every rank holds the merged result: save it to compare with rank 0's file
            from probe.store import write_run

            write_run(run.result, os.path.join(folder, f"rank{rank}.h5"))
        _check_sync_against_file_merge(rank, world)


def _check_sync_against_file_merge(rank: int, world: int) -> None:
    """probe.capture.sync on windows every rank can rebuild equals the file merge (merge_rows) of them."""
    from probe.stats._state import merge_rows
    from probe.capture.sync import merge_windows

    model = _model()
    data = _batches(7)
    rows = []
    for r in range(world):  # rank r: a different number of forwards and its own seed
        with probe.capture(model, every=1, distributed=False, seed=r + 1, **OPTIONS) as c:
            for ids, mask in data[: 2 + r % 3]:
                with torch.no_grad():
                    model(input_ids=ids, attention_mask=mask)
        rows.append(c._recorder.rows)
    merged = merge_windows(rows[rank], c.sites, [k for k in c.stats if k not in ("cross", "cos")], True)
    steps = sorted({int(w.step) for rs in rows for w in rs})
    assert [w.step for w in merged] == steps
    for got in merged:
        want = merge_rows([w for rs in rows for w in rs if w.step == got.step])
        for name in c.sites:
            for kind, state in want.sites[name].items():
                for field, value in state.items():
                    mine = got.sites[name][kind][field]
                    if np.asarray(value).dtype == np.float64:  # sums and moment algebra: rounding only
                        np.testing.assert_allclose(mine, value, rtol=1e-12, atol=1e-12 * _finite_max(value),
                                                   err_msg=f"{name}.{kind}.{field}")
                    else:
                        np.testing.assert_array_equal(mine, value, err_msg=f"{name}.{kind}.{field}")
        for field, value in want.cross.items():
            np.testing.assert_allclose(got.cross[field], value, rtol=1e-12, atol=1e-12 * _finite_max(value))


def _finite_max(value) -> float:
    """max |v| over the finite entries (0 if none): a finite scale for an absolute tolerance."""
    v = np.abs(np.asarray(value, dtype=np.float64))
    v = v[np.isfinite(v)]
    return float(v.max()) if v.size else 0.0


def _spawn(world: int, folder, n: int, every: int | None) -> None:
    spawn_ranks(_worker, world, folder, n, every, timeout=3 * TIMEOUT)


def _one_process(n: int, indices) -> probe.results.run.Run:
    model = _model()
    data = _batches(n)
    with probe.capture(model, distributed=False, **OPTIONS) as run:
        for i in indices:
            with torch.no_grad():
                model(input_ids=data[i][0], attention_mask=data[i][1])
    return run.result


def _assert_same(a, b) -> None:
    assert a.sites == b.sites
    for name in a.sites:
        x, y = a[name], b[name]
        assert (x.count, x.tokens, x.min, x.max, x.absmax, x.nan) == (y.count, y.tokens, y.min, y.max, y.absmax,
                                                                      y.nan), name
        np.testing.assert_allclose([x.mean, x.var, x.skew, x.kurtosis], [y.mean, y.var, y.skew, y.kurtosis],
                                   rtol=1e-9, err_msg=name)
        np.testing.assert_array_equal(x.channel.count, y.channel.count)
        np.testing.assert_allclose(x.channel.var, y.channel.var, rtol=1e-9)
        np.testing.assert_array_equal(x.histogram_counts, y.histogram_counts)
        np.testing.assert_array_equal(x.position.tokens, y.position.tokens)
        np.testing.assert_array_equal(x.position.count, y.position.count)
        np.testing.assert_allclose(x.position.var, y.position.var, rtol=1e-9)
        assert len(x.sample) == len(y.sample)
    np.testing.assert_allclose(a.cross.cov, b.cross.cov, rtol=1e-9, atol=1e-12)


def _check(folder, world: int, n: int, every: int | None, steps: list[int]) -> None:
    run = probe.load(folder / "dist.h5")
    assert run.steps == steps and run.meta["world_size"] == world
    _assert_same(run, _one_process(n, range(n)))
    for rank in range(1, world):  # every rank ended with the same windows and result
        other = probe.load(folder / f"rank{rank}.h5")
        assert other.steps == steps
        _assert_same(other, run)
        np.testing.assert_array_equal(other[run.sites[1]].sample.value, run[run.sites[1]].sample.value)
    # one window: the batches each rank saw up to that step, and no other
    first = steps[0]
    upto = [i for r in range(world) for j, i in enumerate(_shard(n, world, r)) if j < first]
    _assert_same(run.at(first), _one_process(n, sorted(upto)))


def test_two_ranks_five_against_four_batches_every_1(tmp_path):
    _spawn(2, tmp_path, 9, 1)
    _check(tmp_path, 2, 9, 1, [1, 2, 3, 4, 5])


@pytest.mark.slow
def test_two_ranks_nine_batches_every_2(tmp_path):
    _spawn(2, tmp_path, 9, 2)
    _check(tmp_path, 2, 9, 2, [2, 4, 5])


@pytest.mark.slow
def test_four_ranks_uneven(tmp_path):
    _spawn(4, tmp_path, 10, 1)  # 3, 3, 2, 2 batches
    _check(tmp_path, 4, 10, 1, [1, 2, 3])
