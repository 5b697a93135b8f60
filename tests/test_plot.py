"""``probe.present.plot``: every figure kind is written as a real, non-blank PNG from a real capture of a
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
from probe.present.plot import KINDS, plot_diff, plot_run  # noqa: E402

FILES = {
    "histograms": ["hist_grid.png", "hist_overlay.png"],
    "depth": ["depth.png"],
    "cross": ["cross_cov.png", "cross_r2.png"],
    "scatter": ["scatter_position.png", "scatter_channel.png"],
    "channels": ["channels_absmax.png"],
    "positions": ["positions.png"],
    "timeline": ["timeline.png"],
    "steps": ["steps.png"],
    "experts": [],  # a dense model: no mixture-of-experts sites, the figure is skipped (tests/test_moe.py draws it)
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
    expected = [f for kind in KINDS if kind not in ("steps", "timeline") for f in FILES[kind]]
    assert [os.path.basename(p) for p in paths] == expected  # steps and timeline skipped: a single window
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
    check_png(paths[-2])
    check_png(paths[-1])


def test_steps_asked_for_on_one_window_is_refused(one, tmp_path):
    with pytest.raises(ProbeError, match=r"'steps' needs two or more windows.*every=N.*snapshot"):
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
    code = "import sys, probe, probe.present.plot; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------- what is drawn, not just that it is
from probe.present.plot import figures, parse_layers  # noqa: E402


def _stairs(ax):
    from matplotlib.patches import StepPatch

    return [p for p in ax.patches if isinstance(p, StepPatch)]


def test_site_histogram_totals_the_count_and_matches_numpy(tmp_path):
    """Edges spanning [min, max] total the count; the CDF at every edge is off by at most the
    values sharing a float bucket with that edge (the rendering spreads a bucket's mass)."""
    model = _model()
    batch = next(_batches(1))
    with torch.no_grad():
        hs = model(**batch, output_hidden_states=True).hidden_states
    with probe.capture(model, skip_first=1, stats=("moments", "histogram")) as run:
        with torch.no_grad():
            model(**batch)
    mask = batch["attention_mask"].bool()
    keep = mask & ((mask.long().cumsum(-1) - 1) >= 1)
    for name, h in zip(run.sites, hs):
        x = h[keep].double().numpy().ravel()
        s = run[name]
        curved = np.sinh(np.linspace(np.arcsinh(s.min), np.arcsinh(s.max), 40))
        curved[0], curved[-1] = s.min, s.max
        for bins in (57, np.linspace(s.min, s.max, 31), curved):
            counts, edges = s.histogram(bins=bins) if np.ndim(bins) else s.histogram(bins, (s.min, s.max))
            assert edges[0] == s.min == x.min() and edges[-1] == s.max == x.max()
            assert abs(counts.sum() - x.size) <= 1e-9 * x.size, (name, counts.sum(), x.size)
            ours = np.concatenate([[0.0], np.cumsum(counts)])
            ref = np.array([np.sum(x < e) for e in edges], dtype=np.float64)
            ref[-1] = x.size
            near = np.array([np.sum(np.abs(x - e) <= 2.0**-7 * abs(e) + 1e-30) for e in edges])
            assert np.all(np.abs(ours - ref) <= near + 1e-6), name


def test_every_histogram_value_lies_on_the_axis(one):
    figs = figures(one, "histograms")
    grid, overlay = figs["hist_grid.png"], figs["hist_overlay.png"]
    panels = [ax for ax in grid.axes if ax.get_visible()]
    assert len(panels) == len(one.sites)
    for ax, name in zip(panels, one.sites):
        s = one[name]
        (patch,) = _stairs(ax)
        share, edges, _ = patch.get_data()
        lo, hi = ax.get_xlim()
        assert edges[0] == s.min and edges[-1] == s.max and lo <= s.min and hi >= s.max
        assert ax.get_xscale() == "asinh"
        assert abs((share * np.diff(edges)).sum() * s.count - s.count) <= 1e-9 * s.count  # every value is in a bin
    # overlay: one curve per chosen site, all on one axis reaching every site's min and max
    (ax,) = [a for a in overlay.axes if _stairs(a)]
    patches = _stairs(ax)
    assert len(patches) == len(one.sites)  # 3 sites <= the default six
    lo, hi = ax.get_xlim()
    for patch, name in zip(patches, one.sites):
        s = one[name]
        share, edges, _ = patch.get_data()
        assert lo <= s.min and hi >= s.max and edges[0] <= s.min and edges[-1] >= s.max
        assert abs(np.nansum(share * np.diff(edges)) - 1.0) <= 1e-9
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(set(p.get_edgecolor() for p in patches)) == len(patches)  # distinct colours
    assert all(f"σ={one[n].std:.3g}" in t for t, n in zip(labels, one.sites))


def test_shared_axes_mode(one):
    grid = figures(one, "histograms", shared=True)["hist_grid.png"]
    panels = [ax for ax in grid.axes if ax.get_visible()]
    lo = min(one[n].min for n in one.sites)
    hi = max(one[n].max for n in one.sites)
    assert {ax.get_xlim() for ax in panels} == {(lo, hi)}
    assert len({ax.get_ylim() for ax in panels}) == 1
    for ax, name in zip(panels, one.sites):
        share, edges, _ = _stairs(ax)[0].get_data()
        assert edges[0] == lo and edges[-1] == hi and abs((share * np.diff(edges)).sum() - 1.0) <= 1e-9


def test_depth_figure_draws_bands_std_and_kurtosis(one):
    fig = figures(one, "depth")["depth.png"]
    top, mid, low = fig.axes
    views = [one[n] for n in one.sites]
    assert len(top.collections) == 3  # q0.001..q0.999, q0.01..q0.99, q0.25..q0.75
    band = top.collections[0].get_paths()[0].vertices[:, 1]
    q = np.array([v.quantile([0.001, 0.999]) for v in views])
    assert np.isin(q.ravel(), band).all()  # the outer band is drawn from q0.001 to q0.999 of each site
    lines = {tuple(np.round(line.get_ydata(), 12)) for line in top.lines}
    assert tuple(np.round([v.min for v in views], 12)) in lines and tuple(np.round([v.max for v in views], 12)) in lines
    lo, hi = top.get_ylim()
    assert lo <= min(v.min for v in views) and hi >= max(v.max for v in views)
    np.testing.assert_array_equal(mid.lines[0].get_ydata(), [v.std for v in views])
    np.testing.assert_array_equal(low.lines[0].get_ydata(), [v.kurtosis for v in views])


def test_scatter_draws_every_sampled_value_without_a_kinked_scale(one):
    figs = figures(one, "scatter", layers="all")
    for file in ("scatter_position.png", "scatter_channel.png"):
        axes = [ax for ax in figs[file].axes if ax.get_visible()]
        assert len(axes) == len(one.sites)  # every layer available
        for ax, name in zip(axes, one.sites):
            values = one[name].sample.value
            dots = ax.collections[0]  # then the stored top-k, drawn over the sample
            y = dots.get_offsets()[:, 1]
            assert len(y) == len(values)
            lo, hi = ax.get_ylim()
            assert lo <= y.min() and hi >= y.max()
            assert ax.get_yscale() == "asinh"  # smooth: no density jump where symlog switches
    chosen = figures(one, "scatter", layers="0,2")["scatter_position.png"]
    assert [ax.get_title().split(":")[0] for ax in chosen.axes if ax.get_visible()] == ["layer 0", "layer 2"]


def test_scatter_leaves_out_sampled_non_finite_values(tmp_path):
    """A NaN and an inf in the activations can be sampled (the sample keeps what sits at its
    locations); the scatter draws the finite points only, on finite axes."""
    model = _model()

    def poison(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[0, 3, :] = float("nan")
        hidden[1, 4, :] = float("inf")

    handle = model.transformer.h[0].register_forward_hook(poison)
    try:
        with probe.capture(model, out=tmp_path / "r.h5", sample_size=2000) as run:
            for batch in _batches(1):
                with torch.no_grad():
                    model(**batch)
    finally:
        handle.remove()
    run = probe.load(tmp_path / "r.h5")
    values = run["hidden_states.1"].sample.value
    assert np.isnan(values).any() and np.isinf(values).any()  # not vacuous: the sample holds both
    figs = figures(run, "scatter", layers="1")
    (ax,) = [ax for ax in figs["scatter_position.png"].axes if ax.get_visible()]
    y = ax.collections[0].get_offsets()[:, 1]
    assert len(y) == np.isfinite(values).sum() and np.isfinite(ax.get_ylim()).all()


def test_parse_layers(one):
    assert parse_layers(one, "all") == one.sites
    assert parse_layers(one, "2,0") == ["hidden_states.0", "hidden_states.2"]
    assert parse_layers(one, "0-1") == ["hidden_states.0", "hidden_states.1"]
    assert parse_layers(one, ["hidden_states.1"]) == ["hidden_states.1"]
    with pytest.raises(ProbeError, match=r"--layers 7: no such site"):
        parse_layers(one, "7")
    with pytest.raises(ProbeError, match=r"--layers: expected layer numbers"):
        parse_layers(one, " , ")


def test_progress_is_reported_per_kind(one, tmp_path):
    seen = []
    plot_run(one, tmp_path, kinds=["histograms", "depth"], progress=lambda k, i, n: seen.append((k, i, n)))
    assert seen == [("histograms", 1, 2), ("depth", 2, 2)]


def test_plot_cli_prints_progress(one, tmp_path, capsys):
    from probe.cli import main

    assert main(["plot", one.path, "-o", str(tmp_path / "f"), "--kind", "depth", "--layers", "0,1"]) == 0
    cap = capsys.readouterr()
    assert "drawing depth (1/1)" in cap.err and cap.out.strip().endswith("depth.png")


# ------------------------------------------- figures checked against the reference they claim to show
T_SCALE, MASSIVE = 30.0, 5000.0


@pytest.fixture(scope="module")
def heavy():
    """A tiny GPT-2 whose first block outputs a known unimodal heavy-tailed sample (Student-t, 3
    degrees of freedom, × 30) with one massive value at the first token: hidden_states.1 is exactly
    that tensor, every token kept (skip_first=0)."""
    torch.manual_seed(0)
    model = transformers.GPT2Model(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100,
                                                           n_positions=64)).eval()
    rng = np.random.default_rng(0)
    x = (rng.standard_t(3, size=(8, 64, 64)) * T_SCALE).astype(np.float32)
    x[0, 0, 3] = MASSIVE

    def inject(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden.copy_(torch.from_numpy(x))

    handle = model.h[0].register_forward_hook(inject)
    try:
        with probe.capture(model, skip_first=0, sample_size=500, seed=0) as cap:
            with torch.no_grad():
                model(input_ids=torch.randint(0, 100, (8, 64)), attention_mask=torch.ones(8, 64, dtype=torch.long))
    finally:
        handle.remove()
    return cap.result, x.astype(np.float64).ravel()


def test_histogram_density_has_the_distributions_shape(heavy):
    """Each panel and overlay curve is a density per unit of x: it integrates to 1, its mode is
    np.histogram's on the same bins, and an asinh axis draws no dip at 0 (a share per bin, which
    grows with the bin width |x| · dt, peaks far out instead)."""
    run, x = heavy
    s = run["hidden_states.1"]
    grid = figures(run, "histograms")["hist_grid.png"]
    panel = [ax for ax in grid.axes if ax.get_visible()][1]
    density, edges, _ = _stairs(panel)[0].get_data()
    widths = np.diff(edges)
    assert abs(float(np.sum(density * widths)) - 1.0) <= 1e-9
    ref, _ = np.histogram(x, bins=edges, density=True)
    centres = (edges[1:] + edges[:-1]) / 2
    ours_mode, ref_mode = centres[np.argmax(density)], centres[np.argmax(ref)]
    assert abs(ours_mode - ref_mode) <= 3 * widths[np.argmax(ref)] + 1e-12, (ours_mode, ref_mode)
    assert abs(ref_mode) < 0.5 * T_SCALE  # the reference is unimodal at 0
    # the binned curve follows np.histogram's: within 2 % of the peak at every bin
    assert np.max(np.abs(density - ref)) <= 0.02 * ref.max()

    overlay = figures(run, "histograms", layers="0,1")["hist_overlay.png"]
    (ax,) = [a for a in overlay.axes if _stairs(a)]
    curves = _stairs(ax)
    assert len(curves) == 2
    for patch, name in zip(curves, ("hidden_states.0", "hidden_states.1")):
        d, e, _ = patch.get_data()
        assert abs(float(np.nansum(d * np.diff(e))) - 1.0) <= 1e-9, name
    # the overlay's axis is linear only within the narrowest site's std (~0.02): for the Student-t
    # site its bins widen ~|x| from a few hundredths on, where a share per bin peaks at |x| ~ 30
    d, e, _ = curves[1].get_data()
    w, c = np.diff(e), (e[1:] + e[:-1]) / 2
    ref, _ = np.histogram(x, bins=e, density=True)
    assert abs(c[np.argmax(ref * w)]) > 0.5 * T_SCALE  # the share per bin: two humps, not the shape
    assert abs(c[np.nanargmax(d)]) < 0.5 * T_SCALE  # the density: the mode where it is
    inner = np.abs(c) < 0.1 * T_SCALE
    near0 = float(np.nansum(d[inner] * w[inner]) / w[inner].sum())
    span = (e[:-1][inner][0], e[1:][inner][-1])
    exact = np.sum((x >= span[0]) & (x < span[1])) / x.size / (span[1] - span[0])
    np.testing.assert_allclose(near0, exact, rtol=0.02)
    far = float(np.nanmax(np.where(np.abs(c) > 2 * T_SCALE, d, np.nan)))
    assert near0 > 4 * far  # no dip at 0
    assert ax.get_ylabel().startswith("density per unit of x")


def test_linear_histograms(heavy):
    run, x = heavy
    overlay = figures(run, "histograms", layers="1", linear=True)["hist_overlay.png"]
    (ax,) = [a for a in overlay.axes if _stairs(a)]
    d, e, _ = _stairs(ax)[0].get_data()
    assert ax.get_xscale() == "linear" and np.allclose(np.diff(e), np.diff(e)[0])
    assert abs(float(np.nansum(d * np.diff(e))) - 1.0) <= 1e-9
    ref, _ = np.histogram(x, bins=e, density=True)
    assert np.argmax(d) == np.argmax(ref)


def test_scatter_marks_the_stored_extremes(heavy):
    """The first-token massive value is one of 32,768 and almost never sampled; the panel still
    shows it, at its position and channel, on its axis."""
    run, x = heavy
    s = run["hidden_states.1"]
    assert s.absmax == MASSIVE and MASSIVE not in s.sample.value  # not vacuous: the sample missed it
    figs = figures(run, "scatter", layers="1")
    for file, axis in (("scatter_position.png", "position"), ("scatter_channel.png", "channel")):
        (ax,) = [a for a in figs[file].axes if a.get_visible()]
        dots, marks = ax.collections
        xy = marks.get_offsets()
        np.testing.assert_array_equal(xy[:, 1], s.topk["value"])
        np.testing.assert_array_equal(xy[:, 0], s.topk[axis])
        top = np.sort(np.abs(x))[::-1][: len(s.topk)]
        np.testing.assert_array_equal(np.sort(np.abs(xy[:, 1]))[::-1], top)  # the exact top-k of the tensor
        assert (0 if axis == "position" else 3, MASSIVE) in {tuple(p) for p in xy}
        lo, hi = ax.get_ylim()
        assert lo <= xy[:, 1].min() and hi >= MASSIVE
        # the legend sits outside every panel, so it can cover no marked extreme
        assert ax.get_legend() is None and len(figs[file].legends) == 1


def _clipped(im) -> int:
    a = np.ma.filled(np.ma.masked_invalid(im.get_array()).astype(np.float64), np.nan)
    a = a[np.isfinite(a) & (a > 0)]
    return int(np.sum((a < im.norm.vmin) | (a > im.norm.vmax)))


def test_colour_scales_clip_nothing_without_a_marker(one, heavy):
    from probe.present.plot import _log_limits

    for run in (one, heavy[0]):
        figs = figures(run, ["cross", "channels"])
        for file in ("channels_absmax.png", "cross_cov.png"):
            ims = [im for ax in figs[file].axes for im in ax.images]
            assert ims, file
            for im in ims:
                n = _clipped(im)
                assert n == 0 or im.colorbar.extend in ("min", "both"), (file, n)
    # the rule itself: a span wider than allowed starts the scale at the limit, with the arrow
    low, extend = _log_limits(np.array([1e-9, 1e-3, 1.0]), 1.0, 1e-6)
    assert (low, extend) == (1e-6, "min")
    assert _log_limits(np.array([1e-3, 1.0]), 1.0, 1e-6) == (1e-3, "neither")


def test_formats_dpi_and_sizes(one, tmp_path):
    from matplotlib.image import imread

    svg = plot_run(one, tmp_path / "svg", kinds="depth", format="svg")
    pdf = plot_run(one, tmp_path / "pdf", kinds="depth", format="pdf")
    assert [os.path.basename(p) for p in svg + pdf] == ["depth.svg", "depth.pdf"]
    assert open(svg[0], "rb").read(200).lstrip().startswith(b"<?xml")
    assert open(pdf[0], "rb").read(5) == b"%PDF-"
    low = imread(plot_run(one, tmp_path / "a", kinds="depth", dpi=60)[0])
    high = imread(plot_run(one, tmp_path / "b", kinds="depth", dpi=180)[0])
    assert abs(high.shape[1] / low.shape[1] - 3.0) < 0.1
    column = imread(plot_run(one, tmp_path / "c", kinds="depth", size="column", dpi=100)[0])
    assert column.shape[1] == 350  # 3.5 in at 100 dpi: a print size is saved at its own size
    default = imread(plot_run(one, tmp_path / "d", kinds="depth", size="column")[0])
    assert default.shape[1] == 1050  # a print size's default is 300 dpi (PRINT_DPI), not the screen's 110
    fig = figures(one, "depth", size="slide")["depth.png"]
    assert abs(fig.get_size_inches()[0] - 13.33) < 1e-9
    for bad, match in (({"format": "jpg"}, r"format \(--format\): expected one of png, pdf, svg"),
                       ({"dpi": 5}, r"dpi \(--dpi\): expected an integer from 10 to 1200"),
                       ({"size": "poster"}, r"size \(--size\): expected one of screen, column, page, slide")):
        with pytest.raises(ProbeError, match=match):
            plot_run(one, tmp_path / "x", kinds="depth", **bad)
    with pytest.raises(ProbeError, match=r"--layers 2-0: a reversed range; expected low-high; pass e.g. --layers 0-2"):
        parse_layers(one, "2-0")
    with pytest.raises(ProbeError, match="needs two or more windows"):  # nothing drawn: no empty folder left
        plot_run(one, tmp_path / "steps", kinds="steps")
    assert not (tmp_path / "steps").exists()


def test_plot_into_an_existing_file_is_one_line(one, tmp_path, capsys):
    from probe.cli import main

    target = tmp_path / "taken"
    target.write_text("x")
    assert main(["plot", one.path, "-o", str(target), "--kind", "depth"]) == 2
    err = capsys.readouterr().err
    assert "is an existing file; expected a folder" in err and err.count("\n") == 1 and "Errno" not in err
    assert main(["plot", one.path, "-o", str(tmp_path / "f"), "--kind", "depth", "--format", "svg",
                 "--dpi", "80", "--size", "column"]) == 0
    assert capsys.readouterr().out.strip().endswith("depth.svg")


# ----------------------------------------------------------------------- layout at every size
@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """31 sites (a 30-block GPT-2: the bundled model's depth) and two windows, so every kind draws."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=30, n_embd=16, n_head=2, vocab_size=100, n_positions=64)).eval()
    path = tmp_path_factory.mktemp("deep") / "r.h5"
    with probe.capture(model, out=path, skip_first=1, sample_size=2000, seed=0) as run:
        for i, batch in enumerate(_batches(2)):
            with torch.no_grad():
                model(**batch)
            if i == 0:
                run.snapshot(step=1)
    return probe.load(path)


def _tick_overlaps(fig, gap: float = 0.0) -> list:
    """Pairs of drawn tick labels, on any one axis of ``fig``, whose boxes intersect or come closer
    than ``gap`` points ("0 5" reads as one number at 1 pt)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    g = gap * fig.dpi / 72 / 2  # each box grown by half the gap
    found = []
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            boxes = []
            for tick in axis.get_major_ticks():
                for label in (tick.label1, tick.label2):
                    if label.get_visible() and label.get_text() and lo <= tick.get_loc() <= hi:
                        boxes.append((label.get_text(), label.get_window_extent(renderer).expanded(1, 1)
                                      .padded(g)))
            found += [(a[0], b[0]) for i, a in enumerate(boxes) for b in boxes[i + 1:]
                      if a[1].x0 < b[1].x1 and b[1].x0 < a[1].x1 and a[1].y0 < b[1].y1 and b[1].y0 < a[1].y1]
    return found


def _text_overlaps(fig) -> list:
    """Pairs of texts of ``fig`` whose boxes intersect, where at least one is an axis label or a
    title (an axes' title, the figure's suptitle, supxlabel and supylabel, a colour bar's label, a
    legend): each is checked against every other such text and every drawn tick label, on any
    axes. Tick labels among themselves are :func:`_tick_overlaps`' business."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw_without_rendering()
    named, ticks = [], []
    for t in (getattr(fig, "_suptitle", None), getattr(fig, "_supxlabel", None), getattr(fig, "_supylabel", None)):
        if t is not None and t.get_visible() and t.get_text():
            named.append((t.get_text()[:30], t.get_window_extent(renderer)))
    for leg in fig.legends:
        named.append(("legend", leg.get_window_extent(renderer)))
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        for t in (ax.xaxis.label, ax.yaxis.label, ax.title, ax._left_title, ax._right_title):
            if t.get_visible() and t.get_text():
                named.append((t.get_text()[:30], t.get_window_extent(renderer)))
        if ax.get_legend() is not None:
            named.append(("legend", ax.get_legend().get_window_extent(renderer)))
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks():
                for label in (tick.label1, tick.label2):
                    if label.get_visible() and label.get_text() and lo <= tick.get_loc() <= hi:
                        ticks.append((label.get_text(), label.get_window_extent(renderer)))

    def meet(a, b) -> bool:
        return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1

    found = [(a[0], b[0]) for i, a in enumerate(named) for b in named[i + 1:] if meet(a[1], b[1])]
    found += [(a[0], b[0]) for a in named for b in ticks if meet(a[1], b[1])]
    return found


def _uncovered(fig) -> list:
    """Value axes of ``fig`` whose outermost tick labels stop short of an end of the view by more
    than one tick step: the median space between neighbouring labels, measured along the drawn
    scale, and at most a tenth of the axis on a log, asinh or symlog scale (round ticks there may
    lie decades apart). Axes labelled with names (site indices) are not value axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.ticker import FixedFormatter, NullFormatter

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw_without_rendering()
    found = []
    for i, ax in enumerate(fig.axes):
        if not ax.get_visible():
            continue
        for axis, which in ((ax.xaxis, "x"), (ax.yaxis, "y")):
            if getattr(axis, "probe_names", False) or \
                    isinstance(axis.get_major_formatter(), (NullFormatter, FixedFormatter)):
                continue
            lo, hi = sorted(axis.get_view_interval())
            tol = 1e-9 * max(1.0, abs(lo), abs(hi))
            locs = sorted({float(t.get_loc()) for t in [*axis.get_major_ticks(), *axis.get_minor_ticks()]
                           if lo - tol <= t.get_loc() <= hi + tol
                           and any(lab.get_visible() and lab.get_text() for lab in (t.label1, t.label2))})
            if not locs:
                continue  # an inner panel of shared axes: its neighbour carries the labels
            t = axis.get_transform()
            a, b = t.transform(np.array([lo, hi]))
            f = (t.transform(np.array(locs)) - a) / (b - a)
            step = float(np.median(np.diff(f))) if len(f) > 1 else 0.0
            if axis.get_scale() != "linear":
                step = min(step, 0.1)
            if len(f) < 2 or f[0] > step + 1e-6 or 1 - f[-1] > step + 1e-6:
                found.append((i, which, locs, (lo, hi)))
    return found


@pytest.mark.parametrize("size", ["column", pytest.param("page", marks=pytest.mark.slow),
                                  pytest.param("screen", marks=pytest.mark.slow),
                                  pytest.param("slide", marks=pytest.mark.slow)])
def test_every_kind_lays_out_at_every_size(deep, size):
    """No collapsed constrained layout and no two tick labels over each other, for every figure
    at every size, on a run as deep as the bundled model (31 sites). About 10 s of CPU per size:
    the narrow sizes run in the fast suite, screen and slide (the widest, least crowded) with
    ``-m slow``."""
    import warnings

    from probe.present.plot import SIZES, _texts, figures

    assert len(deep.sites) == 31
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "constrained_layout not applied ..." fails the test
        figs = figures(deep, size=size)
    assert sorted(figs) == sorted(f for files in FILES.values() for f in files), size
    for name, fig in figs.items():
        # laid out as it will be saved (the last layout figures() ran; savefig's is the same)
        assert not _tick_overlaps(fig, gap=1.0), (size, name, _tick_overlaps(fig, gap=1.0))
        assert not _text_overlaps(fig), (size, name, _text_overlaps(fig))
        assert not _uncovered(fig), (size, name, _uncovered(fig))
        if SIZES[size]:  # resized for print: no text smaller than 6 pt (tick labels included)
            small = [(t.get_text()[:20], t.get_fontsize()) for t in _texts(fig) if t.get_text() and t.get_fontsize() < 6]
            small += [(ax.get_title()[:20], axis.get_major_ticks()[0].label1.get_fontsize()) for ax in fig.axes
                      for axis in (ax.xaxis, ax.yaxis) if axis.get_major_ticks()
                      and axis.get_major_ticks()[0].label1.get_fontsize() < 6]
            assert not small, (size, name, small[:5])
            assert abs(fig.get_size_inches()[0] - SIZES[size]) < 1e-9
            # saved at its own size (no tight bbox): nothing may hang past the edge and be cut off
            from matplotlib.backends.backend_agg import FigureCanvasAgg

            box = fig.get_tightbbox(FigureCanvasAgg(fig).get_renderer())
            w, h = fig.get_size_inches()
            assert box.x0 >= -0.01 and box.y0 >= -0.01 and box.x1 <= w + 0.01 and box.y1 <= h + 0.01, \
                (size, name, box.bounds)
            # mathtext sets a superscript (10^n) at 70 % of its label: it too stays at 6 pt or more
            tiny = [(t.get_text()[:20], t.get_fontsize()) for t in _texts(fig) if "^" in t.get_text()
                    and t.get_text().count("$") >= 2 and 0.7 * t.get_fontsize() < 6]
            tiny += [(lab.get_text(), lab.get_fontsize()) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)
                     for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()] for lab in (tick.label1,)
                     if lab.get_visible() and "^" in lab.get_text() and 0.7 * lab.get_fontsize() < 6]
            assert not tiny, (size, name, tiny[:5])


