"""Nothing lost, the host never broken, every bad input one clear line."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import probe
from conftest import batch

ROOT = Path(__file__).resolve().parents[1]

WRITER = textwrap.dedent("""
    import os, signal, sys, time, torch, transformers, probe
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    out, kill_after, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    with probe.capture(model, out, every=1) as run:
        for i in range(100):
            with torch.no_grad():
                model(input_ids=torch.randint(0, 97, (2, 8)))
            print("committed", i + 1, flush=True)
            if i + 1 == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(pause)
""")


def _writer(tmp_path, kill_after, pause=0.0):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "live.h5"), str(kill_after), str(pause)],
                            stdout=subprocess.PIPE, text=True, env={"PYTHONPATH": str(ROOT / "src"),
                                                                     "PATH": "/usr/bin:/bin"})


def test_sigkill_keeps_committed_windows(tmp_path):
    proc = _writer(tmp_path, kill_after=3)
    proc.wait(timeout=120)
    assert proc.returncode == -9
    run = probe.load(tmp_path / "live.h5")
    # windows 1 and 2 were acknowledged (the third commit waited for the second); the third was in
    # probe's writer process beside the forward when the job died: in the file only if it finished
    assert run.steps in ([1, 2], [1, 2, 3])
    assert run["hidden_states.1"].tokens == len(run.steps) * 16


def test_show_and_watch_say_the_writer_is_gone(tmp_path, capsys):
    from probe.cli import main

    proc = _writer(tmp_path, kill_after=2)
    proc.wait(timeout=120)
    path = str(tmp_path / "live.h5")
    assert main(["show", path, "--json"]) == 0
    err = capsys.readouterr().err
    assert f"the writer of {path!r} (pid {proc.pid}@" in err and f"run `probe repair {path}`" in err
    assert main(["watch", path, "--interval", "0.01"]) == 1  # not polling forever: the job is gone
    assert "is gone without closing the file" in capsys.readouterr().err
    code = main(["repair", path])
    assert code == 0, capsys.readouterr()
    capsys.readouterr()
    assert main(["show", path, "--json"]) == 0  # repaired: no lock file, no note
    assert capsys.readouterr().err == ""


def test_show_says_nothing_of_a_live_or_closed_writer(tmp_path, capsys):
    from probe.cli import main

    proc = _writer(tmp_path, kill_after=1000, pause=0.05)
    try:
        for line in proc.stdout:
            if line.strip() == "committed 2":
                break
        assert main(["show", str(tmp_path / "live.h5"), "--json"]) == 0
        assert "gone" not in capsys.readouterr().err  # a live writer holds its lock
    finally:
        proc.kill()
        proc.wait()


def test_live_file_is_readable_while_written(tmp_path, capsys):
    proc = _writer(tmp_path, kill_after=1000, pause=0.05)
    try:
        for line in proc.stdout:
            if line.strip() == "committed 5":
                break
        seen = []
        for _ in range(5):  # read repeatedly while the writer keeps appending
            seen.append(len(probe.load(tmp_path / "live.h5").steps))
            time.sleep(0.03)
        from probe.cli import main

        assert main(["show", str(tmp_path / "live.h5"), "--json"]) == 0
    finally:
        proc.kill()
        proc.wait()
    assert seen[0] >= 4 and seen == sorted(seen)


def test_empty_batch_and_all_padding_rows(tiny):
    model = tiny("llama")
    ids, mask = batch(3, 6, "right")
    mask[1] = 0  # a row with no real token
    with probe.capture(model, strict=True, skip_first=1) as run:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    s = run["hidden_states.2"]
    assert s.tokens == int(mask.sum()) - 2
    assert np.isfinite([s.mean, s.std, s.kurtosis]).all()
    assert np.isfinite(run.cross.r2).all()
    with probe.capture(model, strict=True) as empty:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.zeros_like(mask))
    e = empty["hidden_states.1"]
    assert e.tokens == 0 and e.count == 0 and np.isnan(e.mean) and e.quantile(0.5) != e.quantile(0.5)
    net = Blocks()
    with probe.capture(net, strict=True) as none:
        net(torch.zeros(0, 5, 4))  # an empty batch
        net(torch.ones(1, 0, 4))  # an empty sequence
    assert none["hidden_states.1"].tokens == 0


class Blocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])

    def forward(self, h):
        for b in self.blocks:
            h = b(h)
        return h


def run_poisoned(model, module, cells, ids, **options):
    """Capture one forward in which ``module``'s output gets ``value`` at each ``(index, value)``."""

    def poison(mod, args, output):
        out = output.clone()
        for index, value in cells:
            out[index] = value
        return out

    h = module.register_forward_hook(poison)
    try:
        with probe.capture(model, strict=True, **options) as run:
            with torch.no_grad():
                model(input_ids=ids)
    finally:
        h.remove()
    return run


