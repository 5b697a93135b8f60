"""``probe.plot``: every figure kind is written as a real, non-blank PNG from a real capture of a
tiny random-init GPT-2; missing statistics are skipped or refused; matplotlib stays optional."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

import probe
from probe import ProbeError

pytest.importorskip("matplotlib")
from probe.plot import KINDS, plot_diff, plot_run  # noqa: E402

FILES = {
    "histograms": ["hist_grid.png", "hist_overlay.png"],
    "depth": ["depth.png"],
    "cross": ["cross_cov.png", "cross_r2.png"],
    "scatter": ["scatter_position.png", "scatter_channel.png"],
    "channels": ["channels_absmax.png"],
    "positions": ["positions.png"],
    "steps": ["steps.png"],
}


def _model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def _batches(n: int = 3):
    """Right-padded batches of uneven length, so the attention mask matters."""
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        ids = torch.randint(0, 100, (4, 24), generator=g)
        lengths = torch.tensor([24, 20, 13, 7])
        mask = (torch.arange(24)[None, :] < lengths[:, None]).long()
        yield {"input_ids": ids, "attention_mask": mask}


def _capture(path, windows: int = 1, **kwargs):
    model = _model()
    with probe.capture(model, out=path, skip_first=1, **kwargs) as run:
        for i, batch in enumerate(_batches()):
            with torch.no_grad():
                model(**batch)
            if windows > 1 and i == 0:
                run.snapshot(step=10)
    return run


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    path = tmp_path_factory.mktemp("one") / "r.h5"
    _capture(path)
    return probe.load(path)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    path = tmp_path_factory.mktemp("two") / "r.h5"
    _capture(path, windows=2)
    return probe.load(path)


def check_png(path) -> None:
    """A real PNG, not a stub: signature, a few KB, more than one colour, within the size budget."""
    from matplotlib.image import imread

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
    size = os.path.getsize(path)
    assert 5_000 < size < 300_000, (path, size)
    pixels = imread(path)[..., :3].reshape(-1, 3)
    assert np.ptp(pixels, axis=0).max() > 0.5, f"{path} is a flat colour"
    assert len(np.unique(pixels[:: max(1, len(pixels) // 20000)], axis=0)) > 8, f"{path} has almost no content"


def test_every_kind_with_data_is_drawn(one, tmp_path):
    out = tmp_path / "figs"
    paths = plot_run(one, out)
    expected = [f for kind in KINDS if kind != "steps" for f in FILES[kind]]
    assert [os.path.basename(p) for p in paths] == expected  # steps skipped: a single window
    for p in paths:
        assert os.path.dirname(p) == str(out)
        check_png(p)


def test_kinds_select_files(one, tmp_path):
    paths = plot_run(one, tmp_path, kinds=["cross", "positions"])
    assert sorted(os.path.basename(p) for p in paths) == sorted(FILES["cross"] + FILES["positions"])


def test_two_windows_draw_steps(two, tmp_path):
    assert len(two.steps) == 2
    paths = plot_run(two, tmp_path)
    assert [os.path.basename(p) for p in paths] == [f for kind in KINDS for f in FILES[kind]]
    check_png(paths[-1])


def test_steps_asked_for_on_one_window_is_refused(one, tmp_path):
    with pytest.raises(ProbeError, match=r"'steps' needs two or more windows.*snapshot"):
        plot_run(one, tmp_path, kinds=["steps"])


def test_unknown_kind_names_the_valid_ones(one, tmp_path):
    with pytest.raises(ProbeError, match=r"unknown plot kind 'bogus'; expected one of histograms, depth, cross, "
                                         r"scatter, channels, positions, steps"):
        plot_run(one, tmp_path, kinds=["histograms", "bogus"])
    assert not list(tmp_path.iterdir())  # refused before drawing anything


def test_missing_statistics_are_skipped_or_refused(tmp_path):
    run = _capture(tmp_path / "m.h5", stats=("moments",)).result
    paths = plot_run(run, tmp_path / "figs")
    assert [os.path.basename(p) for p in paths] == ["channels_absmax.png"]
    with pytest.raises(ProbeError, match=r"'histograms' needs histogram statistics.*stats including 'histogram'"):
        plot_run(run, tmp_path / "figs", kinds=["histograms"])
    with pytest.raises(ProbeError, match=r"'cross' needs cross statistics"):
        plot_run(run, tmp_path / "figs", kinds="cross")


def test_a_finished_capture_plots_like_a_loaded_run(tmp_path):
    run = _capture(None)
    (path,) = plot_run(run, tmp_path, kinds=["channels"])
    check_png(path)


def test_plot_diff_writes_a_png(one, two, tmp_path):
    path = plot_diff(one, two, tmp_path / "sub" / "diff.png")
    assert path == str(tmp_path / "sub" / "diff.png")
    check_png(path)


def test_missing_matplotlib_says_how_to_install(one, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(ProbeError, match=r'plotting needs matplotlib.*pip install "probe\[plot\]"'):
        plot_run(one, tmp_path)
    with pytest.raises(ProbeError, match="plotting needs matplotlib"):
        plot_diff(one, one, tmp_path / "d.png")


def test_import_probe_does_not_import_matplotlib():
    code = "import sys, probe, probe.plot; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
