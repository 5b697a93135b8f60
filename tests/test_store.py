"""The run file, schema 2: lazy one-way reading, the cumulative state, sparse storage, version 1,
and the capture-side seams (seed, meta, snapshot labels, iteration)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import probe
from conftest import batch
from probe.stats._state import SPECS, merge_rows

ROOT = Path(__file__).resolve().parents[1]


def _run(tiny, path, n=4, every=1, **options):
    model = tiny("gpt2")
    with probe.capture(model, out=path, every=every, max_positions=16, sample_size=32, **options) as run:
        for i in range(n):
            ids, mask = batch(2, 8, "right", seed=i)
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
    return run


def _same_state(a: dict, b: dict, rtol=1e-12) -> None:
    assert set(a) == set(b)
    for kind in a:
        assert bool(a[kind]) == bool(b[kind]), kind
        for field, value in a[kind].items():
            if np.asarray(value).dtype.kind == "f":
                np.testing.assert_allclose(value, b[kind][field], rtol=rtol, atol=1e-12, err_msg=f"{kind}.{field}")
            else:
                np.testing.assert_array_equal(value, b[kind][field], err_msg=f"{kind}.{field}")


def test_cumulative_state_equals_merge_of_windows(tiny, tmp_path):
    _run(tiny, tmp_path / "r.h5", n=5)
    run = probe.load(tmp_path / "r.h5")
    assert run.steps == [1, 2, 3, 4, 5] and len(run.rows) == 5
    merged = merge_rows(list(run.rows))
    for name in run.sites:
        _same_state(run.total.sites[name], merged.sites[name])
    for field, value in merged.cross.items():
        np.testing.assert_allclose(run.total.cross[field], value, rtol=1e-12, atol=1e-12)
    # a stale cumulative state (a writer killed mid-commit) is not trusted: the windows are merged
    with h5py.File(tmp_path / "r.h5", "r+") as f:
        f["total"].attrs["rows"] = -1
    stale = probe.load(tmp_path / "r.h5")
    for name in run.sites:
        assert stale[name].tokens == run[name].tokens
        np.testing.assert_array_equal(stale[name].histogram_counts, run[name].histogram_counts)
        assert stale[name].std == pytest.approx(run[name].std, rel=1e-12)


def test_window_reads_one_row_and_equals_a_capture_of_its_batches(tiny, tmp_path):
    _run(tiny, tmp_path / "r.h5", n=4, every=2, seed=5)
    run = probe.load(tmp_path / "r.h5")
    assert run.steps == [2, 4]
    model = tiny("gpt2")
    with probe.capture(model, max_positions=16, sample_size=32, seed=5) as ref:
        for i in (2, 3):
            ids, mask = batch(2, 8, "right", seed=i)
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
    window = run.at(4)
    for name in run.sites:
        a, b = window[name], ref[name]
        assert (a.count, a.tokens, a.min, a.max) == (b.count, b.tokens, b.min, b.max)
        np.testing.assert_allclose([a.mean, a.std, a.kurtosis], [b.mean, b.std, b.kurtosis], rtol=1e-9)
        np.testing.assert_array_equal(a.histogram_counts, b.histogram_counts)
        np.testing.assert_array_equal(a.position.tokens, b.position.tokens)
    with pytest.raises(probe.ProbeError, match=r"no window with step 3; expected one of \[2, 4\]"):
        run.at(3)


def test_sparse_histogram_and_shared_sample_coordinates(tiny, tmp_path):
    _run(tiny, tmp_path / "r.h5", n=3)
    run = probe.load(tmp_path / "r.h5")
    nonzero = [int(np.count_nonzero(w.sites["hidden_states.1"]["histogram"]["counts"])) for w in run.rows]
    with h5py.File(tmp_path / "r.h5", "r") as f:
        assert f["samples/key"].shape == (3, 32)  # one coordinate set per window, shared by 3 sites
        assert [f[f"sites/{k}/sample/window"]["coords"].tolist() for k in f["sites"]] == [[0, 1, 2]] * 3
        h = f["sites/01/histogram/window"]
        assert (h["end"] - h["start"]).tolist() == nonzero and h["start"][1:].tolist() == h["end"][:-1].tolist()
    for name in run.sites:  # every site's sample points at the same (row, position, channel)
        np.testing.assert_array_equal(run[name].sample.channel, run[run.sites[0]].sample.channel)


def test_norm_buckets_sparse_and_the_dense_layout_still_read(tiny, tmp_path, monkeypatch):
    """The norm histogram is stored like the value histogram (non-empty buckets only, per window
    and in /total); files that hold it dense in the record read the same."""
    import probe.store.schema as store

    live = _run(tiny, tmp_path / "sparse.h5", n=3)
    monkeypatch.setattr(store, "SPARSE", ("histogram",))  # the earlier layout: counts in the record
    monkeypatch.setenv("PROBE_COMMIT", "inline")  # written by this process, which holds the patch
    _run(tiny, tmp_path / "dense.h5", n=3, seed=live.seed)
    monkeypatch.undo()
    with h5py.File(tmp_path / "sparse.h5", "r") as f:
        g, t = f["sites/01/norm"], f["total/sites/01/norm"]
        assert "counts" not in g["window"].dtype.names and "counts" not in t["total"].dtype.names
        buckets = int(g.attrs["buckets"])
        assert buckets == int(t.attrs["buckets"]) == 2 ** (8 + 7)
        assert 0 < t["count"].shape[0] <= g["count"].shape[0] < buckets // 100
    with h5py.File(tmp_path / "dense.h5", "r") as f:
        assert "counts" in f["sites/01/norm/window"].dtype.names
    sparse, dense = probe.load(tmp_path / "sparse.h5"), probe.load(tmp_path / "dense.h5")
    for name in live.sites:
        ref = live.result.total.sites[name]["norm"]
        for run in (sparse, dense):
            _same_state({"norm": run[name]._state["norm"]}, {"norm": ref})
            for step in run.steps:
                np.testing.assert_array_equal(run.at(step)[name]._state["norm"]["counts"],
                                              live.result.at(step)[name]._state["norm"]["counts"])

    def norm_bytes(path):  # bytes the norm groups store, windows and total
        with h5py.File(path, "r") as f:
            sizes = []
            f.visititems(lambda key, obj: sizes.append(obj.id.get_storage_size())
                         if isinstance(obj, h5py.Dataset) and "/norm/" in f"/{key}" else None)
        return sum(sizes)

    # dense: 2**15 int64 buckets (256 KiB) per site in each /total record alone
    dense_bytes, sparse_bytes = norm_bytes(tmp_path / "dense.h5"), norm_bytes(tmp_path / "sparse.h5")
    assert dense_bytes > 3 * 2**18 > 2 * sparse_bytes


def test_read_side_does_not_import_torch(tiny, tmp_path):
    _run(tiny, tmp_path / "r.h5", n=2)
    script = f"""