def test_nan_inf_activations_counted_not_poisoning(tiny):
    model = tiny("llama")
    ids, _ = batch(2, 6)
    cells = [((0, 2, 1), float("nan")), ((1, 3, 2), float("inf")), ((1, 4, 3), -float("inf"))]
    run = run_poisoned(model, model.model.layers[0], cells, ids)
    s = run["hidden_states.1"]
    assert (s.nan, s.posinf, s.neginf) == (1, 1, 1)
    assert s.count == ids.numel() * 32 - 3
    assert np.isfinite([s.mean, s.std, s.skew, s.kurtosis, s.min, s.max]).all()
    assert run[run.sites[-1]].nan > 0  # the NaN spreads through later layers, and is counted there


def test_nonfinite_token_left_out_of_cross(tiny):
    model = tiny("llama")
    ids, _ = batch(2, 6)
    # only the last site (the final norm's output) sees the NaN
    run = run_poisoned(model, model.model.norm, [((0, 2, 1), float("nan"))], ids, stats=("cross",))
    assert run.cross.n_all == (ids.numel() - 1) * 32  # that token, in every site, and nothing else
    assert np.isfinite(run.cross.r2_all).all()


def test_fp16_near_overflow():
    x = torch.tensor([[[60000.0, -65504.0, 1.0, 0.5]]], dtype=torch.float16).repeat(2, 3, 1)

    net = Blocks()
    with probe.capture(net, strict=True) as run:
        net(x)
    s = run["hidden_states.2"]
    ref = x.double().numpy().ravel()
    assert s.absmax == 65504.0 and s.dtype == "float16"
    c = ref - ref.mean()
    np.testing.assert_allclose(s.kurtosis, (c**4).mean() / (c**2).mean() ** 2 - 3, rtol=1e-6)


def test_threads_refused_clearly(tiny):
    model = tiny("gpt2")
    ids, _ = batch()
    with pytest.warns(UserWarning, match="another thread"):
        with probe.capture(model) as run:
            t = threading.Thread(target=lambda: model(input_ids=ids))
            t.start()
            t.join()
            with torch.no_grad():
                model(input_ids=ids)
    assert run["hidden_states.1"].tokens == ids.numel()


def _good_file(tmp_path, model, name="r.h5", **kw):
    with probe.capture(model, out=tmp_path / name, **kw):
        with torch.no_grad():
            model(input_ids=batch()[0])
    return tmp_path / name


def test_truncated_and_hostile_files(tiny, tmp_path):
    good = _good_file(tmp_path, tiny("gpt2"))
    data = good.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(probe.ProbeError, match="not a readable HDF5 file|damaged"):
        probe.load(cut)
    hostile = tmp_path / "hostile.h5"
    with h5py.File(hostile, "w") as f:
        f.attrs["schema"], f.attrs["schema_version"], f.attrs["meta"] = "probe", 1, '{"sites": []}'
        f.create_dataset("steps", data=np.arange(2))
        g = f.create_group("sites/00")
        g.attrs["name"] = "x"
        g.create_dataset("moments/n", shape=(2, 2**40), dtype="f8", chunks=(1, 1024))
    with pytest.raises(probe.ProbeError, match="declares .* bytes"):
        probe.load(hostile)
    wrong = tmp_path / "wrong.h5"
    with h5py.File(wrong, "w") as f:
        f.attrs["schema"], f.attrs["schema_version"], f.attrs["meta"] = "probe", 1, "{not json"
        f.create_dataset("steps", data=np.arange(1))
    with pytest.raises(probe.ProbeError, match="not JSON"):
        probe.load(wrong)


