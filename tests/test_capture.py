"""Hooks live exactly as long as the with-block; bad input is refused before anything attaches;
files round-trip; the layout is pinned."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

import probe
from conftest import batch


def run_once(model, **kw):
    ids, mask = batch(2, 8, "right")
    with probe.capture(model, **kw) as run:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    return run


def test_hooks_removed_on_every_exit_path(tiny, assert_hooks_restored):
    model = tiny("gpt2")
    ids, mask = batch()
    with assert_hooks_restored(model):
        run_once(model)
    with assert_hooks_restored(model):
        with pytest.raises(KeyError):
            with probe.capture(model):
                model(input_ids=ids)
                raise KeyError("user error")
    with assert_hooks_restored(model):  # an exception inside a hook, strict mode re-raises it
        with pytest.raises(probe.ProbeError, match=r"site 'transformer.h.1' \(shape \(3, 9, 32\), dtype float32\)"):
            with probe.capture(model, sites=["transformer.h.0", "transformer.h.1"], strict=True) as c:
                c._engine.window["transformer.h.1"]["moments"]._init_like = lambda *a: 1 / 0
                model(input_ids=ids)
    with assert_hooks_restored(model):  # nested captures on the same model
        with probe.capture(model, stats=("moments",)) as outer:
            with probe.capture(model, stats=("moments",)) as inner:
                with torch.no_grad():
                    model(input_ids=ids)
            with torch.no_grad():
                model(input_ids=ids)
    assert outer["hidden_states.1"].tokens == 2 * inner["hidden_states.1"].tokens


def test_failing_stat_disables_site_without_breaking_forward(tiny):
    model = tiny("llama")
    ids, _ = batch()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    with pytest.warns(UserWarning, match="disabled"):
        with probe.capture(model, stats=("moments",)) as c:
            c._engine.window["hidden_states.1"]["moments"]._init_like = lambda *a: 1 / 0
            with torch.no_grad():
                got = model(input_ids=ids).logits
    assert torch.equal(got, want)
    assert c["hidden_states.2"].tokens == ids.numel()
    assert "hidden_states.1" in c.result.meta["disabled"]


def test_outputs_bitwise_unchanged(tiny):
    model = tiny("qwen2")
    ids, mask = batch(3, 9, "left")
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        with probe.capture(model, skip_first=1):
            got = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(model=object()), r"model must be a torch.nn.Module; got object; pass the model"),
        (dict(sites=["model.layrs.0"]), r"unknown site 'model.layrs.0'.*closest: model.layers.0"),
        (dict(sites=["model.norm", "model.norm"]), r"listed twice"),
        (dict(sites=["nothing.*"]), r"matches no module"),
        (dict(stats=("moments", "kurt")), r"unknown stats \['kurt'\]; expected a subset"),
        (dict(stats="moment"), r"unknown stats \['moment'\]; closest: moments; expected"),
        (dict(skip_first=-1), r"skip_first must be an int >= 0; got -1"),
        (dict(histogram_bits=12), r"histogram_bits must be an int in 0..10"),
        (dict(compile="yes"), r"compile must be None, True or False; got 'yes'"),
    ],
)
def test_bad_input_one_line(tiny, kwargs, match, assert_hooks_restored):
    model = kwargs.pop("model", None) or tiny("llama")
    if isinstance(model, torch.nn.Module):
        with assert_hooks_restored(model):
            with pytest.raises(probe.ProbeError, match=match) as err:
                probe.capture(model, **kwargs)
    else:
        with pytest.raises(probe.ProbeError, match=match) as err:
            probe.capture(model, **kwargs)
    assert "\n" not in str(err.value)


def test_bad_out_paths(tiny, tmp_path):
    model = tiny("gpt2")
    (tmp_path / "exists.h5").write_bytes(b"x")
    with pytest.raises(probe.ProbeError, match="already exists.*overwrite=True"):
        probe.capture(model, out=tmp_path / "exists.h5")
    with pytest.raises(probe.ProbeError, match="is a directory"):
        probe.capture(model, out=tmp_path)
    with pytest.raises(probe.ProbeError, match="does not exist"):
        probe.capture(model, out=tmp_path / "no" / "r.h5")
    assert (tmp_path / "exists.h5").read_bytes() == b"x"


def test_unresolvable_hidden_states():
    with pytest.raises(probe.ProbeError, match="cannot locate the hidden states.*pass sites="):
        probe.capture(torch.nn.Linear(3, 3))


def test_integer_site_output_is_refused_clearly(tiny):
    class Ints(torch.nn.Module):
        def forward(self, x):
            return x.long()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cast = Ints()

        def forward(self, x):
            self.cast(x)
            return x

    net = Net()
    with pytest.raises(probe.ProbeError, match="expected a floating-point tensor, got torch.int64"):
        with probe.capture(net, sites=["cast"], strict=True):
            net(torch.randn(1, 2, 3))


def test_file_round_trip_equals_memory(tiny, tmp_path):
    model = tiny("llama")
    ids, mask = batch(3, 9, "right")
    with probe.capture(model, skip_first=1, seed=0) as mem:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    with probe.capture(model, out=tmp_path / "r.h5", skip_first=1, seed=0) as disk:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    loaded = probe.load(tmp_path / "r.h5")
    assert loaded.sites == mem.sites == disk.sites
    for name in mem.sites:
        a, b = mem[name], loaded[name]
        for attr in ("count", "tokens", "mean", "std", "skew", "kurtosis", "min", "max", "absmax"):
            assert getattr(a, attr) == getattr(b, attr), attr
        np.testing.assert_array_equal(a.channel.std, b.channel.std)
        np.testing.assert_array_equal(a.sample.value, b.sample.value)
        np.testing.assert_array_equal(a.quantile([0.1, 0.9]), b.quantile([0.1, 0.9]))
    np.testing.assert_array_equal(mem.cross.r2, loaded.cross.r2)


def test_layout_pinned(tiny, tmp_path):
    model = tiny("gpt2")
    with probe.capture(model, out=tmp_path / "r.h5", max_positions=16, sample_size=8) as run:
        with torch.no_grad():
            model(input_ids=batch()[0])
        run.snapshot(step=10)
        with torch.no_grad():
            model(input_ids=batch()[0])
    with h5py.File(tmp_path / "r.h5", "r") as f:
        assert f.attrs["schema"] == "probe" and f.attrs["schema_version"] == 2
        assert f["steps"][:].tolist() == [10, 2]
        assert sorted(f) == ["cross", "samples", "sites", "steps", "total"]
        assert sorted(f["sites"]) == ["00", "01", "02"]
        g = f["sites/01"]
        assert dict(g.attrs) == {"name": "hidden_states.1", "module": "transformer.h.0", "read": "output",
                                 "dtype": "float32", "hf_index": 1}
        assert sorted(g) == ["histogram", "moments", "norm", "position", "sample", "topk"]
        w = g["moments/window"]  # one record per window: _present and every field
        assert w.shape == (2,) and sorted(g["moments"]) == ["window"]
        layout = {k: (w.dtype[k].shape, str(w.dtype[k].base)) for k in w.dtype.names}
        assert layout == {
            "_present": ((), "bool"), "n": ((32,), "float64"), "mean": ((32,), "float64"),
            "m2": ((32,), "float64"), "m3": ((32,), "float64"), "m4": ((32,), "float64"),
            "min": ((32,), "float32"), "max": ((32,), "float32"), "nan": ((), "int64"),
            "posinf": ((), "int64"), "neginf": ((), "int64"), "tokens": ((), "int64"),
            "absmax": ((), "float32"), "absmax_at": ((4,), "int64"), "large": ((32,), "int64"),
        }
        t = f["total/sites/01/moments/total"]  # all windows merged, rewritten at each commit
        assert t.shape == () and t.dtype == w.dtype
        h = g["histogram"]
        assert sorted(h) == ["count", "index", "window"] and h.attrs["buckets"] == 65536
        assert h["window"].dtype.names == ("_present", "start", "end", "lossless")
        assert h["index"].dtype == np.int32 and h["count"].dtype == np.int64
        assert h["window"]["end"][-1] == h["index"].shape[0] == h["count"].shape[0]
        assert g["position/window"].dtype["tokens"].shape == (16,)
        assert g["sample/window"].dtype.names == ("_present", "coords", "value")
        assert f["samples/key"].shape == (2, 8) and f["samples/key"].dtype == np.float64  # once per window
        assert f["total"].attrs["rows"] == 2
        assert sorted(f["total/sites/01"]) == ["histogram", "moments", "norm", "position", "sample", "topk"]
        assert f["total/samples/key"].shape == (1, 8)
        assert sorted(f["cross"]) == ["window"] and "keep_c" in f["cross/window"].dtype.names
        assert f["total/cross/total"].dtype == f["cross/window"].dtype
        assert g["topk/window"].dtype["value"].shape == (64,) and "counts" not in g["norm/window"].dtype.names
        assert g["norm"].attrs["buckets"] == 32768 and g["norm/count"].dtype == np.int64
        assert {"keep_cos", "all_cos", "keep_cos_n", "all_cos_n", "keep_cos_hist"} <= set(f["cross/window"].dtype.names)
        assert json.loads(f["cross"].attrs["sites"]) == ["hidden_states.0", "hidden_states.1", "hidden_states.2"]
        meta = json.loads(f.attrs["meta"])
        assert meta["histogram"] == {"encoding": "float32-bits", "mantissa_bits": 7}
        assert meta["model"]["class"] == "GPT2LMHeadModel"
    r = probe.load(tmp_path / "r.h5")
    assert r.steps == [10, 2]
    assert r["hidden_states.1"].tokens == r.at(10)["hidden_states.1"].tokens + r.at(2)["hidden_states.1"].tokens


def test_user_exception_keeps_collected_data(tiny, tmp_path):
    model = tiny("gpt2")
    ids, _ = batch()
    with pytest.raises(RuntimeError, match="boom"):
        with probe.capture(model, out=tmp_path / "r.h5"):
            with torch.no_grad():
                model(input_ids=ids)
            raise RuntimeError("boom")
    assert probe.load(tmp_path / "r.h5")["hidden_states.1"].tokens == ids.numel()


@pytest.mark.parametrize("content, match", [
    (b"not hdf5 at all", "is not an HDF5 file \\(no HDF5 signature\\)"),
    (None, "not a probe run"),
    ("newer", "schema version 99; this probe reads up to 2"),
])
def test_load_refuses_bad_files(tmp_path, content, match):
    path = tmp_path / "bad.h5"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        with h5py.File(path, "w") as f:
            if content == "newer":
                f.attrs["schema"] = "probe"
                f.attrs["schema_version"] = 99
    with pytest.raises(probe.ProbeError, match=match):
        probe.load(path)


def test_merge_halves_equals_one_run(tiny, tmp_path):
    model = tiny("llama")
    b1, b2 = batch(2, 8, "right", seed=1), batch(2, 8, "left", seed=2)
    for path, batches, seed in (("a.h5", [b1], 1), ("b.h5", [b2], 2), ("ab.h5", [b1, b2], 3)):
        with probe.capture(model, out=tmp_path / path, seed=seed, skip_first=1):
            for ids, mask in batches:
                with torch.no_grad():
                    model(input_ids=ids, attention_mask=mask)
    merged = probe.merge([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "m.h5")
    one = probe.load(tmp_path / "ab.h5")
    for name in one.sites:
        a, b = merged[name], one[name]
        assert (a.count, a.tokens, a.min, a.max, a.absmax) == (b.count, b.tokens, b.min, b.max, b.absmax)
        np.testing.assert_allclose([a.mean, a.std, a.kurtosis], [b.mean, b.std, b.kurtosis], rtol=1e-9)
        np.testing.assert_array_equal(a.histogram_counts, b.histogram_counts)
        np.testing.assert_array_equal(a.position.tokens, b.position.tokens)
    np.testing.assert_allclose(merged.cross.r2, one.cross.r2, atol=1e-12)
    import shutil

    shutil.copy(tmp_path / "a.h5", tmp_path / "a_copy.h5")  # another file, the same sample seed
    with pytest.warns(UserWarning, match="same sample seed 1"):
        probe.merge([tmp_path / "a.h5", tmp_path / "a_copy.h5"], tmp_path / "x.h5")
    with pytest.raises(probe.ProbeError, match="is the same run as"):  # one file twice: refused
        probe.merge([tmp_path / "a.h5", tmp_path / "a.h5"], tmp_path / "y.h5")


def test_run_indexes_sites_by_position_and_refuses_missing_cross(tiny):
    model = tiny("gpt2")
    ids, mask = batch(2, 6)
    with probe.capture(model, stats=("moments",)) as run:
        model(input_ids=ids, attention_mask=mask)
    r = run.result
    assert r[0].name == r.sites[0] and r[-1].name == r.sites[-1]
    with pytest.raises(probe.ProbeError, match="out of range"):
        r[len(r.sites)]
    with pytest.raises(probe.ProbeError, match="no 'cross' statistic"):
        r.cross.r2
    with probe.capture(model, stats=("moments", "cross")) as run:
        model(input_ids=ids, attention_mask=mask)
    assert run.cross.r2.shape == (3, 3)
    with pytest.raises(probe.ProbeError, match="no 'cos' statistic"):
        run.cross.cos
    assert "cos" not in run.cross
    with pytest.raises(probe.ProbeError, match="no 'cos' statistic"):
        run.cross.block_influence


def test_input_sites_default_to_calibration_stats_and_skip_first_warns(tiny):
    model = tiny("llama")
    ids, mask = batch(2, 6)
    with probe.capture(model, sites="linear_inputs") as run:
        model(input_ids=ids, attention_mask=mask)
    assert run.result.stats == ["moments", "histogram"]
    with probe.capture(model, sites=["model.layers.0.mlp.down_proj:input", "hidden_states"]) as run:
        model(input_ids=ids, attention_mask=mask)
    assert "sample" in run.result.stats  # mixed sites keep the full default
    with pytest.warns(UserWarning, match="skip_first=6 left no token"):
        with probe.capture(model, skip_first=6) as run:
            model(input_ids=ids, attention_mask=mask)
    assert run["hidden_states.1"].tokens == 0


def test_public_submodules_are_attributes_of_probe():
    """``import probe`` then ``probe.models.load_model(...)`` works without importing the submodule."""
    import importlib

    assert probe.models.load_model is importlib.import_module("probe.models").load_model
    assert probe.present.plot.plot_run is importlib.import_module("probe.present.plot").plot_run
    with pytest.raises(AttributeError, match="no attribute 'no_such_module'"):
        probe.no_such_module


def _decode_steps(model, steps=4):
    """A prompt then ``steps`` one-token forwards over the KV cache; every hidden state in float64."""
    ids, _ = batch(1, 5)
    seen = []
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, output_hidden_states=True)
        seen.append([h[0].double().numpy() for h in out.hidden_states])
        past = out.past_key_values
        for s in range(steps):
            nxt = ids[:, -1:] * 0 + 7 + s
            out = model(input_ids=nxt, past_key_values=past, use_cache=True, output_hidden_states=True)
            past = out.past_key_values
            seen.append([h[0].double().numpy() for h in out.hidden_states])
    return [np.concatenate([f[i] for f in seen]) for i in range(len(seen[0]))]


def test_decode_steps_run_stacked_and_match_float64(tiny, monkeypatch):
    """One-token forwards (decode steps) reduce all sites of a forward as one stack; every
    statistic's numbers still equal the float64 reference on the materialized states."""
    from probe.capture.engine import StatEngine

    model = tiny("llama")
    stacked = {"calls": 0, "sites": 0}
    original = StatEngine._run_stack

    def spy(self, batch_):
        stacked["calls"] += 1
        stacked["sites"] += len(batch_)
        return original(self, batch_)

    monkeypatch.setattr(StatEngine, "_run_stack", spy)
    with probe.capture(model) as run:
        want = _decode_steps(model)
    assert stacked["calls"] == 5 and stacked["sites"] == 5 * len(run.sites)
    for i, ref in enumerate(want):
        s = run[f"hidden_states.{i}"]
        assert s.tokens == ref.shape[0] == 9
        np.testing.assert_allclose(s.channel.mean, ref.mean(0), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(s.channel.var, ref.var(0), rtol=1e-5, atol=1e-9)
        assert s.min == np.float32(ref.min()) and s.max == np.float32(ref.max())
        flat = np.sort(np.abs(ref.astype(np.float32)).ravel())[::-1]
        np.testing.assert_array_equal(np.abs(s.topk["value"]), flat[:len(s.topk)])
        assert int(s.histogram_counts.sum()) == ref.size
        np.testing.assert_allclose(s.norm.mean, np.linalg.norm(ref, axis=1).mean(), rtol=1e-6)


def test_stacked_update_error_disables_the_stack_with_one_warning(tiny, monkeypatch):
    from probe.stats.moments import Moments

    model = tiny("llama")
    ids, _ = batch(1, 3)

    def boom(cls, stats, x, tokens):
        raise RuntimeError("boom")

    with pytest.warns(UserWarning, match="batched") as got:
        with probe.capture(model, stats=("moments",)) as run:
            monkeypatch.setattr(Moments, "update_group", classmethod(boom))
            with torch.no_grad():
                model(input_ids=ids)
    assert len([w for w in got if "boom" in str(w.message)]) == 1
    assert set(run.result.meta["disabled"]) == set(run.sites)


def test_calibration_preset_holds_what_the_exports_read(tiny):
    """``stats="calibration"``: only the moments; the exports' sums of squares, maxima and counts
    equal float64 numpy on the linear layers' inputs."""
    from probe.export._collect import collect

    model = tiny("llama")
    ids, mask = batch(2, 6)
    inputs: dict[str, list] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, name=name: inputs.setdefault(name, []).append(
        a[0].detach().double().reshape(-1, a[0].shape[-1]).numpy()))
        for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    with probe.capture(model, sites="linear_inputs", stats="calibration") as run:
        with torch.no_grad():
            model(input_ids=ids)
    for h in hooks:
        h.remove()
    assert run.result.stats == ["moments"] and run.stats == ("moments",)
    got = {m.module: m for m in collect(run.result)}
    assert set(got) == set(inputs)
    for name, parts in inputs.items():
        x = np.concatenate(parts)
        np.testing.assert_allclose(got[name].sum_x2, (x * x).sum(0), rtol=1e-6)
        np.testing.assert_array_equal(got[name].absmax, np.abs(x).max(0))
        assert (got[name].count == x.shape[0]).all()
    with pytest.raises(probe.ProbeError, match="preset"):
        probe.capture(model, stats="calibrate")