import sys, types
sys.modules["torch"] = None  # any import of torch fails
pkg = types.ModuleType("probe"); pkg.__path__ = [{str(ROOT / "src" / "probe")!r}]; sys.modules["probe"] = pkg
import probe.store, probe.results.merge
run = probe.store.read({str(tmp_path / "r.h5")!r})
for site in run:
    print(site.name, site.tokens, round(site.std, 6), round(site.quantile(0.5), 6), len(site.sample))
print(run.at(1)["hidden_states.1"].tokens, run.cross.r2.shape)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    run = probe.load(tmp_path / "r.h5")
    lines = out.stdout.splitlines()
    s = run["hidden_states.1"]
    assert lines[1] == f"{s.name} {s.tokens} {round(s.std, 6)} {round(s.quantile(0.5), 6)} {len(s.sample)}"


def test_version_1_file_still_read(tmp_path):
    path = tmp_path / "v1.h5"
    rng = np.random.default_rng(0)
    d = 4
    with h5py.File(path, "w") as f:
        f.attrs["schema"], f.attrs["schema_version"] = "probe", 1
        f.attrs["meta"] = json.dumps({"sites": [{"name": "x", "module": "m"}], "stats": ["moments"]})
        f.create_dataset("steps", data=np.array([1, 2]))
        g = f.create_group("sites/00")
        g.attrs["name"] = "x"
        m = g.create_group("moments")
        m.create_dataset("_present", data=np.array([True, True]))
        values = [rng.normal(size=(5, d)), rng.normal(size=(3, d)) * 2 + 1]
        for field in SPECS["moments"].names:
            rows = []
            for v in values:
                mean = v.mean(0)
                state = {"n": np.full(d, len(v), float), "mean": mean, "m2": ((v - mean) ** 2).sum(0),
                         "m3": ((v - mean) ** 3).sum(0), "m4": ((v - mean) ** 4).sum(0),
                         "min": v.min(0).astype(np.float32), "max": v.max(0).astype(np.float32), "nan": 0,
                         "posinf": 0, "neginf": 0, "tokens": len(v), "absmax": np.float32(np.abs(v).max()),
                         "absmax_at": np.array([0, 0, 0, 0]), "large": np.zeros(d, np.int64)}
                rows.append(np.asarray(state[field]))
            m.create_dataset(field, data=np.stack(rows))
    run = probe.load(path)
    both = np.concatenate(values)
    assert run.steps == [1, 2] and run["x"].tokens == 8
    assert run["x"].var == pytest.approx(both.var(), rel=1e-12)
    assert run["x"].kurtosis == pytest.approx(((both - both.mean()) ** 4).mean() / both.var() ** 2 - 3, rel=1e-10)


