"""Figures of a run as PNG files: ``probe plot run.h5`` and ``probe diff a.h5 b.h5 --plot d.png``.

Recipe::

    import probe
    from probe.plot import plot_run, plot_diff
    run = probe.load("run.h5")
    plot_run(run, "figures")                      # every figure the run has data for
    plot_run(run, "figures", kinds=["cross"])     # just cross_cov.png and cross_r2.png
    plot_diff(probe.load("a.h5"), probe.load("b.h5"), "diff.png")

One kind, one or two files (and the statistics it needs):

- ``histograms``: ``hist_grid.png``, ``hist_overlay.png`` (``histogram``, ``moments``)
- ``cross``: ``cross_cov.png``, ``cross_r2.png`` (``cross``)
- ``scatter``: ``scatter_position.png``, ``scatter_channel.png`` (``sample``)
- ``channels``: ``channels_absmax.png`` (``moments``)
- ``positions``: ``positions.png`` (``position``)
- ``steps``: ``steps.png`` (``moments``, and two or more windows: ``run.snapshot()``)

Activations span decades (a residual stream with massive activations has most values within ±10
and a few near 1000), so nearly every value axis here is logarithmic, and each
figure says which scale it uses. Figures are drawn on a bare :class:`matplotlib.figure.Figure`,
never through ``pyplot``: nothing global changes (a notebook keeps its backend) and no display is
needed. matplotlib is optional (``pip install "probe[plot]"``) and imported only when drawing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from .errors import ProbeError
from .run import Run

__all__ = ["KINDS", "plot_run", "plot_diff"]

Kind = Literal["histograms", "cross", "scatter", "channels", "positions", "steps"]

#: every figure kind, in the order :func:`plot_run` draws them
KINDS: tuple[str, ...] = ("histograms", "cross", "scatter", "channels", "positions", "steps")

DPI = 110
#: quantiles that bound the histogram ranges: wide enough that log-y shows the tails, narrow
#: enough that one massive activation (10**4 x the median) does not squash every bulk into a bin
RANGE_QUANTILES = (1e-4, 1 - 1e-4)
HIST_BINS = 201  # odd, so that 0 sits in the middle of a bin
CMAP_DEPTH = "viridis"


class _Missing(ProbeError):
    """A figure whose statistics the run lacks: skipped unless the kind was asked for by name."""


def _mpl():
    """Import matplotlib lazily; the ``Figure`` class and the modules the figures need."""
    try:
        import matplotlib
        from matplotlib import cm, colors
        from matplotlib.figure import Figure
    except ImportError:
        raise ProbeError('plotting needs matplotlib; expected it installed; pip install "probe[plot]"') from None
    return matplotlib, Figure, colors, cm


# ----------------------------------------------------------------------------------- helpers
def _labels(names: Sequence[str]) -> tuple[list[str], str]:
    """Short tick labels for site names and the axis title that explains them.

    ``hidden_states.k`` becomes ``k`` (the layer); other names lose their common dotted prefix,
    and when that still leaves long names, the site's index in the list is used instead.
    """
    prefix = "hidden_states."
    if names and all(n.startswith(prefix) for n in names):
        return [n[len(prefix):] for n in names], "layer (hidden_states index)"
    parts = [n.split(".") for n in names]
    common = 0
    while parts and all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    short = [".".join(p[common:]) for p in parts]
    if any(len(s) > 14 for s in short):
        return [str(i) for i in range(len(names))], "site (index in run.sites)"
    return short, "site"


def _index_ticks(axis, labels: Sequence[str], most: int = 32, fontsize: float = 7) -> None:
    """Put (at most ``most``) site labels on an axis whose positions are 0..len-1."""
    step = max(1, math.ceil(len(labels) / most))
    idx = list(range(0, len(labels), step))
    axis.set_ticks(idx)
    axis.set_ticklabels([labels[i] for i in idx], fontsize=fontsize)


#: a PNG larger than this is re-encoded with a 256-colour palette
PNG_BUDGET = 250_000


def _save(fig, path: str) -> str:
    """Write ``fig`` as a PNG, palette-encoded when the full-colour file is large.

    Scatter clouds drawn with alpha make thousands of distinct shades that PNG compresses badly
    (450 KB for one figure); an adaptive 256-colour palette brings them to a third, invisibly.
    Heatmaps stay full colour (a palette would band their colorbars). Pillow ships with matplotlib.
    """
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - matplotlib depends on pillow
        Image = None
    if Image is None or buf.tell() <= PNG_BUDGET:
        with open(path, "wb") as f:
            f.write(buf.getvalue())
        return path
    buf.seek(0)
    with Image.open(buf) as im:
        im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE) \
            .save(path, format="PNG", optimize=True)
    return path


def _cmap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def _depth_colorbar(fig, ax, cm, colors, names: Sequence[str], label: str):
    norm = colors.Normalize(vmin=0, vmax=max(1, len(names) - 1))
    sm = cm.ScalarMappable(norm=norm, cmap=_cmap(CMAP_DEPTH))
    bar = fig.colorbar(sm, ax=ax, pad=0.01, fraction=0.04)
    labels, _ = _labels(names)
    step = max(1, math.ceil(len(names) / 12))
    ticks = list(range(0, len(names), step))
    bar.set_ticks(ticks)
    bar.set_ticklabels([labels[i] for i in ticks], fontsize=7)
    bar.set_label(label, fontsize=8)
    return norm


def _title(run: Run) -> str:
    model = run.meta.get("model", {})
    name = model.get("name_or_path") or model.get("class") or "model"
    return f"{name} · skip_first={run.meta.get('skip_first', '?')}"


def _sites_with(run: Run, kind: str) -> list[str]:
    """Sites whose ``kind`` state is present and non-empty (disabled sites have none)."""
    sites = run.total.get("sites", {})
    return [n for n in run.sites if sites.get(n, {}).get(kind)]


def _missing(kind: str, stat: str, run: Run) -> _Missing:
    got = run.meta.get("stats")
    return _Missing(f"plot kind {kind!r} needs {stat} statistics; expected a run captured with stats including "
                    f"{stat!r}; got stats={got!r}; capture again with stats including {stat!r} or leave out "
                    f"kind {kind!r}")


# ---------------------------------------------------------------------------- histograms
def _histograms(run: Run, out: str) -> list[str]:
    _, Figure, colors, cm = _mpl()
    from matplotlib.ticker import MaxNLocator

    names, quants = [], []
    for name in _sites_with(run, "histogram"):
        s = run[name]
        q = np.asarray(s.quantile(RANGE_QUANTILES), dtype=np.float64)
        if np.all(np.isfinite(q)):
            names.append(name)
            quants.append(q)
    if not names:
        raise _missing("histograms", "histogram", run)
    half = float(np.max(np.abs(quants)))
    half = half * 1.05 if half > 0 else 1.0
    labels, axis_label = _labels(run.sites)
    index = {n: i for i, n in enumerate(run.sites)}
    curves = []
    for name, q in zip(names, quants):
        s = run[name]
        total = float(s.histogram_counts.sum())
        # each panel of the grid gets its own symmetric range; the overlay shares one
        own = float(np.max(np.abs(q))) * 1.05 or 1.0
        c_own, e_own = s.histogram(bins=HIST_BINS, range=(-own, own))
        c_all, e_all = s.histogram(bins=HIST_BINS, range=(-half, half))
        curves.append((name, total, c_own, e_own, c_all, e_all))

    # grid: one small panel per site, its own x range, log y
    n = len(curves)
    cols = min(n, max(1, math.ceil(math.sqrt(n * 1.6))))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(1.9 * cols, 1.45 * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, (name, total, c, e, _, _) in zip(axes, curves):
        dens = c / max(total, 1.0) / np.diff(e)
        ax.stairs(np.where(c >= 0.5, dens, 0.0), e, fill=True, color="#3b6ea5", alpha=0.85)
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.5 / max(total, 1.0) / float(e[1] - e[0]))
        s = run[name]
        ax.set_title(f"{labels[index[name]]}: σ={s.std:.3g} κ={s.kurtosis:.3g}", fontsize=7, pad=2)
        ax.tick_params(labelsize=6, pad=1)
        ax.set_xlim(e[0], e[-1])
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4, symmetric=True))
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.supxlabel(f"activation value (each panel: its own symmetric range ± max(|q{RANGE_QUANTILES[0]:g}|, "
                  f"|q{RANGE_QUANTILES[1]:g}|); {HIST_BINS} linear bins)", fontsize=9)
    fig.supylabel("density (log scale)", fontsize=9)
    fig.suptitle(f"Per-site histograms — panel title: {axis_label.split(' (')[0]}: σ = std, κ = excess kurtosis "
                 f"— {_title(run)}", fontsize=10)
    paths = [_save(fig, os.path.join(out, "hist_grid.png"))]

    # overlay: every site on one shared symmetric range, coloured by depth
    fig = Figure(figsize=(8.5, 4.8), layout="constrained")
    ax = fig.subplots()
    norm = _depth_colorbar(fig, ax, cm, colors, run.sites, axis_label)
    cmap = _cmap(CMAP_DEPTH)
    floor = np.inf
    for name, total, _, _, c, e in curves:
        width = np.diff(e)
        dens = c / max(total, 1.0) / width
        # bins holding less than half a value are spread-out bucket mass, not data: leave gaps
        dens = np.where(c >= 0.5, dens, np.nan)
        floor = min(floor, 0.5 / max(total, 1.0) / float(width[0]))
        ax.plot((e[:-1] + e[1:]) / 2, dens, color=cmap(norm(index[name])), lw=0.9, alpha=0.8)
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    ax.set_xlim(-half, half)
    ax.set_xlabel(f"activation value (range ± max over sites of |q{RANGE_QUANTILES[0]:g}|, "
                  f"|q{RANGE_QUANTILES[1]:g}|; {HIST_BINS} linear bins)", fontsize=9)
    ax.set_ylabel("density (log scale)", fontsize=9)
    ax.set_title(f"Activation histograms by depth — {_title(run)}", fontsize=10)
    ax.grid(alpha=0.25, lw=0.5)
    paths.append(_save(fig, os.path.join(out, "hist_overlay.png")))
    return paths


# --------------------------------------------------------------------------------- cross
def _cross(run: Run, out: str) -> list[str]:
    _, Figure, colors, cm = _mpl()
    cross = run.cross
    if cross.cov.size == 0 or not (cross.n > 0 or cross.n_all > 0):
        raise _missing("cross", "cross", run)
    labels, axis_label = _labels(cross.sites)
    skip = run.meta.get("skip_first", 0)
    kept = f"kept tokens (first {skip} of each sequence excluded)" if skip else "kept tokens (skip_first=0)"
    panels = [(kept, cross.cov, cross.r2, cross.n), ("all real tokens", cross.cov_all, cross.r2_all, cross.n_all)]
    # with nothing skipped both halves are the same matrix: draw it once
    panels = [p for p in panels if p[3] > 0] if cross.n != cross.n_all else panels[1:]
    noun = "Layer" if axis_label.startswith("layer") else "Site"
    size = max(3.6, min(6.5, 0.16 * len(labels) + 1.2))
    fs = 6 if len(labels) > 24 else 7

    def grid(values, norm, cmap, label, title, name, signed=False):
        fig = Figure(figsize=(size * len(panels) + 1.2, size + 0.5), layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)).ravel()
        im = None
        for ax, (what, v) in zip(axes, values):
            im = ax.imshow(np.ma.masked_invalid(np.abs(v) if signed else v), norm=norm, cmap=cmap,
                           interpolation="nearest")
            if signed:
                yy, xx = np.nonzero(np.nan_to_num(v) < 0)
                ax.scatter(xx, yy, marker="_", s=12 if len(labels) <= 40 else 4, color="white", lw=0.9)
            ax.set_title(what, fontsize=9)
            _index_ticks(ax.xaxis, labels, fontsize=fs)
            _index_ticks(ax.yaxis, labels, fontsize=fs)
            ax.tick_params(axis="x", labelrotation=90)
            ax.set_xlabel(axis_label, fontsize=8)
            ax.set_ylabel(axis_label, fontsize=8)
        bar = fig.colorbar(im, ax=list(axes), shrink=0.85, pad=0.02)
        bar.set_label(label, fontsize=8)
        bar.ax.tick_params(labelsize=7)
        fig.suptitle(f"{title} — {_title(run)}", fontsize=10)
        return _save(fig, os.path.join(out, name))

    # Covariances run from ~1e-4 (embeddings) to ~1e4 (massive-activation layers): the colour is
    # log10 |cov| on one norm shared by both panels, and the few negative entries (all tiny in
    # practice) are marked rather than given half of a diverging colormap.
    mags = np.concatenate([np.abs(p[1][np.isfinite(p[1])]).ravel() for p in panels])
    mags = mags[mags > 0]
    top = float(mags.max()) if mags.size else 1.0
    low = max(float(np.percentile(mags, 1)) if mags.size else top * 1e-6, top * 1e-12)
    norm = colors.LogNorm(vmin=low, vmax=top)
    paths = [grid([(p[0], p[1]) for p in panels], norm, _cmap("viridis"),
                  "|covariance| (log scale; white dash = negative entry)",
                  f"{noun} × {noun.lower()} covariance (population, per channel-token observation)", "cross_cov.png",
                  signed=True)]
    paths.append(grid([(p[0], p[2]) for p in panels], colors.Normalize(0, 1), _cmap("magma"),
                      "R² (squared Pearson correlation, linear 0–1)", f"{noun} × {noun.lower()} R²",
                      "cross_r2.png"))
    return paths


# ------------------------------------------------------------------------------- scatter
def _pick(names: Sequence[str], k: int = 3) -> list[str]:
    """First, middle and last (``k`` evenly spaced) of ``names``."""
    if len(names) <= k:
        return list(names)
    idx = sorted({round(i * (len(names) - 1) / (k - 1)) for i in range(k)})
    return [names[i] for i in idx]


def _scatter(run: Run, out: str) -> list[str]:
    _, Figure, colors, cm = _mpl()
    found = {}
    for name in _sites_with(run, "sample"):
        sm = run[name].sample
        keep = sm.position > 0  # the first token's values are extreme (attention sink); see positions.png
        if keep.any():
            found[name] = (sm.position[keep], sm.channel[keep], sm.value[keep])
    if not found:
        raise _missing("scatter", "sample", run)
    chosen = _pick(list(found))
    # plus the most heavy-tailed site (largest max|x| / std in the sample), where outlier
    # channels and massive activations show best, when first/middle/last missed it
    ratio = {n: np.max(np.abs(v[2])) / (np.std(v[2]) or 1.0) for n, v in found.items()}
    heavy = max(ratio, key=ratio.get)
    if heavy not in chosen:
        chosen = sorted(chosen + [heavy], key=run.sites.index)
    labels, axis_label = _labels(run.sites)
    what = axis_label.split(" (")[0]
    index = {n: i for i, n in enumerate(run.sites)}
    paths = []
    for x_name, col, xlabel, file in (("position", 0, "token position", "scatter_position.png"),
                                      ("channel", 1, "channel", "scatter_channel.png")):
        fig = Figure(figsize=(3.7 * len(chosen), 3.7), layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(chosen), squeeze=False)).ravel()
        for ax, name in zip(axes, chosen):
            values = found[name][2]
            # symlog y: linear within ±lin (a power of ten near the std) so the bulk keeps its
            # shape, logarithmic beyond so the rare huge values fit on the same axes
            std = float(np.std(values)) or 1.0
            lin = float(10 ** np.round(np.log10(std)))
            ax.scatter(found[name][col], values, s=1.5, alpha=0.3, color="#1f4e79", linewidths=0, rasterized=True)
            ax.set_yscale("symlog", linthresh=lin, linscale=1.0)
            ax.axhspan(-lin, lin, color="0.92", zorder=0, lw=0)
            tag = " (heaviest tail)" if name == heavy and name not in _pick(list(found)) else ""
            ax.set_title(f"{what} {labels[index[name]]}{tag}: {len(values):,} values", fontsize=9)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.25, lw=0.5)
        axes[0].set_ylabel("activation value (symlog; shaded band linear)", fontsize=8)
        fig.suptitle(f"Uniform sample of kept values vs {x_name}, position 0 excluded — {_title(run)}", fontsize=10)
        paths.append(_save(fig, os.path.join(out, file)))
    return paths


# ------------------------------------------------------------------------------ channels
def _channels(run: Run, out: str) -> list[str]:
    _, Figure, colors, cm = _mpl()
    names = [n for n in _sites_with(run, "moments") if run[n].count]
    if not names:
        raise _missing("channels", "moments", run)
    width = max(len(run[n].channel) for n in names)
    grid = np.full((len(run.sites), width), np.nan)
    index = {n: i for i, n in enumerate(run.sites)}
    for n in names:
        a = run[n].channel.absmax
        grid[index[n], :len(a)] = a
    pos = grid[np.isfinite(grid) & (grid > 0)]
    if pos.size == 0:
        raise _missing("channels", "moments", run)
    # a log colour scale: typical channels sit near 1, outlier channels 100-1000x above
    top = float(pos.max())
    low = max(float(np.percentile(pos, 1)), top * 1e-6)
    labels, axis_label = _labels(run.sites)
    fig = Figure(figsize=(11, max(3.2, 0.17 * len(run.sites) + 1.4)), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(np.ma.masked_invalid(np.where(grid > 0, grid, np.nan)), aspect="auto",
                   interpolation="nearest", cmap=_cmap("magma"), norm=colors.LogNorm(vmin=low, vmax=top))
    _index_ticks(ax.yaxis, labels, fontsize=6 if len(labels) > 24 else 7)
    ax.set_ylabel(axis_label, fontsize=8)
    ax.set_xlabel("channel", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    bar = fig.colorbar(im, ax=ax, pad=0.01)
    bar.set_label("max |activation| over kept tokens (log scale)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    ax.set_title(f"Per-channel absmax — {_title(run)}", fontsize=10)
    return [_save(fig, os.path.join(out, "channels_absmax.png"))]


# ----------------------------------------------------------------------------- positions
def _positions(run: Run, out: str) -> list[str]:
    _, Figure, colors, cm = _mpl()
    from matplotlib.ticker import FuncFormatter

    views = []
    for name in _sites_with(run, "position"):
        p = run[name].position
        if len(p):
            views.append((name, p))
    if not views:
        raise _missing("positions", "position", run)
    _, axis_label = _labels(run.sites)
    index = {n: i for i, n in enumerate(run.sites)}
    cmap = _cmap(CMAP_DEPTH)
    fig = Figure(figsize=(12, 6.2), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True, height_ratios=(4, 1))
    norm = _depth_colorbar(fig, list(axes.ravel()), cm, colors, run.sites, axis_label)
    longest = max(len(p) for _, p in views)
    for name, p in views:
        x = np.arange(len(p))
        c = cmap(norm(index[name]))
        axes[0, 0].plot(x, np.where(p.absmax > 0, p.absmax, np.nan), color=c, lw=0.9)
        axes[0, 1].plot(x, np.where(p.std > 0, p.std, np.nan), color=c, lw=0.9)
    # every site sees the same tokens: one count says how noisy each position's numbers are
    tokens = views[0][1].tokens
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for j, what in enumerate(("max |activation|", "std over channels and tokens")):
        ax, low = axes[0, j], axes[1, j]
        ax.set_yscale("log")
        ax.set_title(f"{what} per position", fontsize=9)
        ax.set_ylabel(f"{what} (log)", fontsize=8)
        ax.grid(alpha=0.25, lw=0.5)
        ax.tick_params(labelsize=7)
        low.stairs(tokens, np.arange(len(tokens) + 1) - 0.5, fill=True, color="0.6")
        low.set_ylim(bottom=0)
        low.set_ylabel("real tokens", fontsize=8)
        low.tick_params(labelsize=7)
        low.grid(alpha=0.25, lw=0.5)
        # symlog x: position 0 (the first-token effect) and the first few positions get room of
        # their own, and a 4096-token context still fits
        low.set_xscale("symlog", linthresh=1, linscale=0.4)
        low.set_xlim(-0.5, max(longest, 2))
        low.xaxis.set_major_formatter(plain)
        low.set_xlabel("token position (log scale past 1)", fontsize=8)
    fig.suptitle(f"Per-position profile over every real token (skip_first does not apply) — {_title(run)}",
                 fontsize=10)
    return [_save(fig, os.path.join(out, "positions.png"))]


# --------------------------------------------------------------------------------- steps
def _steps(run: Run, out: str) -> list[str]:
    _, Figure, colors, cm = _mpl()
    names = _sites_with(run, "moments")
    if not names:
        raise _missing("steps", "moments", run)
    # one Run per stored row rather than run.at(step): step labels need not be unique or sorted,
    # and a window that saw no token (e.g. committed at exit right after a snapshot) is left out
    windows = []
    for row in run.rows:
        window = Run(run.meta, [row], run.path)
        if any(window[n].tokens for n in names):
            windows.append((int(row["step"]), window))
    windows.sort(key=lambda w: w[0])
    if len(windows) < 2:
        raise _Missing(f"plot kind 'steps' needs two or more windows with tokens; expected run.steps with 2+ "
                       f"entries; got {run.steps}; call run.snapshot(step) inside the capture block, or leave out "
                       "kind 'steps'")
    steps = [w[0] for w in windows]
    table = {n: np.full((3, len(steps)), np.nan) for n in names}
    for j, (_, window) in enumerate(windows):
        for n in names:
            s = window[n]
            table[n][:, j] = (s.std, s.absmax, s.kurtosis)
    _, axis_label = _labels(run.sites)
    index = {n: i for i, n in enumerate(run.sites)}
    cmap = _cmap(CMAP_DEPTH)
    fig = Figure(figsize=(13, 4.2), layout="constrained")
    axes = fig.subplots(1, 3)
    norm = _depth_colorbar(fig, list(axes), cm, colors, run.sites, axis_label)
    marker = "o" if len(steps) <= 30 else None
    for n in names:
        c = cmap(norm(index[n]))
        for k, ax in enumerate(axes):
            ax.plot(steps, table[n][k], color=c, lw=1, marker=marker, ms=2.5, alpha=0.85)
    for ax, what, scale in zip(axes, ("std", "max |activation|", "excess kurtosis"), ("log", "log", "symlog")):
        if scale == "symlog":
            ax.set_yscale("symlog", linthresh=1.0)
        else:
            ax.set_yscale("log")
        ax.set_title(what, fontsize=9)
        ax.set_ylabel(f"{what} ({scale})", fontsize=8)
        ax.set_xlabel("step (window label)", fontsize=8)
        ax.grid(alpha=0.25, lw=0.5)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"Per-window statistics over {len(steps)} windows — {_title(run)}", fontsize=10)
    return [_save(fig, os.path.join(out, "steps.png"))]


def _as_run(run: Any) -> Run:
    """A :class:`Run`, also from a finished ``probe.capture(...)`` (its ``.result``)."""
    if isinstance(run, Run):
        return run
    result = getattr(run, "result", None)
    if isinstance(result, Run):
        return result
    if hasattr(run, "result"):
        raise ProbeError("the capture has no results yet; expected an exited capture; "
                         "plot after the with-block, or call run.snapshot() and plot probe.load(out)")
    raise ProbeError(f"run must be a probe Run; got {type(run).__name__}; pass probe.load('run.h5')")


_DRAW = {"histograms": _histograms, "cross": _cross, "scatter": _scatter, "channels": _channels,
         "positions": _positions, "steps": _steps}


# ---------------------------------------------------------------------------------- public
def plot_run(run: Run, out_dir: str | os.PathLike, kinds: Sequence[Kind] | Kind | None = None) -> list[str]:
    """Draw a run's figures as PNG files in ``out_dir`` (created if missing).

    Args:
        run: a :class:`probe.run.Run` (``probe.load(path)``, or a capture after its block).
        out_dir: folder for the PNG files; existing files of the same name are replaced.
        kinds: names from :data:`KINDS`; ``None`` draws every kind the run has data for and
            silently skips the rest (a run captured with ``stats=("moments",)`` gets
            ``channels_absmax.png`` only).

    Returns:
        The paths written, in the order of :data:`KINDS`.

    Raises:
        ProbeError: an unknown kind; a kind asked for by name whose statistics the run lacks
            (``"steps"`` also needs two or more windows); matplotlib missing.

    Example:
        >>> import probe
        >>> from probe.plot import plot_run
        >>> plot_run(probe.load("run.h5"), "figures", kinds=["histograms"])  # doctest: +SKIP
        ['figures/hist_grid.png', 'figures/hist_overlay.png']
    """
    run = _as_run(run)
    if isinstance(kinds, str):
        kinds = [kinds]
    asked = kinds is not None
    chosen = list(KINDS) if kinds is None else list(dict.fromkeys(kinds))
    unknown = [k for k in chosen if k not in KINDS]
    if unknown:
        raise ProbeError(f"unknown plot kind {unknown[0]!r}; expected one of {', '.join(KINDS)}; "
                         f"pass e.g. kinds=['histograms', 'cross'] (probe plot --kind histograms)")
    if asked and not chosen:
        raise ProbeError(f"no plot kinds given; expected one or more of {', '.join(KINDS)}; "
                         "pass kinds=None to draw everything")
    _mpl()  # fail on a missing matplotlib before creating the folder
    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    paths: list[str] = []
    for kind in KINDS:
        if kind not in chosen:
            continue
        try:
            paths += _DRAW[kind](run, out)
        except _Missing:
            if asked:
                raise
    return paths


def plot_diff(a: Run, b: Run, path: str | os.PathLike) -> str:
    """Draw the per-site shift from run ``a`` to run ``b`` (see :func:`probe.report.diff`) to ``path``.

    Up to three panels, one bar per site present in both runs: the std ratio ``std_b / std_a``
    (log scale, 1 = unchanged); the Jensen–Shannon divergence between the two bucket histograms
    (bits, 0 = identical, 1 = disjoint; needs histograms in both); and the shift of the q0.001,
    q0.5 and q0.999 quantiles in units of ``std_a``, so that layers of very different scale share
    one axis.

    Args:
        a, b: the runs to compare; ``a`` is the reference.
        path: the PNG file to write; its folder is created if missing.

    Returns:
        ``path`` as a string.

    Raises:
        ProbeError: the runs share no site; matplotlib missing.

    Example:
        >>> import probe
        >>> from probe.plot import plot_diff
        >>> plot_diff(probe.load("fp32.h5"), probe.load("bf16.h5"), "diff.png")  # doctest: +SKIP
        'diff.png'
    """
    from .report import diff

    _, Figure, colors, cm = _mpl()
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    a, b = _as_run(a), _as_run(b)
    with np.errstate(all="ignore"):  # report._js evaluates log2(0) in the branch np.where discards
        rows = diff(a, b)
    if not rows:
        raise ProbeError(f"runs share no site; expected common site names; got {a.sites[:3]} and "
                         f"{b.sites[:3]}; compare runs captured with the same sites=")
    names = [r["site"] for r in rows]
    labels, axis_label = _labels(names)
    x = np.arange(len(rows))

    def col(key: str) -> np.ndarray:
        return np.array([np.nan if r.get(key) is None else float(r[key]) for r in rows])

    ratio, js = col("std_ratio"), col("js")
    std_a = np.array([a[n].std for n in names], dtype=np.float64)
    qs = ("0.001", "0.5", "0.999")
    shift = {q: np.array([np.nan if (r.get("quantile_shift") or {}).get(q) is None else r["quantile_shift"][q]
                          for r in rows], dtype=np.float64) for q in qs}
    with np.errstate(all="ignore"):
        shift = {q: np.where(std_a > 0, v / std_a, np.nan) for q, v in shift.items()}
    panels = ["ratio"] + (["js"] if np.isfinite(js).any() else []) + \
             (["quantiles"] if any(np.isfinite(v).any() for v in shift.values()) else [])
    fig = Figure(figsize=(max(8.0, 0.26 * len(rows) + 3), 2.3 * len(panels) + 0.9), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(panels), 1, sharex=True, squeeze=False)).ravel()
    for ax, panel in zip(axes, panels):
        if panel == "ratio":
            good = np.isfinite(ratio) & (ratio > 0)
            logr = np.log10(ratio[good])
            ax.bar(x[good], logr, color=np.where(logr >= 0, "#c44e52", "#4c72b0"))
            ax.axhline(0, color="0.3", lw=0.8)
            # bars are log10(ratio), so up and down are symmetric; ticks read as the change itself
            small = logr.size == 0 or float(np.max(np.abs(logr))) < np.log10(2)
            fmt = (lambda t, _: f"{(10 ** t - 1) * 100:+.2g} %") if small else (lambda t, _: f"×{10 ** t:.3g}")
            ax.yaxis.set_major_locator(MaxNLocator(nbins=6, symmetric=True))
            ax.yaxis.set_major_formatter(FuncFormatter(fmt))
            ax.set_ylabel("std_b / std_a\n(log scale)", fontsize=8)
            ax.set_title("std ratio (red: b wider, blue: b narrower)", fontsize=9)
        elif panel == "js":
            ax.bar(x, np.nan_to_num(js), color="#55a868")
            ax.set_ylim(bottom=0)
            ax.set_ylabel("JS divergence\n(bits)", fontsize=8)
            ax.set_title("Jensen–Shannon divergence of the value histograms (0 = identical, 1 = disjoint)",
                         fontsize=9)
        else:
            width = 0.28
            for k, (q, c) in enumerate(zip(qs, ("#4c72b0", "0.45", "#c44e52"))):
                ax.bar(x + (k - 1) * width, shift[q], width=width, color=c, label=f"q{q}")
            ax.axhline(0, color="0.3", lw=0.8)
            ax.legend(fontsize=7, ncol=3, loc="best")
            ax.set_ylabel("(q_b − q_a) / std_a", fontsize=8)
            ax.set_title("quantile shift in units of run a's std", fontsize=9)
        ax.grid(axis="y", alpha=0.25, lw=0.5)
        ax.tick_params(labelsize=7)
    _index_ticks(axes[-1].xaxis, labels, most=48, fontsize=7)
    axes[-1].set_xlabel(axis_label, fontsize=8)
    axes[-1].set_xlim(-0.6, len(rows) - 0.4)
    fig.suptitle(f"Shift from a = {a.path or 'run a'} to b = {b.path or 'run b'}", fontsize=10)
    path = os.fspath(path)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    return _save(fig, path)