def test_merge_refusals(tiny, tmp_path):
    a = _good_file(tmp_path, tiny("gpt2"), "a.h5", seed=1)
    other_model = _good_file(tmp_path, tiny("llama"), "b.h5", seed=2)
    bits = _good_file(tmp_path, tiny("gpt2"), "c.h5", seed=3, histogram_bits=5)
    sites = _good_file(tmp_path, tiny("gpt2"), "d.h5", seed=4, sites=["transformer.h.0"])
    for path, match in ((other_model, "captures other sites|another model"), (bits, "differs .* in histogram"),
                        (sites, "captures other sites")):
        with pytest.raises(probe.ProbeError, match=match):
            probe.merge([a, path], tmp_path / "m.h5", overwrite=True)


def test_cli_debug_shows_traceback(capsys):
    from probe.cli import main

    with pytest.raises(probe.ProbeError):
        main(["--debug", "show", "/nonexistent.h5"])


def test_ctrl_c_while_a_forward_is_folded_keeps_every_site_whole(tiny, tmp_path, monkeypatch):
    """A Ctrl-C landing between two statistics' updates of one site is delivered after the fold:
    the file opens, each site's histogram counts what its moments count, and that count is the
    float64 reference's (real tokens x channels of the three forwards, the interrupted one included)."""
    import os
    import signal

    from probe.stats.histogram import Histogram

    # probe holds Ctrl-C only while SIGINT has Python's default handler; an earlier test's library
    # (a compiler or a process pool) may have left another one installed in this process
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as Python starts; left so after the test
    from probe.capture import kernels

    monkeypatch.setattr(kernels, "_OFF", True)  # the eager statistics, whose Histogram.update_group is patched
    model = tiny("llama")
    calls = {"n": 0}
    original = Histogram.update_group.__func__

    def interrupted(cls, stats, x, tokens):
        calls["n"] += 1
        if calls["n"] == 1 and armed["on"]:
            os.kill(os.getpid(), signal.SIGINT)  # the moments of this site are already updated
        return original(cls, stats, x, tokens)

    armed = {"on": False}
    monkeypatch.setattr(Histogram, "update_group", classmethod(interrupted))
    ids, mask = batch(pad="left")
    out = tmp_path / "run.h5"
    with pytest.raises(KeyboardInterrupt):
        with probe.capture(model, out=out, skip_first=0):
            for k in range(3):
                armed["on"] = k == 2
                calls["n"] = 0
                model(input_ids=ids, attention_mask=mask)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    run = probe.load(out)
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for i, h in enumerate(hs):
        x = h.double().numpy()[mask.numpy().astype(bool)]  # real tokens x channels
        want = 3 * np.isfinite(x).sum()
        moments = run[i].state("moments")
        counts = run[i].state("histogram")
        assert moments["n"].sum() == want
        assert counts["counts"].sum() == want


def test_ctrl_c_in_the_first_forward_blames_neither_model_nor_options(tiny, recwarn):
    """Interrupted before any forward ended: no warning says sites "recorded nothing" or that
    skip_first left no token (the cut-short forward is the whole story)."""
    model = tiny("llama")

    def stop(*_):
        raise KeyboardInterrupt

    handle = model.model.layers[0].register_forward_hook(stop)
    ids, mask = batch()
    try:
        with pytest.raises(KeyboardInterrupt):
            with probe.capture(model, skip_first=4):
                model(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    said = [str(w.message) for w in recwarn if "probe" in str(w.message)]
    assert not [m for m in said if "recorded nothing" in m or "left no token" in m], said
