"""The terminal workflow: probe run / show / diff / merge / plot, on a tiny model saved to disk and
on the bundled model. User errors are one line on stderr with a non-zero exit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

import probe
from probe.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm):
    """A random-init 2-layer Llama with the bundled tokenizer, saved like any HF checkpoint."""
    _, tok = smollm
    path = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok))
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_run_show_json_round_trip(tiny_dir, tmp_path, capsys):
    out = str(tmp_path / "r.h5")
    assert main(["run", tiny_dir, "--text", "hello world, this is a test", "--text", "another one",
                 "-o", out, "--skip-first", "1"]) == 0
    capsys.readouterr()
    assert main(["show", out, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    run = probe.load(out)
    assert [s["site"] for s in data["sites"]] == run.sites
    for entry in data["sites"]:
        s = run[entry["site"]]
        assert entry["tokens"] == s.tokens and entry["mean"] == s.mean and entry["kurtosis"] == s.kurtosis
        assert entry["absmax_at"]["channel"] == s.absmax_at["channel"]
    assert main(["show", out]) == 0
    text = capsys.readouterr().out
    assert "layer" in text and "kurt" in text and f"{run['hidden_states.2'].tokens}" in text


def test_diff_self_is_zero_and_merge(tiny_dir, tmp_path, capsys):
    a, b = str(tmp_path / "a.h5"), str(tmp_path / "b.h5")
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "first document here"}\n{"text": "second one"}\n')
    assert main(["run", tiny_dir, "--file", str(path), "-o", a]) == 0
    assert main(["run", tiny_dir, "--text", "something else entirely", "-o", b]) == 0
    capsys.readouterr()
    assert main(["diff", a, a, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(r["js"] == 0.0 and r["std_ratio"] == 1.0 for r in rows)
    assert all(v == 0.0 for r in rows for v in r["quantile_shift"].values())
    # default options draw a seed per run: the two files merge
    assert main(["merge", a, b, "-o", str(tmp_path / "m.h5")]) == 0
    merged, ra, rb = (probe.load(p) for p in (tmp_path / "m.h5", a, b))
    assert ra.meta["sample"]["seed"] != rb.meta["sample"]["seed"]
    assert merged["hidden_states.1"].tokens == ra["hidden_states.1"].tokens + rb["hidden_states.1"].tokens


@pytest.mark.parametrize("argv, match", [
    (["show", "/nonexistent.h5"], "no such file"),
    (["run", "/nonexistent-model-dir", "--text", "x", "-o", "/tmp/never.h5", "--overwrite"],
     "cannot load model"),
    (["run", "--file", "/nonexistent.txt"], "does not exist"),
])
def test_user_errors_are_one_line(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1 and "Traceback" not in err


def test_default_run_on_bundled_model(tmp_path, capsys, smollm):
    out = str(tmp_path / "run.h5")
    assert main(["run", "--max-tokens", "150", "-o", out]) == 0
    run = probe.load(out)
    assert len(run.sites) == 31 and run.meta["skip_first"] == 1
    assert run["hidden_states.0"].tokens > 100
    assert run.meta["token_text"]
    assert np.isfinite(run.cross.r2).all()
    pytest.importorskip("matplotlib")
    capsys.readouterr()
    assert main(["plot", out, "-o", str(tmp_path / "fig")]) == 0
    paths = capsys.readouterr().out.split()
    names = {p.rsplit("/", 1)[-1] for p in paths}
    assert {"hist_grid.png", "hist_overlay.png", "cross_r2.png", "cross_cov.png", "scatter_position.png",
            "scatter_channel.png", "channels_absmax.png", "positions.png"} <= names
    import matplotlib.image

    for path in paths:
        data = open(path, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert np.ptp(matplotlib.image.imread(path)[..., :3]) > 0.2  # not one flat colour
