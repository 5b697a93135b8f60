"""Calibration exports (probe.export) against plain forward pre-hooks on every linear layer of the
bundled SmolLM2, over the same real tokens of padded batches, in float64 numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import probe
from probe.cli import main
from probe.errors import ProbeError, SiteError
from probe.models import batches, sample_texts
from probe.capture.sites import resolve

STATS = ("moments", "histogram")
F32_ROUNDING = 2.0**-24  # one float32 rounding (round to nearest), relative


def reference(model: nn.Module, batch_list: list[dict]) -> dict[str, np.ndarray]:
    """The input of every nn.Linear but lm_head over the real tokens, float64 ``[N, D]``."""
    seen: dict[str, list] = {}
    mask: list[torch.Tensor] = []
    handles = [m.register_forward_pre_hook(
        lambda mod, args, name=n: seen.setdefault(name, []).append(args[0][mask[0]].double().numpy()))
        for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    try:
        for b in batch_list:
            mask[:] = [b["attention_mask"].bool()]
            with torch.no_grad():
                model(**b)
    finally:
        for h in handles:
            h.remove()
    return {k: np.concatenate(v) for k, v in seen.items()}


def capture(model, batch_list, path, seed: int):
    with probe.capture(model, path, sites="linear_inputs", stats=STATS, seed=seed, strict=True):
        for b in batch_list:
            with torch.no_grad():
                model(**b)
    return probe.load(path)


@pytest.fixture(scope="module")
def calib(smollm, tmp_path_factory):
    model, tok = smollm
    docs = sample_texts()
    # short padded batches keep the test fast; the short documents make them ragged
    first = list(batches(tok, [docs[0], "A short line of text.", docs[1]], batch_size=3, max_length=24))
    second = list(batches(tok, ["Quantization.", docs[2]], batch_size=2, max_length=24))
    assert all((b["attention_mask"] == 0).any() for b in first + second)  # padded batches
    folder = tmp_path_factory.mktemp("calib")
    runs = {"a": capture(model, first, folder / "a.h5", 1), "b": capture(model, second, folder / "b.h5", 2)}
    # the plain hooks run in the same forwards as the capture over both batches
    holder: dict = {}
    with probe.capture(model, folder / "ab.h5", sites="linear_inputs", stats=STATS, seed=3, strict=True):
        holder["ref"] = reference(model, first + second)
    runs["ab"] = probe.load(folder / "ab.h5")
    tokens = sum(int(b["attention_mask"].sum()) for b in first + second)
    return model, holder["ref"], runs, tokens, folder


def test_linear_inputs_are_every_linear_but_the_head(calib):
    model, ref, runs, _, _ = calib
    assert runs["ab"].sites == list(ref) and len(ref) == 7 * model.config.num_hidden_layers
    assert "lm_head" not in runs["ab"].sites and model.lm_head.weight is model.model.embed_tokens.weight


def test_smoothquant_equals_max_abs_of_plain_hooks(calib, tmp_path):
    _, ref, runs, _, _ = calib
    out = tmp_path / "act_scales.pt"
    probe.export("smoothquant", runs["ab"], out)
    scales = torch.load(out)
    assert list(scales) == list(ref)
    for name, x in ref.items():
        s = scales[name]
        assert s.dtype == torch.float32 and s.device.type == "cpu" and s.shape == (x.shape[1],)
        assert np.array_equal(s.numpy(), np.abs(x).max(0).astype(np.float32)), name  # exact


def _read_imatrix(path):
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    return fields, tensors, reader


def test_imatrix_sums_counts_and_llama_cpp_names(calib, tmp_path):
    import gguf

    model, ref, runs, tokens, _ = calib
    out = tmp_path / "imatrix.gguf"
    names = probe.export("imatrix", runs["ab"], out)
    fields, tensors, reader = _read_imatrix(out)
    assert fields["general.type"] == "imatrix"
    assert fields["imatrix.datasets"] == ["ab.h5"]
    assert fields["imatrix.chunk_size"] == 512 and fields["imatrix.chunk_count"] == -(-tokens // 512)
    assert "general.architecture" not in fields
    assert names["model.layers.0.self_attn.q_proj"] == "blk.0.attn_q.weight"
    assert names["model.layers.29.mlp.down_proj"] == "blk.29.ffn_down.weight"
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    assert len(tensors) == 3 * len(ref)
    for module, x in ref.items():
        name = name_map.get_name(module + ".weight", try_suffixes=(".weight",))
        assert names[module] == name and name.startswith("blk.")
        sum2 = tensors[name + ".in_sum2"]
        # 1-D, as llama-imatrix's files hold a dense weight's entries (ne [D, 1] stored as [D])
        assert sum2.dtype == np.float32 and sum2.shape == (x.shape[1],)
        want = (x * x).sum(0)
        # the moments square in float32 (one rounding) and sum by float32 cascade (pairwise) sums,
        # whose error grows with log2(n); then one float32 rounding when written
        rtol = (2 + np.ceil(np.log2(x.shape[0]))) * 2.0**-24
        np.testing.assert_allclose(sum2, want, rtol=rtol, atol=0)
        # sum x = count * mean, the mean from float64 sums (merged in float64): float64-level error
        # against sum |x|, then one float32 rounding
        np.testing.assert_allclose(tensors[name + ".in_sum"], x.sum(0), rtol=F32_ROUNDING,
                                   atol=1e-12 * np.abs(x).sum(0).max())
        assert tensors[name + ".counts"].tolist() == [float(tokens)] == [float(x.shape[0])]
    ggml_shapes = {t.name: list(t.shape) for t in reader.tensors}
    # llama-imatrix builds ne [D, 1] and [1, 1] and gguf drops trailing sizes of 1: [D] and [1]
    assert ggml_shapes["blk.0.ffn_down.weight.in_sum2"] == [model.config.intermediate_size]
    assert ggml_shapes["blk.0.ffn_down.weight.in_sum"] == [model.config.intermediate_size]
    assert ggml_shapes["blk.0.ffn_down.weight.counts"] == [1]
    assert not any(n.startswith(("output.", "token_embd.")) for n in tensors)


def test_imatrix_dims_as_llama_imatrix_stores_them(tmp_path):
    """The ggml dimensions llama-imatrix's own files hold (checked against a real llama-imatrix in
    tests/test_llama_imatrix.py): a dense weight's entries 1-D, ``in_sum2``/``in_sum`` ``[D]`` and
    ``counts`` ``[1]`` (it builds ``[D, 1]`` / ``[1, 1]``; gguf drops trailing sizes of 1), an
    experts weight's ``[D, E]`` / ``[1, E]``; values against float64 numpy from plain hooks."""
    gguf = pytest.importorskip("gguf")
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      head_dim=8, vocab_size=64, num_experts=4, num_experts_per_tok=2)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(1))
    seen: dict[str, np.ndarray] = {}
    layer = model.model.layers[0]
    hooks = [layer.self_attn.q_proj.register_forward_pre_hook(
                 lambda m, a: seen.__setitem__("q", a[0].reshape(-1, 16).double().numpy())),
             layer.self_attn.o_proj.register_forward_pre_hook(
                 lambda m, a: seen.__setitem__("o", a[0].reshape(-1, 16).double().numpy())),
             layer.mlp.experts.register_forward_pre_hook(
                 lambda m, a: seen.update(x=a[0].double().numpy(), top=a[1].numpy()))]
    with probe.capture(model, sites="linear_inputs", stats=("moments",)) as run, torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    out = tmp_path / "imatrix.gguf"
    probe.export("imatrix", run, out)
    reader = gguf.GGUFReader(str(out))
    t = {r.name: r for r in reader.tensors}
    n = ids.numel()
    for name, key in (("blk.0.attn_q.weight", "q"), ("blk.0.attn_output.weight", "o")):
        assert list(t[name + ".in_sum2"].shape) == list(t[name + ".in_sum"].shape) == [16]
        assert list(t[name + ".counts"].shape) == [1] and t[name + ".counts"].data.tolist() == [float(n)]
        x = seen[key]
        np.testing.assert_allclose(t[name + ".in_sum2"].data, (x * x).sum(0), rtol=1e-6)
        np.testing.assert_allclose(t[name + ".in_sum"].data, x.sum(0), rtol=1e-6, atol=1e-6 * np.abs(x).sum(0).max())
    x, top = seen["x"], seen["top"]
    want2, want_n = np.zeros((4, 16)), np.zeros(4)
    for j in range(top.shape[1]):
        np.add.at(want2, top[:, j], x * x)
        np.add.at(want_n, top[:, j], 1)
    for proj in ("gate", "up"):
        name = f"blk.0.ffn_{proj}_exps.weight"
        assert list(t[name + ".in_sum2"].shape) == [16, 4] and list(t[name + ".counts"].shape) == [1, 4]
        np.testing.assert_allclose(np.asarray(t[name + ".in_sum2"].data).reshape(4, 16), want2, rtol=1e-6)
        assert np.asarray(t[name + ".counts"].data).reshape(4).tolist() == want_n.tolist()
    assert list(t["blk.0.ffn_down_exps.weight.in_sum2"].shape) == [8, 4]