def test_declutter_thins_crowded_asinh_ticks_nearest_zero_first():
    """The thinning itself: crowded asinh ticks lose the far ones, zero stays; other axes keep
    every k-th tick; what is left does not overlap."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator

    from probe.present.plot import _declutter

    fig = Figure(figsize=(2.0, 1.5))
    ax, lin = fig.subplots(1, 2)
    ax.set_xscale("asinh", linear_width=0.1)
    ax.set_xlim(-500, 500)
    ticks = [-500, -200, -100, -50, -20, -10, -5, -2, -1, -0.5, -0.2, 0, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    lin.set_xlim(0, 30)
    lin.xaxis.set_major_locator(FixedLocator(list(range(31))))
    fig.draw_without_rendering()
    assert _tick_overlaps(fig)  # the test can fail: the labels start crowded
    _declutter(fig)
    fig.draw_without_rendering()
    assert not _tick_overlaps(fig)
    kept = list(ax.xaxis.get_major_locator().tick_values(-500, 500))
    assert 0 in kept and len(kept) < len(ticks)
    steps = np.diff(lin.xaxis.get_major_locator().tick_values(0, 30))
    assert len(set(steps)) == 1 and steps[0] > 1  # every k-th tick, evenly


def test_overlay_says_what_the_asinh_axis_does_to_a_density(one):
    from probe.present.plot import figures

    label = figures(one, "histograms")["hist_overlay.png"].axes[0].get_xlabel()
    assert "plateau" in label.replace("\n", " ") and "--linear" in label
    linear = figures(one, "histograms", linear=True)["hist_overlay.png"].axes[0].get_xlabel()
    assert "plateau" not in linear
    # at a column's width the note leaves the figure and becomes its caption
    column = figures(one, "histograms", size="column")["hist_overlay.png"]
    assert "plateau" not in column.axes[0].get_xlabel().replace("\n", " ")
    assert "plateau" in column.probe_caption and "--linear" in column.probe_caption


def test_column_overlay_caption_is_returned_and_printed(one, tmp_path, capsys):
    from probe.cli import main

    said = []
    paths = plot_run(one, tmp_path / "a", kinds="histograms", size="column",
                     caption=lambda path, text: said.append((os.path.basename(path), text)))
    assert [os.path.basename(p) for p in paths] == ["hist_grid.png", "hist_overlay.png"]
    notes = dict(said)  # both say which tokens were kept; the overlay's opens with the reading note
    assert sorted(notes) == ["hist_grid.png", "hist_overlay.png"] and "plateau" in notes["hist_overlay.png"]
    assert "plateau" not in notes["hist_grid.png"] and all("skip_first=1" in t for t in notes.values())
    assert main(["plot", one.path, "-o", str(tmp_path / "b"), "--kind", "histograms", "--size", "column"]) == 0
    err = capsys.readouterr().err
    assert "caption of" in err and "hist_overlay.png" in err and "plateau" in err
    said.clear()
    plot_run(one, tmp_path / "c", kinds="histograms", caption=lambda path, text: said.append(text))
    assert said and not any("plateau" in t for t in said)  # at screen size the note stays in the figure


def test_a_one_window_run_says_why_steps_is_not_drawn(one, tmp_path, capsys, monkeypatch):
    import probe.present.plot as plot
    from probe.cli import main

    # only the steps drawer is under test: the others draw nothing (they are tested above)
    monkeypatch.setattr(plot, "_DRAW", {k: (f if k == "steps" else (lambda run, out, opts: []))
                                        for k, f in plot._DRAW.items()})
    said = []
    paths = plot_run(one, tmp_path / "a", skipped=lambda kind, why: said.append((kind, why)))
    assert "steps.png" not in [os.path.basename(p) for p in paths]
    assert [k for k, _ in said] == ["steps"] and "every=" in said[0][1] and "1 window" in said[0][1]
    assert main(["plot", one.path, "-o", str(tmp_path / "b"), "--kind", "depth"]) == 0
    assert "skipped" not in capsys.readouterr().err  # asked for by name: nothing else is tried
    assert main(["plot", one.path, "-o", str(tmp_path / "c"), "--kind", "steps"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "every=" in errors[0] and "got [" not in errors[0]


def test_a_dense_run_never_starts_the_experts_figure(one, tmp_path, capsys, monkeypatch):
    """Drawing every kind of a dense model's run: no "drawing experts" line (that figure is never
    to be expected without mixture-of-experts sites); asked for by name, one line says why not."""
    import probe.present.plot as plot
    from probe.cli import main

    monkeypatch.setattr(plot, "_DRAW", {k: (f if k == "experts" else (lambda run, out, opts: []))
                                        for k, f in plot._DRAW.items()})
    seen = []
    plot_run(one, tmp_path / "a", progress=lambda k, i, n: seen.append(k))
    assert seen == [k for k in plot.KINDS if k != "experts"]
    assert main(["plot", one.path, "-o", str(tmp_path / "b")]) == 0
    assert "experts" not in capsys.readouterr().err
    assert main(["plot", one.path, "-o", str(tmp_path / "c"), "--kind", "experts"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "sites='moe'" in errors[0]


def test_symlog_tick_labels_keep_their_sign(one):
    """matplotlib's ``LogFormatter`` labels ``abs(x)``: on a symlog axis whose labels are set
    without superscripts (small print) -10 read "10". Every label of the depth figure's kurtosis
    axis, and of a plain-decade symlog axis, reads as its own tick's value, sign included."""
    from matplotlib.figure import Figure

    from probe.present.plot import _PlainLog

    def value(text: str) -> float:
        return float(text.replace("\N{MINUS SIGN}", "-").replace("$", "").replace("\\mathdefault{", "")
                     .replace("}", ""))

    for size in ("column", "screen"):
        fig = figures(one, "depth", size=size)["depth.png"]
        low = fig.axes[2]
        assert low.get_yscale() == "symlog"
        fig.draw_without_rendering()
        lo, hi = low.get_ylim()
        labels = [(t.get_loc(), t.label1.get_text()) for t in low.yaxis.get_major_ticks()
                  if t.label1.get_text() and lo <= t.get_loc() <= hi]
        assert any(loc < 0 for loc, _ in labels), labels  # the view reaches below 0 (to -0.3 at least)
        for loc, text in labels:
            assert value(text) == pytest.approx(loc, rel=0.05), (size, loc, text)
    ax = Figure().subplots()
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylim(-100, 100)
    plain = _PlainLog(base=10.0, labelOnlyBase=True, linthresh=1.0)
    ax.yaxis.set_major_formatter(plain)
    assert [value(plain(v)) for v in (-100.0, -10.0, 0.0, 10.0)] == [-100.0, -10.0, 0.0, 10.0]