class _SharedInput(torch.nn.Module):
    """Two linears read one tensor (as q/k/v projections do), then it changes in place and a third reads it."""

    def __init__(self, d: int, data: bool) -> None:
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Linear(d, d) for _ in range(3))
        self.data = data  # write through .data, which leaves the version counter alone

    def forward(self, x):
        h = x * 1.0
        y = self.a(h) + self.b(h)
        (h.data if self.data else h).mul_(-3.0)
        return y + self.c(h)


@pytest.mark.parametrize("data", [False, True], ids=["in_place", "through_data"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_sites_reading_one_tensor_share_its_statistics_until_it_changes(mode, data, monkeypatch):
    """Sites whose hooks see the same tensor, unchanged, over the same tokens compute each chunk's
    moments once and all hold them; a site that reads the tensor after an in-place change computes
    its own, also when the change skipped the version counter (``.data``) or the tensor has none
    (inference mode). Every site equals numpy in float64 on the tensor it read."""
    from probe.capture import engine
    from probe.stats.moments import Moments

    b, t, d = 3, 70, 8  # more than STACK_ELEMENTS: run site by site, where the sharing is
    monkeypatch.setattr(engine, "STACK_ELEMENTS", b * t * d - 1)
    model = _SharedInput(d, data)
    x = torch.randn(b, t, d, generator=torch.Generator().manual_seed(0)) * 4 + 1
    calls = {"n": 0}
    chunk = Moments._chunk

    def counted(*args):
        calls["n"] += 1
        return chunk(*args)

    monkeypatch.setattr(Moments, "_chunk", staticmethod(counted))
    grad_mode = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with probe.capture(model, sites=["a:input", "b:input", "c:input"], stats=("moments",), strict=True) as run:
        with grad_mode():
            model(x)
    assert calls["n"] == 2
    ref = x.double().reshape(-1, d).numpy()
    for name, want in (("a:input", ref), ("b:input", ref), ("c:input", -3.0 * ref)):
        ch = run.result[name].channel
        assert run.result[name].tokens == b * t
        np.testing.assert_array_equal(ch.count, b * t)
        np.testing.assert_allclose(ch.mean, want.mean(0), rtol=1e-6, atol=1e-6 * np.abs(want).max())
        np.testing.assert_allclose(ch.var, want.var(0), rtol=1e-5)
        np.testing.assert_allclose(ch.kurtosis, scipy_free_kurtosis(want), rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(ch.max, want.max(0).astype(np.float32))
        np.testing.assert_array_equal(ch.min, want.min(0).astype(np.float32))
    a, b = (run.result[n].channel for n in ("a:input", "b:input"))
    for field in ("mean", "var", "kurtosis", "min", "max"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def scipy_free_kurtosis(x: np.ndarray) -> np.ndarray:
    """Population excess kurtosis per column (scipy.stats.kurtosis's default), in float64."""
    d = x - x.mean(0)
    return (d**4).mean(0) / (d**2).mean(0) ** 2 - 3.0


def test_discovery_runs_once_per_model_structure(tiny, monkeypatch):
    from probe.capture import sites as _sites

    runs = {"n": 0}
    original = _sites._run_recorded

    def counted(*a, **k):
        runs["n"] += 1
        return original(*a, **k)

    monkeypatch.setattr(_sites, "_run_recorded", counted)
    model = tiny("gpt2")
    monkeypatch.setattr(model.config, "probe_test_marker", 1, raising=False)  # a structure no other test used
    first = probe.capture(model).sites
    assert runs["n"] == 1  # one tiny forward finds the sites
    assert probe.capture(model).sites == first and runs["n"] == 1  # the same graph: no forward
    model.train()  # another graph key (the training flag): resolved afresh
    assert probe.capture(model).sites == first and runs["n"] == 2
    model.eval()
    model.transformer.h[0].forward = model.transformer.h[0].forward  # a forward set on the instance
    assert probe.capture(model).sites == first and runs["n"] == 3