def test_export_of_two_runs_equals_export_of_one_run_over_both(calib, tmp_path):
    _, ref, runs, tokens, folder = calib
    merged_file = probe.merge([folder / "a.h5", folder / "b.h5"], tmp_path / "merged.h5")
    for source, tag in (([runs["a"], runs["b"]], "list"), (merged_file, "file"), (runs["ab"], "one")):
        probe.export("smoothquant", source, tmp_path / f"{tag}.pt")
        probe.export("imatrix", source, tmp_path / f"{tag}.gguf", datasets=["d"])
        probe.export("amax", source, tmp_path / f"{tag}.json")
    one = torch.load(tmp_path / "one.pt")
    _, t_one, _ = _read_imatrix(tmp_path / "one.gguf")
    a_one = json.loads((tmp_path / "one.json").read_text())
    for tag in ("list", "file"):
        other = torch.load(tmp_path / f"{tag}.pt")
        assert all(torch.equal(other[k], one[k]) for k in one) and list(other) == list(one)
        _, t_other, _ = _read_imatrix(tmp_path / f"{tag}.gguf")
        assert sorted(t_other) == sorted(t_one)
        for k, v in t_one.items():
            if k.endswith(".counts"):
                assert np.array_equal(t_other[k], v)
            else:
                np.testing.assert_allclose(t_other[k], v, rtol=2 * F32_ROUNDING, atol=0)
        a_other = json.loads((tmp_path / f"{tag}.json").read_text())
        assert a_other["modules"] == {k: dict(v) for k, v in a_one["modules"].items()}


