"""The terminal workflow: probe run / show / diff / merge / plot / cache, on a tiny model saved to
disk and on the bundled model. User errors are one line on stderr with a non-zero exit, found
before the model loads. Every test runs in its own empty working directory (tmp_path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

import probe
import probe.models
from probe.cli import main


@pytest.fixture(autouse=True)
def _own_cwd(tmp_path, monkeypatch):
    """Nothing a test does may read or write the repository: a fresh empty working directory."""
    monkeypatch.chdir(tmp_path)


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
    assert {r["site"] for r in rows} == set(probe.load(a).sites)
    assert rows and all(r["js"] == 0.0 and r["std_ratio"] == 1.0 for r in rows)
    assert all(v == 0.0 for r in rows for v in r["quantile_shift"].values())
    # default options draw a seed per run: the two files merge
    assert main(["merge", a, b, "-o", str(tmp_path / "m.h5")]) == 0
    merged, ra, rb = (probe.load(p) for p in (tmp_path / "m.h5", a, b))
    assert ra.meta["sample"]["seed"] != rb.meta["sample"]["seed"]
    assert merged["hidden_states.1"].tokens == ra["hidden_states.1"].tokens + rb["hidden_states.1"].tokens


@pytest.mark.parametrize("argv, match", [
    (["show", "/nonexistent.h5"], "no such file"),
    (["run", "/nonexistent-model-dir", "--text", "x", "-o", "never.h5"], "the folder does not exist"),
    (["run", "./no-such-dir", "--text", "x"], "'./no-such-dir': the folder does not exist"),
    (["run", "no-such-model-anywhere", "--text", "x"], "neither a local folder nor a Hugging Face id"),
    (["run", "--file", "/nonexistent.txt"], "--file /nonexistent.txt: the file does not exist"),
    (["run", "--batch-size", "0"], "--batch-size: expected an integer >= 1, got 0"),
    (["run", "--max-length", "0"], "--max-length: expected an integer >= 1, got 0"),
    (["run", "--max-tokens", "0"], "--max-tokens: expected an integer >= 1"),
    (["run", "--skip-first", "-1"], "--skip-first: expected an integer >= 0"),
    (["run", "--skip-first", "8", "--max-length", "8"], "--skip-first 8 drops every token"),
    (["run", "--seed", "-3"], "--seed: expected an integer >= 0"),
    (["run", "--dtype", "float8"], "--dtype: expected one of float32, bfloat16, float16, got 'float8'"),
    (["run", "--stats", "moments,bogus"], "--stats: expected a comma-separated subset"),
    (["run", "--device", "nonsense"], "--device: expected a torch device"),
    (["run", "--batch-size", "x"], "argument --batch-size: invalid int value"),
    (["run", "-o", "/nonexistent-folder/r.h5"], "does not exist"),
])
def test_user_errors_are_one_line_before_the_model_loads(argv, match, capsys, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(probe.models, "load_model", no_load)
    with pytest.raises(SystemExit) if "invalid int" in match else _nothing() as ctx:
        rc = main(argv)
    rc = ctx.value.code if ctx is not None and hasattr(ctx, "value") else rc
    assert rc == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert os.listdir(".") == []  # nothing written to the working directory


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_existing_output_is_refused_in_flag_words(capsys, monkeypatch):
    open("run.h5", "wb").close()
    monkeypatch.setattr(probe.models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert main(["run", "--text", "x"]) == 2
    err = capsys.readouterr().err
    assert "-o run.h5: the file already exists" in err and "--overwrite" in err and "overwrite=True" not in err


def test_text_files_json_arrays_and_upper_case_suffixes(tmp_path):
    (tmp_path / "a.JSONL").write_text('{"text": "first"}\n\n{"text": "second"}\n')
    (tmp_path / "b.json").write_text(json.dumps(["third", {"text": "fourth"}, " "]))
    (tmp_path / "c.TXT").write_text("fifth\n\nsixth\n")
    docs = probe.models.read_texts([str(tmp_path / n) for n in ("a.JSONL", "b.json", "c.TXT")])
    assert docs == ["first", "second", "third", "fourth", "fifth", "sixth"]
    (tmp_path / "d.csv").write_text("x,y\n")
    with pytest.raises(probe.ProbeError, match=r"--file .*d.csv: unsupported suffix '.csv'"):
        probe.models.read_texts([str(tmp_path / "d.csv")])
    (tmp_path / "e.json").write_text(json.dumps([{"body": "no text field"}]))
    with pytest.raises(probe.ProbeError, match=r"item 0 is dict; expected a string or an object with a \"text\""):
        probe.models.read_texts([str(tmp_path / "e.json")])
    (tmp_path / "f.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(probe.ProbeError, match=r"f.jsonl:1: expected a JSON object with a 'text' string"):
        probe.models.read_texts([str(tmp_path / "f.jsonl")])


def _interrupting(monkeypatch, on_forward: int, error: type[BaseException] = KeyboardInterrupt):
    """load_model whose model raises ``error`` inside its second layer on forward ``on_forward``:
    the forward stops half-way, as Ctrl-C does."""
    from probe.capture.sites import discovering

    real = probe.models.load_model
    calls = {"n": 0}

    def load(*a, **k):
        model, tok = real(*a, **k)

        def hook(module, args, output):
            if discovering():  # probe's own set-up forward is not one of the run's
                return
            calls["n"] += 1
            if calls["n"] == on_forward:
                raise error("stop")

        model.model.layers[1].register_forward_hook(hook)
        return model, tok

    monkeypatch.setattr(probe.models, "load_model", load)


@pytest.mark.parametrize("error, rc, reason", [(KeyboardInterrupt, 130, "interrupted (Ctrl-C)"),
                                               (RuntimeError, 2, "failed: RuntimeError: stop")])
def test_stopped_run_is_kept_and_marked_partial(tiny_dir, capsys, monkeypatch, recwarn, error, rc, reason):
    _interrupting(monkeypatch, on_forward=2, error=error)
    texts = sum((["--text", f"document number {i} with a few words"] for i in range(4)), [])
    assert main(["run", tiny_dir, *texts, "--batch-size", "2", "-o", "r.h5"]) == rc
    err = " ".join(capsys.readouterr().err.split())
    assert reason in err and "marked partial" in err
    assert not [w for w in recwarn if "did not fire" in str(w.message)]  # no misleading warning
    run = probe.load("r.h5")
    assert run.meta["partial"]["batches"] == 1 and run.meta["partial"]["reason"] == reason
    assert run["hidden_states.0"].tokens > 0
    assert main(["show", "r.h5"]) == 0
    out = capsys.readouterr().out
    assert "PARTIAL" in out and f"partial run: {reason} after 1 complete batch" in " ".join(out.split())
    assert main(["show", "r.h5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["partial"]["batches"] == 1


@pytest.mark.parametrize("error, rc", [(KeyboardInterrupt, 130), (RuntimeError, 2)])
def test_run_that_collected_nothing_leaves_no_file(tiny_dir, capsys, monkeypatch, error, rc):
    _interrupting(monkeypatch, on_forward=1, error=error)
    assert main(["run", tiny_dir, "--text", "hello there", "-o", "r.h5"]) == rc
    err = capsys.readouterr().err
    assert not os.path.exists("r.h5")
    assert "no file written" in " ".join(err.split())
    if error is RuntimeError:
        assert err.strip().splitlines()[-1].startswith("probe run: error: the first batch failed")


def test_seed_is_passed_through(tiny_dir):
    assert main(["run", tiny_dir, "--text", "hello world again", "-o", "s.h5", "--seed", "7"]) == 0
    assert probe.load("s.h5").meta["sample"]["seed"] == 7


def test_show_site_by_name_or_layer_number_and_json_honours_it(tiny_dir, capsys):
    assert main(["run", tiny_dir, "--text", "hello world, this is a test", "-o", "r.h5"]) == 0
    capsys.readouterr()
    assert main(["show", "r.h5", "--site", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["site"] for s in data["sites"]] == ["hidden_states.1"]
    assert main(["show", "r.h5", "--site", "hidden_states.1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sites"] == data["sites"]
    assert main(["show", "r.h5", "--site", "2"]) == 0
    out = capsys.readouterr().out
    assert "quantiles:" in out and "largest channels" in out
    assert main(["show", "r.h5", "--site", "9"]) == 2
    err = capsys.readouterr().err
    assert "--site 9: no such site" in err and "layer number 0..2" in err and err.count("\n") == 1


@pytest.mark.parametrize("width", [80, 119, 160])
def test_table_caption_describes_only_the_columns_shown(tiny_dir, width):
    from rich.console import Console

    from probe.present.report import print_summary

    assert main(["run", tiny_dir, "--text", "hello world, this is a test", "-o", "r.h5"]) == 0
    console = Console(width=width, record=True, color_system=None)
    print_summary(probe.load("r.h5"), console=console)
    text = console.export_text()
    lines = text.splitlines()
    top = next(i for i, line in enumerate(lines) if "layer" in line and "tokens" in line)
    header = lines[top]
    end = next(i for i in range(top, len(lines)) if lines[i].startswith("└"))  # the per-layer table only
    rows = [line for line in lines[top + 1:end] if line.startswith("│")]
    wide = width >= 120
    assert ("min" in header.split()) == wide or ("│ min" in header) == wide
    caption = " ".join(line.strip() for line in text.splitlines() if "at:" in line or "120+" in line)
    if wide:
        assert "row, position, channel and token" in caption
        assert all(" r" in r.split("│")[-2] for r in rows)
    else:
        assert "position and channel of the largest |x|" in caption and "row and token: 120+" in caption
        assert all(r.split("│")[-2].strip().startswith("p") for r in rows)


def test_piped_show_prints_every_column(tiny_dir, capsys):
    assert main(["run", tiny_dir, "--text", "hello world, this is a test", "-o", "r.h5"]) == 0
    capsys.readouterr()
    assert main(["show", "r.h5"]) == 0  # capsys is not a terminal
    out = capsys.readouterr().out
    assert "min" in out and "max" in out and "row, position, channel and token" in out


def test_diff_refuses_runs_without_a_common_site(tiny_dir, capsys):
    assert main(["run", tiny_dir, "--text", "hello world", "-o", "a.h5"]) == 0
    assert main(["run", tiny_dir, "--text", "hello world", "-o", "b.h5", "--sites", "model.layers.0"]) == 0
    capsys.readouterr()
    for extra in ([], ["--plot", "d.png"], ["--json"]):
        assert main(["diff", "a.h5", "b.h5", *extra]) == 2
        err = capsys.readouterr().err
        assert "the runs share no site" in err and err.count("\n") == 1
    assert not os.path.exists("d.png")


def test_diff_warns_when_runs_differ_and_table_matches_plot(tiny_dir, capsys):
    from probe.present.plot import _diff_figure
    from probe.present.report import DIFF_QUANTILES

    assert main(["run", tiny_dir, "--text", "hello world", "-o", "a.h5"]) == 0
    assert main(["run", tiny_dir, "--text", "a longer text with more tokens in it", "-o", "b.h5",
                 "--dtype", "bfloat16"]) == 0
    capsys.readouterr()
    assert main(["diff", "a.h5", "b.h5"]) == 0
    cap = capsys.readouterr()
    assert "warning: the runs saw different numbers of tokens" in cap.err
    assert "warning: the runs differ in dtype (float32 vs bfloat16)" in cap.err
    for q in DIFF_QUANTILES:
        assert f"Δq{q:g}" in cap.out
    pytest.importorskip("matplotlib")
    fig = _diff_figure(probe.load("a.h5"), probe.load("b.h5"))
    labels = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert labels == [f"q{q:g}" for q in DIFF_QUANTILES]
    assert main(["diff", "a.h5", "a.h5"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_cache_command_lists_and_clears_only_probe_copies(tmp_path, capsys, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("PROBE_CACHE", str(root))
    (root / "smollm2-135m-0123456789abcdef").mkdir(parents=True)
    (root / "smollm2-135m-0123456789abcdef" / "model.safetensors").write_bytes(b"x" * 4096)
    (root / "other-tool").mkdir()
    assert main(["cache"]) == 0
    assert "smollm2-135m-0123456789abcdef" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0
    assert "removed 1 cached model copy" in capsys.readouterr().out
    assert sorted(p.name for p in root.iterdir()) == ["other-tool"]


def test_cache_key_is_the_content_not_the_mtime(tmp_path, monkeypatch):
    from probe.models import _cache_dir

    monkeypatch.setenv("PROBE_CACHE", str(tmp_path / "cache"))
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    a.write_bytes(b"same bytes")
    b.write_bytes(b"same bytes")
    c.write_bytes(b"other bytes")
    os.utime(b, (1, 1))
    assert _cache_dir(a) == _cache_dir(b) != _cache_dir(c)
    assert _cache_dir(a).parent == tmp_path / "cache"


def test_show_does_not_import_torch(tiny_dir, tmp_path):
    assert main(["run", tiny_dir, "--text", "hello world", "-o", "r.h5"]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    probe_run = subprocess.run([sys.executable, "-c", "import sys, probe.results.run; print('torch' in sys.modules)"],
                               capture_output=True, text=True, env=env, check=True)
    code = ("import sys; from probe.cli import main; main(['show', 'r.h5']); "
            "main(['show', 'r.h5', '--json']); print('torch' in sys.modules)")
    show = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    cli = subprocess.run([sys.executable, "-c", "import sys, probe.cli, probe.present.report, probe.present.plot; "
                          "print('torch' in sys.modules)"], capture_output=True, text=True, env=env, check=True)
    assert cli.stdout.split()[-1] == "False"  # cli, report and plot import no torch themselves
    if probe_run.stdout.strip() == "True":
        pytest.skip("probe.results.run (the read side) still imports torch")
    assert show.stdout.split()[-1] == "False"


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


def test_import_probe_loads_capture_and_torch_only_on_use():
    code = ("import sys, types, probe; assert 'torch' not in sys.modules, 'import probe imported torch'; "
            "from probe.capture import Capture, session; assert 'torch' in sys.modules; "
            "assert not isinstance(probe.capture, types.ModuleType) and probe.capture is session.capture; "
            "assert probe.capture.__name__ == 'capture' and 'capture' in dir(probe)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_quant_table_piped_names_every_site(tiny_dir, capsys):
    assert main(["run", tiny_dir, "--text", "hello world, a test", "--sites", "linear_inputs",
                 "--stats", "moments,histogram", "--skip-first", "0", "-o", "q.h5"]) == 0
    capsys.readouterr()
    assert main(["show", "q.h5", "--quant", "fp8"]) == 0  # capsys is not a terminal: a pipe
    out = capsys.readouterr().out
    for site in probe.load("q.h5").sites:
        assert site in out, site


def test_show_refuses_a_folder_and_a_lone_scale(tiny_dir, tmp_path, capsys):
    assert main(["show", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["run", tiny_dir, "--text", "hello world", "-o", "r.h5"]) == 0
    capsys.readouterr()
    assert main(["show", "r.h5", "--scale", "0.1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--scale" in err and "--quant" in err


def test_cli_warnings_are_one_line(tiny_dir, capsys):
    import warnings

    assert main(["run", tiny_dir, "--text", "hello world", "--seed", "3", "-o", "a.h5"]) == 0
    assert main(["run", tiny_dir, "--text", "hello again", "--seed", "3", "-o", "b.h5"]) == 0
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda *a, **k: sys.stderr.write(warnings.formatwarning(*a[:4]))
        assert main(["merge", "a.h5", "b.h5", "-o", "ab.h5"]) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "seed" in x)
    assert line.startswith("probe") and ".py:" not in err  # no source path, no source line


def test_merge_of_other_sites_names_what_differs_briefly(tiny_dir, capsys):
    assert main(["run", tiny_dir, "--text", "hello world", "-o", "a.h5"]) == 0
    assert main(["run", tiny_dir, "--text", "hello world", "--sites", "linear_inputs", "-o", "b.h5"]) == 0
    capsys.readouterr()
    assert main(["merge", "a.h5", "b.h5", "-o", "ab.h5"]) == 2
    err = capsys.readouterr().err
    assert "entries vs" in err and len(err) < 1000


def test_run_linear_inputs_defaults_to_the_calibration_preset(tiny_dir):
    assert main(["run", tiny_dir, "--text", "hello world", "--sites", "linear_inputs", "-o", "c.h5"]) == 0
    assert probe.load("c.h5").stats == ["moments"]
    assert main(["run", tiny_dir, "--text", "hello world", "--stats", "calibration", "-o", "d.h5"]) == 0
    assert probe.load("d.h5").stats == ["moments"]



def test_show_marks_sites_that_recorded_nothing(capsys):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    net = Net()
    with pytest.warns(UserWarning, match="never fired"):
        with probe.capture(net, out="r.h5", sites=["used", "unused"], stats=("moments",)):
            net(torch.randn(2, 3, 4))
    assert set(probe.load("r.h5").meta["disabled"]) == {"unused"}
    assert main(["show", "r.h5"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "1 site(s) recorded nothing or were disabled: unused (never fired)" in out
    assert main(["show", "r.h5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["disabled"] == {"unused": "never fired"}


def test_max_tokens_beyond_the_texts_says_so_in_one_line(tiny_dir, tmp_path, capsys):
    out = str(tmp_path / "r.h5")
    assert main(["run", tiny_dir, "--text", "hello world, this is a test", "-o", out, "--max-tokens", "3000"]) == 0
    err = capsys.readouterr().err
    tokens = int(probe.load(out)["hidden_states.0"].position.tokens.sum())  # every real token captured
    lines = [line for line in err.splitlines() if "warning" in line]
    assert len(lines) == 1 and f"ran out at {tokens} tokens" in lines[0] and "--max-tokens 3000" in lines[0]
    assert main(["run", tiny_dir, "--text", "hello world, this is a test", "-o", out, "--overwrite",
                 "--max-tokens", str(tokens)]) == 0
    assert "ran out" not in capsys.readouterr().err  # the limit reached: nothing to say