@pytest.mark.parametrize("size", ["column", "page"])
def test_a_shallow_runs_grid_keeps_its_panels_and_labels_apart(one, size):
    """Three sites in one row of panels at a print width: the title, axis labels and panels do
    not run into each other, and each panel keeps a readable height (0.5 in of data at least; a
    one-row grid once drew its panels 0.1 in tall under three lines of x label)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = figures(one, "histograms", size=size)["hist_grid.png"]
    assert not _text_overlaps(fig), _text_overlaps(fig)
    assert not _tick_overlaps(fig, gap=1.0), _tick_overlaps(fig, gap=1.0)
    renderer = FigureCanvasAgg(fig).get_renderer()
    heights = [ax.get_window_extent(renderer).height / fig.dpi for ax in fig.axes if ax.get_visible()]
    assert len(heights) == 3 and min(heights) >= 0.5, heights
    # what the column's short labels leave out is said in the caption
    if size == "column":
        assert "y: density per unit of x" in fig.probe_caption and "exact min and max" in fig.probe_caption


def test_diff_figure_carries_the_caveat(tmp_path):
    """Runs that differ only in skip_first: the figure names skip_first, not the token count."""
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    _capture(a)
    model = _model()
    with probe.capture(model, out=b, skip_first=0):
        for batch in _batches():
            with torch.no_grad():
                model(**batch)
    from probe.present.plot import _diff_figure

    fig = _diff_figure(probe.load(a), probe.load(b))
    title = fig.get_suptitle().replace("\n", " ")
    # the std-ratio panel is symmetric about 1 (log 0), with a label on either side however one-sided the bars
    ratio = fig.axes[0]
    lo, hi = ratio.get_ylim()
    assert lo == pytest.approx(-hi) and hi > 0
    fig.draw_without_rendering()
    shown = [float(t.get_loc()) for t in ratio.yaxis.get_major_ticks() if t.label1.get_text() and lo <= t.get_loc() <= hi]
    assert min(shown) < 0 < max(shown)
    assert not _uncovered(fig) and not _tick_overlaps(fig)
    assert "caveat" in title and "skip_first (1 vs 0)" in title and "different numbers of tokens" not in title
    one = probe.load(a)
    assert "caveat" not in _diff_figure(one, one).get_suptitle()


def test_axes_are_labelled_to_both_ends_of_their_view():
    """An asinh axis reaching -183 whose locator stops at -20, and a log axis over ten decades
    whose labels stop four decades short of its top: each gets a round label near its end, and the
    added labels overlap no neighbour (at a column's font sizes, where crowding happens)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter

    from probe.present.plot import _declutter, _label_ends

    fig = Figure(figsize=(2.2, 1.6))
    ax, lg = fig.subplots(1, 2)
    ax.set_xscale("asinh", linear_width=1.0)
    ax.set_xlim(-183.4, 25.0)
    ax.xaxis.set_major_locator(FixedLocator([-20, 0, 2, 20]))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    lg.set_yscale("log")
    lg.set_ylim(2.5e-13, 0.89)
    lg.yaxis.set_major_locator(FixedLocator([1e-12, 1e-8, 1e-4]))
    for a in (ax, lg):
        a.tick_params(labelsize=6)
    assert _uncovered(fig)  # the test can fail: both axes start short of their ends
    _declutter(fig)
    _label_ends(fig)
    fig.draw_without_rendering()
    assert not _uncovered(fig) and not _tick_overlaps(fig)
    xs = [float(t) for t in ax.xaxis.get_majorticklocs()]
    assert min(xs) <= -100 and min(xs) >= -183.4  # a round value inside the view, near its end
    tops = [float(t) for t in lg.yaxis.get_majorticklocs()]
    assert 0.1 <= max(tops) <= 0.89
    texts = [t.get_text() for t in lg.get_yticklabels() if t.get_text()]
    assert len(texts) >= 2 and all(texts)  # the added non-decade tick is labelled (a log axis labels decades)


def _pdf_facts(path) -> tuple[float, bool, list]:
    """A PDF's page width (pt, from its MediaBox), whether it embeds a Type 3 font, and the size
    (pt) of every font its content streams set (``Tf``): mathtext superscripts are set in their own."""
    import re
    import zlib

    data = open(path, "rb").read()
    box = [float(v) for v in re.search(rb"/MediaBox\s*\[([^\]]*)\]", data).group(1).split()]
    sizes = []
    for m in re.finditer(rb"stream\r?\n(.*?)endstream", data, re.S):
        try:
            sizes += [float(v) for v in re.findall(rb"([\d.]+) Tf\b", zlib.decompress(m.group(1)))]
        except zlib.error:
            continue  # an image or font program, not a content stream
    return box[2] - box[0], b"/Type3" in data, sizes


@pytest.mark.slow  # 30-55 s of CPU: run by make test-slow (and .ci/run)
def test_column_files_are_a_column_wide_with_print_fonts_and_dpi(deep, tmp_path):
    """At ``--size column``: a PDF page and a 300 dpi PNG no wider than 3.5 in (252 pt, 1050 px),
    TrueType fonts (no Type 3), every glyph (10^n exponents included) at 6 pt or more, and the
    PNG records its dpi. The kinds with log axes and the ones palette-encoded."""
    from PIL import Image

    kinds = ["histograms", "scatter", "positions", "timeline"]
    pdfs = plot_run(deep, tmp_path / "pdf", kinds=kinds, size="column", format="pdf")
    assert len(pdfs) == 6
    for p in pdfs:
        width, type3, sizes = _pdf_facts(p)
        assert width <= 252 + 1e-6, (p, width)
        assert not type3, p
        assert sizes and min(sizes) >= 6 - 1e-6, (p, sorted(sizes)[:3])
    for p in plot_run(deep, tmp_path / "png", kinds=kinds, size="column", dpi=300):
        with Image.open(p) as im:
            assert im.size[0] <= 1050, (p, im.size)
            assert im.info.get("dpi") and abs(im.info["dpi"][0] - 300) < 0.01, (p, im.info.get("dpi"))


@pytest.mark.slow  # 30-55 s of CPU: run by make test-slow (and .ci/run)
def test_printed_grid_fits_a_page_and_says_what_it_left_out(deep, tmp_path):
    """31 panels at a column's width would be 10.2 in tall: evenly spread ones are drawn (first
    and last kept), the figure is at most 6.5 in tall (a column, with room for its caption), and
    the caption names every site left out; the panels' titles keep apart."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from probe.present.plot import COLUMN_HEIGHT

    figs = figures(deep, "histograms", size="column")
    grid = figs["hist_grid.png"]
    assert grid.get_size_inches()[1] <= COLUMN_HEIGHT + 1e-9
    shown = [ax for ax in grid.axes if ax.get_visible()]
    assert 18 <= len(shown) < 31
    assert shown[0].get_title().startswith("0:") and shown[-1].get_title().startswith("30:")
    assert f"{len(shown)} of 31 sites" in grid.probe_caption
    drawn = {int(ax.get_title().split(":")[0]) for ax in shown}
    left = grid.probe_caption.split("left out: ")[1].split(" (")[0]
    assert [int(v) for v in left.split(", ")] == [i for i in range(31) if i not in drawn]
    assert "--layers" not in grid.get_suptitle() and "--layers" in grid.probe_caption
    # neighbouring panel titles: at least 2 pt apart
    renderer = FigureCanvasAgg(grid).get_renderer()
    boxes = sorted((ax.title.get_window_extent(renderer) for ax in shown), key=lambda b: (round(b.y0), b.x0))
    for a, b in zip(boxes, boxes[1:]):
        if abs(a.y0 - b.y0) < 1:  # one row
            assert b.x0 - a.x1 >= 2 * grid.dpi / 72, (a, b)
    assert "asinh scale" in grid.get_supxlabel().replace("\n", " ")
    assert len([ax for ax in figures(deep, "histograms", size="page")["hist_grid.png"].axes if ax.get_visible()]) == 31


@pytest.mark.slow  # 30-55 s of CPU: run by make test-slow (and .ci/run)
def test_titles_carry_no_tool_text_and_can_be_left_out(deep, tmp_path, capsys):
    """Titles name what is drawn, not the options that chose it: no ``--layers``, ``skip_first=``
    or doubled parentheses in any title; those go to the caption. ``titles=False`` (``probe plot
    --no-title``) draws no suptitle and opens the caption with its text."""
    from probe.cli import main

    with_titles = figures(deep, size="column")
    bare = figures(deep, size="column", titles=False)
    assert sorted(with_titles) == sorted(bare)
    for name, fig in with_titles.items():
        titles = [fig.get_suptitle()] + [ax.get_title() for ax in fig.axes if ax.get_visible()]
        for t in titles:
            flat = " ".join(t.split())
            assert "--" not in flat and "skip_first" not in flat and "((" not in flat and "))" not in flat, \
                (name, flat)
        text = " ".join(fig.get_suptitle().split())
        assert text, name  # every figure has a title
        other = bare[name]
        assert not other.get_suptitle(), name
        # the title's lines, in order, as sentences of the caption's start
        lines = [" ".join(line.split()) for line in fig.get_suptitle().split("\n") if line.strip()]
        assert other.probe_caption.startswith(lines[0]), (name, other.probe_caption[:80], text)
        at = 0
        for line in lines:
            at = other.probe_caption.find(line, at)
            assert at >= 0, (name, other.probe_caption[:120], line)
            at += len(line)
    assert "skip_first=1" in with_titles["depth.png"].probe_caption
    # a title's lines become sentences: "Histogram per site — M. Panel: layer, …"
    assert ". Panel: layer" in bare["hist_grid.png"].probe_caption
    assert main(["plot", deep.path, "-o", str(tmp_path / "f"), "--kind", "depth", "--no-title"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "caption of" in err and "Width by depth" in err


def test_text_overlaps_catch_stacked_axis_labels():
    """The check itself can fail: two stacked axes whose long y labels run into each other."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.5, 2.0))  # placed by hand: no layout engine moves a label aside
    top, low = fig.add_axes((0.2, 0.45, 0.75, 0.5)), fig.add_axes((0.2, 0.1, 0.75, 0.25))
    top.set_ylabel("std over channels and tokens per position (log)", fontsize=8)
    low.set_ylabel("real tokens", fontsize=8)
    for ax in (top, low):
        ax.yaxis.set_label_coords(-0.17, 0.5)  # one x, as aligned labels of stacked panels have
    assert _text_overlaps(fig)
    top.set_ylabel("std (log)", fontsize=8)
    assert not _text_overlaps(fig)
    ax = Figure(figsize=(1.0, 1.0)).subplots()
    ax.set_xlim(0, 10)
    ax.set_xticks([0, 5])
    ax.tick_params(labelsize=10)
    ax.figure.draw_without_rendering()
    # "0" and "5" about 0.39 in apart: clear of each other, not of a 40 pt gap
    assert not _tick_overlaps(ax.figure, gap=1.0) and _tick_overlaps(ax.figure, gap=40.0)


def _reach(axis, lo: float, hi: float, width: float) -> list:
    """What is wrong with the outermost labels of an asinh ``axis`` for data from ``lo`` to ``hi``:
    each side's outermost label must lie at or past halfway (on the axis' asinh scale) from the
    last 1, 2, 5 × 10**k value before the data's end to that end; the labels inside the shorter
    side's reach must be the same either side of 0."""
    import math

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = axis.figure
    fig.draw_without_rendering()
    FigureCanvasAgg(fig).get_renderer()
    v0, v1 = sorted(axis.get_view_interval())
    locs = [float(t.get_loc()) for t in axis.get_major_ticks()
            if t.label1.get_visible() and t.label1.get_text() and v0 <= t.get_loc() <= v1]
    wrong = []
    for end in (lo, hi):
        side = [v for v in locs if v * end > 0]
        if abs(end) <= width:
            continue
        e = math.floor(math.log10(abs(end)))
        nice = max(m * 10.0**k for k in (e - 1, e) for m in (1, 2, 5) if m * 10.0**k <= abs(end))
        half = np.sinh((np.arcsinh(abs(end) / width) + np.arcsinh(nice / width)) / 2) * width
        far = max((abs(v) for v in side), default=0.0)
        if not far >= half * (1 - 1e-9):
            wrong.append(("short", end, far, half))
    neg, pos = [-v for v in locs if v < 0], [v for v in locs if v > 0]
    if neg and pos:
        reach = min(max(neg), max(pos))
        if sorted(v for v in neg if v < reach) != sorted(v for v in pos if v < reach):
            wrong.append(("asymmetric", sorted(neg), sorted(pos)))
    return wrong


@pytest.mark.parametrize("size", ["column", "page"])
def test_asinh_axes_label_the_datas_far_ends_symmetrically(heavy, size):
    """hist_overlay's x axis and depth's value axis, for a Student-t sample with one massive value
    (5000): the outermost labels reach at least halfway from the last round 1-2-5 value to the
    tensor's exact min and max (np.min/np.max of the float64 reference), and the ticks inside are
    mirrored about 0."""
    from probe.present.plot import _scale_of

    run, x = heavy
    s = run["hidden_states.1"]
    assert s.min == x.min() and s.max == x.max() == MASSIVE  # the references: exact
    overlay = figures(run, "histograms", layers="1", size=size)["hist_overlay.png"]
    (ax,) = [a for a in overlay.axes if _stairs(a)]
    assert not _reach(ax.xaxis, float(x.min()), float(x.max()), _scale_of([s])), \
        _reach(ax.xaxis, float(x.min()), float(x.max()), _scale_of([s]))
    depth = figures(run, "depth", size=size)["depth.png"]
    views = [run[n] for n in run.sites]
    lo, hi = min(v.min for v in views), max(v.max for v in views)
    assert lo <= x.min() and hi == MASSIVE
    wrong = _reach(depth.axes[0].yaxis, lo, hi, _scale_of(views))
    assert not wrong, wrong


def test_far_end_rule_can_fail():
    """The rule the test above checks, on the case it was written for: data to 843 labelled 500."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter

    from probe.present.plot import _asinh_locator

    ax = Figure(figsize=(3.5, 2)).subplots()
    ax.set_xscale("asinh", linear_width=0.11)
    ax.set_xlim(-151, 843)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.xaxis.set_major_locator(FixedLocator([-50, -2, 0, 2, 20, 500]))
    assert _reach(ax.xaxis, -151, 843, 0.11)  # short of 843 and -151, and 20 vs -50
    ax.xaxis.set_major_locator(_asinh_locator(-151, 843, 0.11))
    assert not _reach(ax.xaxis, -151, 843, 0.11), _reach(ax.xaxis, -151, 843, 0.11)


def test_cross_cov_panels_have_their_own_colour_scale(deep):
    """Kept-token and all-token covariances differ by the first token's massive values: each panel
    is coloured from its own smallest to its own largest |cov| (float64 numpy on the stored matrix),
    with a colour bar of its own."""
    fig = figures(deep, "cross", size="column")["cross_cov.png"]
    ims = [im for ax in fig.axes for im in ax.images]
    assert len(ims) == 2
    for im, matrix in zip(ims, (deep.cross.cov, deep.cross.cov_all)):
        mags = np.abs(np.asarray(matrix, dtype=np.float64))
        mags = mags[np.isfinite(mags) & (mags > 0)]
        assert im.norm.vmax == pytest.approx(mags.max(), rel=1e-12)
        assert im.norm.vmin == pytest.approx(max(mags.min(), 1e-12 * mags.max()), rel=1e-12)
    assert ims[0].colorbar is not None and ims[1].colorbar is not None and ims[0].colorbar is not ims[1].colorbar
    assert "own colour scale" in fig.probe_caption


def test_positions_draws_a_few_named_sites(deep):
    """Six evenly spread sites (first and last) plus the heaviest, in distinct colours named in a
    legend, rather than 31 shades of one colour map; the caption says how many of how many."""
    fig = figures(deep, "positions", size="column")["positions.png"]
    top = fig.axes[0]
    lines = [line for line in top.lines if line.get_label() and not line.get_label().startswith("_")]
    assert 2 <= len(lines) <= 7
    names = [line.get_label() for line in lines]
    assert names[0] == "0" and names[-1] == "30"
    heaviest = max(deep.sites, key=lambda n: float(np.nanmax(deep[n].position.absmax)))
    assert heaviest.split(".")[-1] in names
    assert len({line.get_color() for line in lines}) == len(lines)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == names
    assert f"{len(lines)} of 31 sites" in fig.probe_caption
    for line, name in zip(lines, names):  # each line is that site's per-position absmax
        p = deep[f"hidden_states.{name}"].position
        np.testing.assert_array_equal(line.get_ydata(), np.where(p.absmax > 0, p.absmax, np.nan))
    assert "evenly spaced" in fig.probe_caption
    chosen = figures(deep, "positions", size="column", layers=["hidden_states.0", "hidden_states.6"])["positions.png"]
    assert [line.get_label() for line in chosen.axes[0].lines if not line.get_label().startswith("_")] == ["0", "6"]
    assert "2 of 31 sites, as chosen (--layers)" in chosen.probe_caption and "evenly" not in chosen.probe_caption
    # a figure whose sites were chosen does not tell the user to choose them
    for name, fig_ in figures(deep, ["histograms", "scatter"], size="column", layers=["hidden_states.0"]).items():
        assert "choose the sites" not in fig_.probe_caption.lower(), (name, fig_.probe_caption)
    # positions are whole numbers: every labelled tick of the position axis is one, none below 0
    low = chosen.axes[2] if len(chosen.axes) > 2 else chosen.axes[1]
    chosen.draw_without_rendering()
    lo, hi = low.get_xlim()
    ticks = [t.get_loc() for t in low.xaxis.get_major_ticks() if t.label1.get_text() and lo <= t.get_loc() <= hi]
    assert ticks and all(v >= 0 and float(v).is_integer() for v in ticks), ticks


def test_report_figures_leave_the_reading_note_to_the_caption(one):
    overlay = figures(one, "histograms", notes=False)["hist_overlay.png"]
    assert "Reading note" in overlay.probe_caption
    assert "Reading note" not in overlay.axes[0].get_xlabel()
    assert "Reading note" in figures(one, "histograms")["hist_overlay.png"].axes[0].get_xlabel()