def test_seed_drawn_per_capture_and_recorded(tiny, tmp_path):
    a = _run(tiny, tmp_path / "a.h5", n=1)
    b = _run(tiny, tmp_path / "b.h5", n=1)
    assert isinstance(a.meta, dict) and a.meta["sample"]["seed"] != b.meta["sample"]["seed"]
    assert probe.load(tmp_path / "a.h5").meta["sample"]["seed"] == a.meta["sample"]["seed"]
    assert not np.array_equal(a["hidden_states.1"].sample.key, b["hidden_states.1"].sample.key)
    c = _run(tiny, tmp_path / "c.h5", n=1, seed=7)
    assert c.meta["sample"]["seed"] == 7


def test_snapshot_labels_and_capture_like_a_run(tiny, tmp_path):
    model = tiny("gpt2")
    ids, _ = batch()
    with probe.capture(model, out=tmp_path / "r.h5", stats=("moments",)) as run:
        with torch.no_grad():
            model(input_ids=ids)
        run.snapshot()  # label 1: the number of forwards
        run.snapshot()  # no forward since the window labelled 1: nothing to commit
        with torch.no_grad():
            model(input_ids=ids)
        with pytest.raises(probe.ProbeError, match=r"snapshot\(step=1\): a window with step 1 was committed already"):
            run.snapshot(1)
        run.snapshot(3)
        with torch.no_grad():
            model(input_ids=ids)
    assert run.steps == [1, 3, 4]  # the final window takes the next free label
    assert sum(run.at(s)["hidden_states.1"].tokens for s in run.steps) == 3 * ids.numel()
    assert len(run) == 3 and [s.name for s in run] == run.sites
    assert run.meta == probe.load(tmp_path / "r.h5").meta