def test_amax_json_for_modelopt(calib, tmp_path):
    _, ref, runs, tokens, _ = calib
    out = tmp_path / "amax.json"
    probe.export("amax", runs["ab"], out)
    data = json.loads(out.read_text())
    assert data["format"] == "probe.amax" and data["version"] == 1 and data["skip_first"] == 0
    assert list(data["modules"]) == list(ref)
    fp8 = {e["quantizer_name"]: e["cfg"] for e in data["modelopt"]["fp8"]}
    int8 = {e["quantizer_name"]: e["cfg"] for e in data["modelopt"]["int8"]}
    for name, x in ref.items():
        entry = data["modules"][name]
        amax = float(np.abs(x).max())
        assert entry["amax"] == amax and entry["tokens"] == tokens
        assert entry["channel_amax"] == np.abs(x).max(0).tolist()
        assert entry["fp8_e4m3_scale"] == amax / 448 and entry["int8_scale"] == amax / 127
        assert entry["quantizer"] == name + ".input_quantizer"
        assert fp8[name + ".input_quantizer"] == {"num_bits": [4, 3], "axis": None, "constant_amax": amax}
        assert int8[name + ".input_quantizer"] == {"num_bits": 8, "axis": None, "constant_amax": amax}


def test_cli_export_and_show_quant(calib, tmp_path, capsys):
    _, _, runs, _, folder = calib
    out = tmp_path / "s.pt"
    assert main(["export", "smoothquant", str(folder / "a.h5"), str(folder / "b.h5"), "-o", str(out)]) == 0
    assert "210 modules from 2 run(s)" in capsys.readouterr().out
    assert main(["export", "smoothquant", str(folder / "a.h5"), "-o", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["show", str(folder / "ab.h5"), "--quant", "int8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 210 and rows[0]["format"] == "int8" and rows[0]["clip"] == [0.0, 0.0]
    assert main(["show", str(folder / "ab.h5"), "--quant", "fp8"]) == 0
    assert "per-tensor fp8_e4m3 quantization" in capsys.readouterr().out


# ------------------------------------------------------------------------------ tiny models
def test_padding_never_enters(tiny, tmp_path):
    model = tiny("llama")
    with torch.no_grad():  # a padding token whose activations would dominate every max if counted
        model.model.embed_tokens.weight[0] = 1e4
    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    mask = (ids != 0).long()
    ref = reference(model, [{"input_ids": ids, "attention_mask": mask}])
    with probe.capture(model, sites="linear_inputs", stats=STATS, strict=True) as run:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    out = tmp_path / "s.pt"
    scales = probe.export("smoothquant", run, out)
    for name, x in ref.items():
        assert x.shape[0] == 8
        assert np.array_equal(scales[name].numpy(), np.abs(x).max(0).astype(np.float32))
        assert float(scales[name].max()) < 1e3
    assert run[next(iter(ref))].tokens == 8


def test_linear_inputs_include_conv1d_and_leave_out_an_untied_head(tiny, assert_hooks_restored):
    from transformers.pytorch_utils import Conv1D

    gpt2 = tiny("gpt2")
    sites = resolve(gpt2, "linear_inputs")
    convs = [n for n, m in gpt2.named_modules() if isinstance(m, Conv1D)]
    assert [s.module for s in sites] == convs and len(convs) == 8
    assert all(s.read == "input" and s.name == s.module for s in sites)
    neox = tiny("gpt_neox")  # untied output head: found by get_output_embeddings()
    assert neox.get_output_embeddings().weight is not neox.get_input_embeddings().weight
    names = [s.name for s in resolve(neox, "linear_inputs")]
    assert "embed_out" not in names and len(names) == 4 * 2
    with assert_hooks_restored(gpt2):
        with probe.capture(gpt2, sites="linear_inputs", stats=STATS, strict=True) as run:
            gpt2(torch.tensor([[1, 2, 3, 4]]))
    assert run["transformer.h.0.attn.c_attn"].channel.count.tolist() == [4] * 32


def test_input_suffix_sites_and_errors(tiny):
    model = tiny("llama")
    sites = resolve(model, ["model.layers.*.mlp.down_proj:input", "model.layers.0.self_attn.o_proj:input"])
    assert [s.name for s in sites] == ["model.layers.0.mlp.down_proj:input", "model.layers.1.mlp.down_proj:input",
                                       "model.layers.0.self_attn.o_proj:input"]
    assert all(s.read == "input" for s in sites)
    with pytest.raises(SiteError, match=r"unknown site 'model.layers.0.mlp.down_prj:input'.*closest: "
                                        r"model.layers.0.mlp.down_proj"):
        resolve(model, "model.layers.0.mlp.down_prj:input")
    with pytest.raises(SiteError, match="matches no module"):
        resolve(model, "model.layrs.*.mlp:input")


def test_export_refuses_bad_input(tiny, tmp_path):
    model = tiny("llama")
    ids = torch.tensor([[1, 2, 3]])
    with probe.capture(model, stats=STATS) as hidden:
        model(ids)
    with pytest.raises(ProbeError, match="export format must be one of"):
        probe.export("awq", hidden, tmp_path / "x")
    with pytest.raises(ProbeError, match="has no input sites.*sites='linear_inputs'"):
        probe.export("smoothquant", hidden, tmp_path / "x.pt")
    with probe.capture(model, sites="linear_inputs", stats=("histogram",)) as nomoments:
        model(ids)
    with pytest.raises(ProbeError, match="has no moments"):
        probe.export("amax", nomoments, tmp_path / "x.json")
    with probe.capture(model, sites="linear_inputs", stats=STATS) as ok:
        model(ids)
    with pytest.raises(ProbeError, match="no llama.cpp architecture"):
        probe.export("imatrix", ok, tmp_path / "x.gguf", arch="nonsense")
    gpt2 = tiny("gpt2")
    with probe.capture(gpt2, sites="linear_inputs", stats=STATS) as other:
        gpt2(ids)
    with pytest.raises(ProbeError, match="another model"):
        probe.export("amax", [ok, other], tmp_path / "y.json")
    with probe.capture(model, sites="linear_inputs", stats=STATS, skip_first=1) as skipped:
        model(ids)
    with pytest.warns(UserWarning, match="skip_first"):
        probe.export("amax", skipped, tmp_path / "z.json")


def test_quant_report_bounds_hold_on_float32_activations(calib):
    from probe.present.quant import FORMATS, report

    _, ref, runs, _, _ = calib
    names = ["model.layers.0.self_attn.q_proj", "model.layers.5.mlp.down_proj", "model.layers.20.mlp.up_proj"]
    for fmt, q in FORMATS.items():
        for name in names:
            a = np.abs(ref[name])
            for scale in (None, a.max() / q.qmax / 8):
                row = report(runs["ab"], fmt, scale=scale, sites=[name])[0]
                s = row["scale"]
                assert s == (a.max() / q.qmax if scale is None else scale)
                want = {"clip": (a > q.qmax * s).mean(), "flush": ((a > 0) & (a <= q.flush * s)).mean(),
                        "large": (a >= 6).mean()}
                for key, value in want.items():
                    low, high = row[key]
                    assert low <= value <= high, (fmt, name, key)
                assert row["large_exact"] and (scale is not None or row["clip"] == [0.0, 0.0])


def test_export_to_a_folder_names_a_file_of_its_format(tmp_path, capsys):
    from probe.cli import main

    for fmt, file in (("smoothquant", "act_scales.pt"), ("amax", "amax.json"), ("imatrix", "imatrix.gguf")):
        with pytest.raises(probe.ProbeError, match=rf"path='.*' is a directory; .*pass e\.g\. path='.*/{file}'"):
            probe.export(fmt, [], tmp_path)
        assert main(["export", fmt, "missing.h5", "-o", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert f"-o {tmp_path}: is a folder" in err and f"-o {tmp_path / file}" in err and len(err.splitlines()) == 1