def test_merge_names_the_differing_key(tiny, tmp_path):
    model, eps, half = tiny("gpt2"), tiny("gpt2"), tiny("gpt2").to(torch.bfloat16)
    eps.config.layer_norm_epsilon = 1e-3
    half.config.dtype = torch.bfloat16  # as from_pretrained(dtype=torch.bfloat16) records it
    for m, path in ((model, "a.h5"), (eps, "b.h5"), (half, "c.h5")):
        with probe.capture(m, out=tmp_path / path, stats=("moments",)):
            with torch.no_grad():
                m(input_ids=batch()[0])
    with pytest.raises(probe.ProbeError, match=r"b\.h5 comes from another model than .*a\.h5 "
                       r"\(model\.config\.layer_norm_epsilon: 0\.001 vs 1e-05\)"):
        probe.merge([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "m.h5")
    with pytest.raises(probe.ProbeError, match=r"\(model\.config\.dtype: 'bfloat16' vs '<absent>'\)"):
        probe.merge([tmp_path / "a.h5", tmp_path / "c.h5"], tmp_path / "m.h5")


def test_default_runs_merge_into_one_run_over_both_inputs(tiny, tmp_path):
    model = tiny("llama")
    data = [batch(2, 8, "right", seed=i) for i in range(3)]
    for path, part in (("a.h5", data[:2]), ("b.h5", data[2:]), ("ab.h5", data)):
        with probe.capture(model, out=tmp_path / path, skip_first=1):  # default options: a fresh seed each
            for ids, mask in part:
                with torch.no_grad():
                    model(input_ids=ids, attention_mask=mask)
    merged = probe.merge([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "m.h5")
    one = probe.load(tmp_path / "ab.h5")
    assert len(merged.meta["sample"]["seeds"]) == 2
    for name in one.sites:
        a, b = merged[name], one[name]
        assert (a.count, a.tokens, a.min, a.max, a.absmax) == (b.count, b.tokens, b.min, b.max, b.absmax)
        np.testing.assert_allclose([a.mean, a.var, a.skew, a.kurtosis], [b.mean, b.var, b.skew, b.kurtosis], rtol=1e-9)
        np.testing.assert_array_equal(a.histogram_counts, b.histogram_counts)
        np.testing.assert_array_equal(a.position.tokens, b.position.tokens)
        assert len(a.sample) == len(b.sample)
    np.testing.assert_allclose(merged.cross.cov, one.cross.cov, rtol=1e-9, atol=1e-12)


def test_labels_in_any_order_are_kept_in_commit_order(tiny, tmp_path):
    """``snapshot(step)`` takes any new label (a job resumed from an earlier checkpoint labels its
    windows below the last one): the file keeps them in commit order and reads them back, since the
    readers check labels to be unique integers, not increasing ones (docs/format.md, Root)."""
    model = tiny("gpt2")
    ids, _ = batch()
    with probe.capture(model, out=tmp_path / "r.h5", stats=("moments",)) as run:
        for label in (100, 200, 150):
            with torch.no_grad():
                model(input_ids=ids)
            run.snapshot(label)
    assert run.steps == [100, 200, 150]
    again = probe.load(tmp_path / "r.h5")
    assert again.steps == [100, 200, 150] and [r.step for r in again.rows] == [100, 200, 150]
    assert again.at(150)["hidden_states.1"].tokens == ids.numel()


def test_relative_path_is_the_file_in_the_folder_at_creation(tiny, tmp_path, monkeypatch):
    """probe's writer process outlives the folder it started in: a relative ``out`` is the file in
    the current folder when the capture begins, whatever the writer process's own folder."""
    from probe.store import Writer, _server

    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    _server.Server._at_exit()
    monkeypatch.chdir(first)
    Writer("started-here.h5").close()  # the writer process starts in the first folder
    monkeypatch.chdir(second)
    model = tiny("gpt2")
    ids, _ = batch()
    with probe.capture(model, out="r.h5", every=1, stats=("moments",)) as run:
        with torch.no_grad():
            model(input_ids=ids)
            model(input_ids=ids)
    assert run.steps == [1, 2] and probe.load(second / "r.h5").steps == [1, 2]
    assert not (first / "r.h5").exists()


def test_two_captures_share_the_writer_process(tiny, tmp_path):
    """Two captures open at once in one process, each committing beside its forwards (``every=1``),
    share probe's writer process: each file holds exactly its own windows, and each window's
    numbers are float64 numpy's on that forward's hidden states over the real tokens."""
    models = {"gpt2": tiny("gpt2"), "llama": tiny("llama")}
    seeds = {"gpt2": (0, 1, 2), "llama": (10, 11, 12)}
    with probe.capture(models["gpt2"], out=tmp_path / "a.h5", every=1, sample_size=32) as a, \
            probe.capture(models["llama"], out=tmp_path / "b.h5", every=1, sample_size=32) as b:
        for i in range(3):  # interleaved: a commit of one is in flight while the other's runs
            for kind in models:
                ids, mask = batch(2, 8, "right", seed=seeds[kind][i])
                with torch.no_grad():
                    models[kind](input_ids=ids, attention_mask=mask)
    assert a.path != b.path
    for kind, path in (("gpt2", tmp_path / "a.h5"), ("llama", tmp_path / "b.h5")):
        run = probe.load(path)
        assert run.steps == [1, 2, 3], kind
        assert run.meta["model"]["class"] == type(models[kind]).__name__
        for step, seed in zip(run.steps, seeds[kind]):
            ids, mask = batch(2, 8, "right", seed=seed)
            with torch.no_grad():
                hs = models[kind](input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            real = mask.bool().numpy()
            window = run.at(step)
            for j, h in enumerate(hs):
                v = h.double().numpy()[real]
                s = window[f"hidden_states.{j}"]
                assert s.count == v.size, (kind, step, j)
                # float64 sums of float32 values: 1e-12; the std's float32 squares: 1e-6 relative
                np.testing.assert_allclose(s.mean, v.mean(), rtol=1e-9, atol=1e-12, err_msg=f"{kind} {step} {j}")
                np.testing.assert_allclose(s.std, v.std(), rtol=1e-6, err_msg=f"{kind} {step} {j}")
                assert (s.min, s.max) == (np.float32(v.min()), np.float32(v.max()))
