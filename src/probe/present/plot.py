"""Figures of a run as PNG, PDF or SVG files: ``probe plot run.h5`` and ``probe diff a.h5 b.h5 --plot d.png``.

Recipe::

    import probe
    from probe.present.plot import plot_run, plot_diff
    run = probe.load("run.h5")
    plot_run(run, "figures")                      # every figure the run has data for
    plot_run(run, "figures", kinds=["cross"])     # just cross_cov.png and cross_r2.png
    plot_diff(probe.load("a.h5"), probe.load("b.h5"), "diff.png")

One kind, one or two files (and the statistics it needs):

- ``histograms``: ``hist_grid.png`` (every site), ``hist_overlay.png`` (chosen sites)
  (``histogram``, ``moments``)
- ``depth``: ``depth.png``, width by depth: quantile bands q0.001..q0.999, exact min and max,
  std and excess kurtosis per site (``histogram``, ``moments``)
- ``cross``: ``cross_cov.png``, ``cross_r2.png`` (``cross``)
- ``scatter``: ``scatter_position.png``, ``scatter_channel.png`` (``sample``)
- ``channels``: ``channels_absmax.png`` (``moments``)
- ``positions``: ``positions.png`` (``position``)
- ``steps``: ``steps.png`` (``moments``, and two or more windows: ``run.snapshot()``)

Activations span decades (a residual stream with massive activations has most values within ±10
and a few near 10**4), so value axes use the ``asinh`` scale: linear within ± a width (the
smallest std drawn), logarithmic beyond, smooth in between (no band where a symlog axis would
switch). No value is ever off an axis: histogram axes run from the exact min to the exact max
(red triangles mark them), their bins are of equal width on the axis and total the count, and
scatter axes hold every sampled value and the exact top-k the run stores (circles: a uniform
sample all but never holds a one-in-a-million massive activation). Histograms draw a density
per unit of x (each curve integrates to 1), never a share per bin: asinh bins widen with
``|x|``, and a share per bin would draw a unimodal distribution as two humps. Colour scales
clip nothing, or their colour bar carries an arrow where they do. ``linear=True`` draws the
histograms on a linear axis instead; ``format=`` (png, pdf, svg), ``dpi=`` and ``size=``
(``column``, ``page``, ``slide``) size the files for a paper or a talk: at a column's width panels
stack, grids take fewer columns and legends go below the data, and at every size tick labels that
would overlap are thinned (:func:`_declutter`). On the asinh axis a wide site's density, spread over
a logarithmic x, reads as a plateau; ``hist_overlay`` says so under its axis (:data:`ASINH_NOTE`)
(at a column's width, as the file's caption instead: ``plot_run(..., caption=)``, printed by
``probe plot --size column``) rather than adding a linear panel, which at a column's width could
show neither the peak nor the tails the figure exists for (``linear=True`` draws that view whole). Figures are drawn on a bare
:class:`matplotlib.figure.Figure`, never through ``pyplot``: nothing global changes (a notebook
keeps its backend) and no display is needed. matplotlib is optional
(``pip install "probe[plot]"``) and imported only when drawing; :func:`figures` returns the
figures without writing them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..errors import ProbeError
from .report import hidden_state_stack

if TYPE_CHECKING:
    from ..results.run import Run

__all__ = ["KINDS", "FORMATS", "SIZES", "plot_run", "plot_diff", "figures", "parse_layers", "png_bytes"]

Kind = Literal["histograms", "depth", "cross", "scatter", "channels", "positions", "steps", "timeline", "experts"]

#: every figure kind, in the order :func:`plot_run` draws them
KINDS: tuple[str, ...] = ("histograms", "depth", "cross", "scatter", "channels", "positions", "steps", "timeline",
                          "experts")

DPI = 110
#: the default dpi at the print sizes (``column``, ``page``, ``slide``): PNGs and the rasterised parts
#: of PDF/SVG (scatter clouds, heat maps) at the resolution print asks for
PRINT_DPI = 300
#: what the asinh axis does to a density, printed under the overlay and in the report's caption
ASINH_NOTE = ("Reading note: past ±{width} the axis is logarithmic, so it squeezes wide x ranges; a density "
              "that falls slowly there draws as a plateau. The heights are true; the shape near the peak "
              "reads best with --linear.")
HIST_BINS = 201  # bins per histogram panel, equal width on the panel's asinh axis
CMAP_DEPTH = "viridis"
#: how many sites ``positions.png`` draws when ``layers`` chooses none (plus the heaviest-tailed)
POSITION_LINES = 6


class _Missing(ProbeError):
    """A figure whose statistics the run lacks: skipped unless the kind was asked for by name."""


Format = Literal["png", "pdf", "svg"]
Size = Literal["screen", "column", "page", "slide"]

#: the output formats :func:`plot_run` writes
FORMATS: tuple[str, ...] = ("png", "pdf", "svg")
#: figure widths in inches: a paper's single column (3.5 in, 89 mm), a full page width (7 in),
#: a 16:9 slide (13.33 in); ``screen`` keeps each figure's own size
SIZES: dict[str, float | None] = {"screen": None, "column": 3.5, "page": 7.0, "slide": 13.33}
#: a target width (inches) at or below which figures take their narrow layout (:attr:`_Out.narrow`)
NARROW = 5.0
#: the width (inches) a narrow figure is drawn at before :func:`_resize` brings it to the column:
#: text then shrinks to about 80 %, not to the 55 % a full-width design would need
NARROW_DESIGN = 5.5


class _Out:
    """Where drawn figures go: files in ``folder`` (``fmt``, ``dpi``, resized to ``size``), and/or
    kept by name (``keep=True``)."""

    def __init__(self, folder: str | None, keep: bool = False, fmt: str = "png", dpi: int = 0,
                 size: str = "screen") -> None:
        self.folder = folder
        self.kept: dict[str, Any] | None = {} if keep else None
        self.fmt, self.dpi, self.size = fmt, dpi or DPI, size
        self.caption: Callable[[str, str], None] | None = None
        #: reading notes go to ``fig.probe_caption`` rather than into the figure (a column's width,
        #: or a report whose captions carry them)
        self.notes_apart = False
        #: each figure's title drawn on it; ``False`` (``titles=False``, ``probe plot --no-title``):
        #: left out, its text the first sentence of ``fig.probe_caption``
        self.titles = True

    @property
    def narrow(self) -> bool:
        """Whether the figures are for a paper column (:data:`NARROW` inches or less): panels then
        stack, grids take fewer columns and legends go below the data."""
        width = SIZES.get(self.size)
        return width is not None and width <= NARROW

    def cols(self, ideal: int, panel: float) -> int:
        """Grid columns: ``ideal``, or fewer, so that each panel keeps at least ``panel`` inches
        of the target width (:data:`SIZES`)."""
        width = SIZES.get(self.size)
        if width is None:
            return ideal
        return max(1, min(ideal, int(width // panel)))

    def chars(self, design: float, points: float) -> int:
        """How many characters of ``points``-sized text fit across a figure drawn ``design`` inches
        wide, once :func:`_resize` has brought it (and its text) to the target width."""
        width = SIZES.get(self.size) or design
        ratio = min(1.0, width / design)
        shrink = max(0.55, math.sqrt(ratio)) if ratio < 1 else 1.0
        return max(20, int(0.9 * width * 72 / (0.55 * _shrunk(points, shrink))))

    def save(self, fig, name: str) -> str:
        sup = getattr(fig, "_suptitle", None)
        if not self.titles and sup is not None and sup.get_text():  # a paper's caption carries it instead
            # a title's lines are sentences of the caption: "Histogram per site — M. panel: …"
            lines = [" ".join(line.split()) for line in sup.get_text().split("\n") if line.strip()]
            _note(fig, " ".join(ln if ln[-1] in ".!?:;" or i == len(lines) - 1 else ln + "."
                                for i, ln in enumerate(lines)), first=True)
            sup.remove()
            fig._suptitle = None
        _resize(fig, self.size)
        _declutter(fig)
        _label_ends(fig)
        # the labels added at the ends widen an axis' tick labels, which narrows its neighbours'
        # axes (a grid's x axes) and brings their labels closer: thin and end once more
        _declutter(fig)
        _label_ends(fig)
        for _ in range(3):  # narrower axes: thin and end their ticks again, until nothing moves
            if SIZES.get(self.size) is None or not _fit(fig):
                break
            _declutter(fig)
            _label_ends(fig)
        if self.kept is not None:
            self.kept[name] = fig
        if self.folder is None:
            return name
        stem = os.path.splitext(name)[0]
        path = _save(fig, os.path.join(self.folder, f"{stem}.{self.fmt}"), self.fmt, self.dpi,
                     fixed=SIZES.get(self.size) is not None)
        if getattr(fig, "probe_caption", None) and self.caption is not None:
            self.caption(path, fig.probe_caption)
        return path


def _note(fig, text: str, first: bool = False) -> None:
    """Add ``text`` to the figure's caption (``fig.probe_caption``): what the figure leaves out of
    its title and axes, such as the tool's options that choose what it shows, printed by
    ``probe plot`` beside the file's path. ``first``: put it before what is there (a title)."""
    text = text.strip()
    if not text:
        return
    if text[-1] not in ".!?":
        text += "."
    old = getattr(fig, "probe_caption", None) or ""
    fig.probe_caption = " ".join(p for p in ((text, old) if first else (old, text)) if p)


def _fit(fig, rounds: int = 3) -> bool:
    """Bring whatever overhangs the figure's edges (an end tick label centred on an axis' end)
    inside, by narrowing the rectangle constrained layout fills: a print size is saved at exactly
    its own size, so an overhang would be cut off. Returns whether it moved anything."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    engine = fig.get_layout_engine()
    if engine is None or not hasattr(engine, "set"):
        return False
    moved = False
    renderer = FigureCanvasAgg(fig).get_renderer()
    w, h = fig.get_size_inches()
    x0, y0, x1, y1 = 0.0, 0.0, 1.0, 1.0
    for _ in range(rounds):
        fig.draw_without_rendering()
        box = fig.get_tightbbox(renderer)
        over = (max(0.0, -box.x0) / w, max(0.0, -box.y0) / h, max(0.0, box.x1 - w) / w, max(0.0, box.y1 - h) / h)
        if max(over) <= 1e-3:
            return moved
        moved = True
        pad = 0.02 / w  # inches clear of the edge
        x0, y0 = x0 + over[0] + (pad if over[0] else 0), y0 + over[1] + (pad if over[1] else 0)
        x1, y1 = x1 - over[2] - (pad if over[2] else 0), y1 - over[3] - (pad if over[3] else 0)
        engine.set(rect=(x0, y0, x1 - x0, y1 - y0))
    return moved


def _resize(fig, size: str) -> None:
    """Scale ``fig`` to the width of ``size`` (:data:`SIZES`), keeping its aspect ratio. Text
    shrinks with the square root of the scale (never below 55 %, never grown, never below
    :data:`MIN_POINTS`), so a figure made narrower keeps room for its data while its labels stay
    legible in print."""
    width = SIZES.get(size)
    if width is None:
        return

    w, h = fig.get_size_inches()
    ratio = width / w
    if ratio < 1:
        shrink = max(0.55, math.sqrt(ratio))
        # tick labels are remade on demand from the axis' tick setting: set it, after the texts
        ticks = [(ax, which, axis.get_major_ticks()[0].label1.get_fontsize())
                 for ax in fig.axes for axis, which in ((ax.xaxis, "x"), (ax.yaxis, "y")) if axis.get_major_ticks()]
        import textwrap

        for text in _texts(fig):
            text.set_fontsize(_shrunk(text.get_fontsize(), shrink))
            # a label written for the wide figure is wrapped to the narrow one's width
            span = h * ratio if text.get_rotation() in (90.0, 270.0) else width
            room = int(0.9 * span * 72 / (0.55 * text.get_fontsize()))
            if len(text.get_text()) > room and "\n" not in text.get_text():
                text.set_text(textwrap.fill(text.get_text(), room))
        for ax, which, points in ticks:
            ax.tick_params(axis=which, which="both", labelsize=_shrunk(points, shrink))
            ax.tick_params(axis=which, which="major", length=3.5 * shrink, width=0.8 * shrink)
            ax.tick_params(axis=which, which="minor", length=2.0 * shrink, width=0.6 * shrink)
        for line in _lines(fig):
            line.set_markersize(line.get_markersize() * shrink)
            line.set_linewidth(line.get_linewidth() * shrink)
    fig.set_size_inches(width, h * ratio)
    _plain_decades(fig)


def _plain_decades(fig) -> None:
    """Write the decades of log axes whose labels would be set below :data:`MIN_POINTS` as
    ``1e-3`` rather than ``10^-3``: mathtext sets a superscript at 70 % of the label's size
    (``matplotlib._mathtext.SHRINK_FACTOR``), so a 6 pt tick label would carry a 4.2 pt exponent."""
    from matplotlib.ticker import LogFormatterMathtext

    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            ticks = axis.get_major_ticks()
            if not ticks or ticks[0].label1.get_fontsize() * SUPERSCRIPT >= MIN_POINTS:
                continue
            for old, put in ((axis.get_major_formatter(), axis.set_major_formatter),
                             (axis.get_minor_formatter(), axis.set_minor_formatter)):  # minor: 2×10^-2 …
                if isinstance(old, LogFormatterMathtext):
                    put(_PlainLog(base=getattr(old, "_base", 10.0), labelOnlyBase=old.labelOnlyBase,
                                  minor_thresholds=old.minor_thresholds, linthresh=getattr(old, "_linthresh", None)))
                    axis.probe_plain = True  # :class:`_EndFormatter` writes its added ends the same way


#: the size of a mathtext superscript relative to its text (``matplotlib._mathtext.SHRINK_FACTOR``)
SUPERSCRIPT = 0.7


def _plain(x: float) -> str:
    """``x`` (two significant digits) without a superscript: ``0.01``, ``100``, ``3e-10``."""
    if x == 0:
        return "0"
    e = math.floor(math.log10(abs(x)))
    m = float(f"{x / 10.0**e:.2g}")
    return _number(float(f"{x:.2g}")) if -2 <= e <= 2 else f"{m:g}e{e}"


def _log_formatter():
    from matplotlib.ticker import LogFormatter

    class PlainLog(LogFormatter):
        """A log axis' labels (decades, as its default formatter labels them) with no superscript."""

        def _num_to_string(self, x, vmin, vmax):
            return _plain(x)

        def __call__(self, x, pos=None):
            # LogFormatter labels abs(x): on a symlog axis -0.3 would read 0.3
            text = super().__call__(x, pos)
            text = text.replace("\N{MINUS SIGN}", "-")  # as every other probe label writes it
            return "-" + text if x < 0 and text and text != "0" else text

    return PlainLog


def _PlainLog(**kw):
    return _log_formatter()(**kw)


#: the tallest (inches) a printed figure is made: a page's text height, about 9 in, less a caption's lines
PAGE_HEIGHT = 8.5

#: the smallest text (points) :func:`_resize` makes: print stays legible without a loupe
MIN_POINTS = 6.0

#: the tallest (inches) a column-wide histogram grid is made: a column's height less room for its caption
COLUMN_HEIGHT = 6.5


def _short(v: float, digits: int = 3) -> str:
    """A statistic in a panel title, in few characters: ``6.6``, ``327``, ``6.9e3``; below 1 in
    ``digits`` significant digits (``0.0064`` at 2)."""
    if not np.isfinite(v):
        return str(v)
    text = f"{v:.{digits if abs(v) < 1 else 3}g}"
    if "e" not in text:
        return text
    m, e = f"{v:.1e}".split("e")
    return f"{m}e{int(e)}"


def _shrunk(points: float, shrink: float) -> float:
    """``points`` scaled by ``shrink``, but never below :data:`MIN_POINTS` (nor above ``points``)."""
    return min(points, max(MIN_POINTS, points * shrink))


def _walk(artist, kind):
    """Every ``kind`` artist under ``artist``, without entering an axis' ticks (asking an
    :class:`~matplotlib.axis.Axis` for its children makes every tick, minor ones included: seconds
    on a grid of log axes); an axis contributes its label and offset text. Tick labels and tick
    marks are sized through ``tick_params`` instead."""
    from matplotlib.axis import Axis

    if isinstance(artist, Axis):
        yield from (t for t in (artist.label, artist.offsetText) if isinstance(t, kind))
        return
    if isinstance(artist, kind):
        yield artist
    for child in artist.get_children():
        yield from _walk(child, kind)


def _texts(fig) -> list:
    from matplotlib.text import Text

    return list(_walk(fig, Text))


def _lines(fig) -> list:
    from matplotlib.lines import Line2D

    return list(_walk(fig, Line2D))


def _declutter(fig, pad: float = 3.0, rounds: int = 3) -> None:
    """Drop tick labels that would overlap, on every axis of ``fig`` (colour bars included).

    The figure is laid out (no pixels drawn) and each axis' visible tick labels are measured;
    where two come closer than ``pad`` points, the axis keeps fewer ticks: on an ``asinh`` axis
    0 wins, then the outermost tick on each side (so the labels span the range drawn), then the
    ticks nearest zero (the linear region the axis is read by), on any other axis every k-th tick is kept, the smallest k whose
    labels are apart. Repeated while the layout moves (at most ``rounds`` times)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.ticker import FixedLocator, NullFormatter

    canvas = FigureCanvasAgg(fig)
    for _ in range(rounds):
        fig.draw_without_rendering()
        renderer = canvas.get_renderer()
        gap = pad * fig.dpi / 72
        changed = False
        for ax in fig.axes:
            if not ax.get_visible():
                continue
            for axis, k in ((ax.xaxis, 0), (ax.yaxis, 1)):
                if isinstance(axis.get_major_formatter(), NullFormatter):
                    continue
                shown = _shown_labels(axis, k, renderer)
                if len(shown) < 2 or not _overlap([b for _, b in shown], k, gap):
                    continue
                locs = [v for v, _ in shown]
                if axis.get_scale() == "asinh":
                    kept: list = []
                    ends = {locs.index(min(locs)), locs.index(max(locs))}  # the range each side reaches

                    def rank(i: int) -> tuple:
                        return (locs[i] != 0, i not in ends, abs(locs[i]))

                    seen: set = set()
                    for i in sorted(range(len(shown)), key=rank):
                        if i in seen:
                            continue
                        # a magnitude either side of 0 is kept or dropped on both (the ends alone)
                        mirror = [j for j in range(len(locs)) if locs[j] == -locs[i] != 0 and j not in ends]
                        group = [i, *mirror] if i not in ends else [i]
                        seen.update(group)
                        if not _overlap(sorted([shown[j][1] for j in kept] + [shown[j][1] for j in group],
                                               key=lambda b: b.extents[k] + b.extents[k + 2]), k, gap):
                            kept += group
                    chosen = sorted(locs[i] for i in kept)
                else:
                    anchor = min(range(len(locs)), key=lambda i: abs(locs[i])) if 0.0 in locs else 0
                    for step in range(2, len(locs) + 1):
                        idx = [i for i in range(len(locs)) if (i - anchor) % step == 0]
                        if len(idx) < 2 or not _overlap([shown[i][1] for i in idx], k, gap):
                            break
                    chosen = [locs[i] for i in idx]
                axis.set_major_locator(FixedLocator(chosen))
                changed = True
        if not changed:
            return


def _shown_labels(axis, k: int, renderer) -> list:
    """``(tick value, label box in pixels)`` of the axis' drawn major tick labels, in axis order."""
    lo, hi = sorted(axis.get_view_interval())
    out = []
    for tick in axis.get_major_ticks():
        label = tick.label1 if tick.label1.get_visible() else tick.label2
        loc = float(tick.get_loc())
        if not (label.get_visible() and label.get_text() and lo - 1e-12 * max(1.0, abs(lo)) <= loc <=
                hi + 1e-12 * max(1.0, abs(hi))):
            continue
        out.append((loc, label.get_window_extent(renderer)))
    return sorted(out, key=lambda o: o[1].extents[k] + o[1].extents[k + 2])  # by centre: widths differ


def _overlap(boxes: Sequence, k: int, gap: float) -> bool:
    """Whether two consecutive boxes (sorted along dimension ``k``: 0 = x, 1 = y) come closer than
    ``gap`` pixels."""
    for a, b in zip(boxes, boxes[1:]):
        if a.extents[k + 2] + gap > b.extents[k]:
            return True
    return False


def _labelled(axis, k: int, renderer) -> list:
    """``(tick value, label box)`` of every drawn tick label, major and minor, inside the view."""
    lo, hi = sorted(axis.get_view_interval())
    tol = 1e-9 * max(1.0, abs(lo), abs(hi))
    out = []
    for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:
        loc = float(tick.get_loc())
        for label in (tick.label1, tick.label2):
            if label.get_visible() and label.get_text() and lo - tol <= loc <= hi + tol:
                out.append((loc, label.get_window_extent(renderer)))
                break
    return sorted(out, key=lambda o: o[0])


def _fraction(axis, values) -> np.ndarray:
    """Where ``values`` lie along ``axis``' view, 0 at its low end and 1 at its high end, in the
    axis' own scale (asinh, log, symlog or linear)."""
    t = axis.get_transform()
    lo, hi = sorted(axis.get_view_interval())
    a, b = (float(v) for v in t.transform(np.array([lo, hi])))
    return (np.asarray(t.transform(np.asarray(values, dtype=np.float64)), dtype=np.float64) - a) / ((b - a) or 1.0)


def _inward(end: float, other: float, axis, slack: float) -> float | None:
    """A round value inside the view near ``end`` (``other`` is the view's other end): ``end``
    rounded toward the inside to as few significant digits as keep it within ``slack`` (a share
    of the axis) of the end. ``None`` where no such value exists."""
    for digits in range(1, 6):
        if end == 0:
            return 0.0
        step = 10.0 ** (math.floor(math.log10(abs(end))) - digits + 1)
        value = (math.ceil(end / step) if other > end else math.floor(end / step)) * step
        value = float(f"{value:.{digits + 1}g}")
        lo, hi = sorted((end, other))
        if lo <= value <= hi:
            f = float(_fraction(axis, [value])[0])
            if min(f, 1 - f) <= slack:
                return value
    return None


def _label_ends(fig, pad: float = 3.0, rounds: int = 3) -> None:
    """Give each value axis of ``fig`` a tick label near both ends of its view.

    Run after :func:`_declutter`: a locator puts ticks at round values only (decades on a log axis,
    1, 2, 5 × 10**k on an asinh one), so a view ending at -180 may carry no label past -20 and be
    read as ending there. Wherever the space from an end of the view to the outermost label is
    larger than one tick step (measured along the drawn scale, :func:`_end_step`), a tick at a
    round value just inside that end is added (:func:`_inward`). Where the added label would come
    within ``pad`` points of its neighbour, the neighbour gives way (:func:`_make_room`). Axes whose labels are names (site indices, colour bars
    of depth) are left alone. The figure is laid out twice a round, whatever its number of axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullFormatter

    canvas = FigureCanvasAgg(fig)
    refused: dict[int, set] = {}
    for _ in range(rounds):
        fig.draw_without_rendering()
        renderer = canvas.get_renderer()
        plan = []
        for ax in fig.axes:
            if not ax.get_visible():
                continue
            for axis, k in ((ax.xaxis, 0), (ax.yaxis, 1)):
                if getattr(axis, "probe_names", False) or \
                        isinstance(axis.get_major_formatter(), (NullFormatter, FixedFormatter)):
                    continue
                shown = _labelled(axis, k, renderer)
                if not shown:
                    continue  # labels hidden (an inner panel of shared axes)
                locs = [v for v, _ in shown]
                f = _fraction(axis, locs)
                step = _end_step(axis, f)
                lo, hi = sorted(axis.get_view_interval())
                added = []
                for end, other, space in ((lo, hi, float(f[0])), (hi, lo, 1 - float(f[-1]))):
                    if space > step + 1e-9:
                        value = _inward(end, other, axis, max(step, 0.05) / 2)
                        if value is not None and value not in locs and value not in refused.get(id(axis), ()):
                            added.append(value)
                if not added:
                    continue
                majors = [float(v) for v in axis.get_majorticklocs() if lo <= v <= hi]
                axis.set_major_locator(FixedLocator(sorted({*majors, *added})))
                axis.set_major_formatter(_EndFormatter.wrap(axis, added))
                plan.append((axis, k, added))
        if not plan:
            return
        fig.draw_without_rendering()
        renderer = canvas.get_renderer()
        for axis, k, added in plan:
            refused.setdefault(id(axis), set()).update(_make_room(axis, k, added, renderer, pad * fig.dpi / 72))


class _EndFormatter:
    """The axis' own formatter, except that on a log or symlog axis (whose formatter labels
    decades only, or writes every digit of other values) a tick :func:`_label_ends` added is
    written with two significant digits: ``0.45``, ``30``, ``3×10^-10``."""

    @classmethod
    def wrap(cls, axis, added: list):
        from matplotlib.ticker import Formatter

        old = axis.get_major_formatter()
        if isinstance(old, Formatter) and hasattr(old, "_probe_extra"):
            old._probe_extra.update(added)
            return old

        class Ends(Formatter):
            _probe_extra = set(added)

            def set_locs(self, locs):
                old.set_locs(locs)
                super().set_locs(locs)

            def __call__(self, x, pos=None):
                if not any(math.isclose(x, e, rel_tol=1e-9) for e in self._probe_extra):
                    return old(x, pos)
                if axis.get_scale() not in ("log", "symlog") or getattr(axis, "probe_numbers", False):
                    return old(x, pos) or f"{x:.3g}"
                if x == 0:
                    return "0"
                e = math.floor(math.log10(abs(x)))
                m = float(f"{x / 10.0**e:.2g}")
                if abs(m) == 1 and old(x, pos):  # a decade: as the axis writes its own
                    return old(x, pos)
                if getattr(axis, "probe_plain", False):
                    return _plain(x)
                return f"$\\mathdefault{{{m:g}\\times10^{{{e}}}}}$" if not -2 <= e <= 2 else _number(float(f"{x:.2g}"))

        ends = Ends()
        ends.axis = axis
        return ends


def _end_step(axis, fractions) -> float:
    """How far (a share of the axis) the outermost label may lie from an end of the view: one
    tick step, the median space between neighbouring labels; on a log, asinh or symlog scale, whose
    round ticks may lie a decade or more apart, at most a tenth of the axis. 0 with one label."""
    if len(fractions) < 2:
        return 0.0
    step = float(np.median(np.diff(np.sort(fractions))))
    return step if axis.get_scale() == "linear" else min(step, 0.1)


def _make_room(axis, k: int, added: list, renderer, gap: float) -> set:
    """Drop the major ticks whose labels come within ``gap`` pixels of an ``added`` one's: the
    neighbour gives way (0 too: the view's reach matters more), unless it is the last other label;
    then the added tick does. Returns the added values dropped."""
    from matplotlib.ticker import FixedLocator

    shown = _shown_labels(axis, k, renderer)
    locs = [v for v, _ in shown]
    drop: set = set()
    for value in added:
        if value not in locs:
            continue
        i = locs.index(value)
        box = shown[i][1]
        for j, (v, other) in enumerate(shown):
            if j == i or v in drop or v in added:
                continue
            if other.extents[k] - gap < box.extents[k + 2] and box.extents[k] - gap < other.extents[k + 2]:
                left = [w for w in locs if w not in drop and w != v]
                if len(left) < 2:
                    drop.add(value)
                    break
                drop.add(v)
    if drop:
        axis.set_major_locator(FixedLocator([v for v in axis.get_majorticklocs() if float(v) not in drop]))
    return {v for v in added if v in drop}


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
#: short names of the stacks transformers returns, for tick labels
_STACK_SHORT = {"encoder_hidden_states": "enc", "decoder_hidden_states": "dec"}


def _stack_breaks(x: np.ndarray, names: Sequence[str], *series: Any) -> tuple[np.ndarray, list[np.ndarray], list[float]]:
    """``x`` and each of ``series`` with a NaN point put between two stacks of hidden states (a line
    or band drawn over them stops there: an encoder's last layer and the decoder's first are not
    neighbours), and the x of each boundary. Other sites (modules) break nothing."""
    stacks = [hidden_state_stack(n) for n in names]
    cuts = [i for i in range(1, len(names)) if stacks[i] and stacks[i - 1] and stacks[i] != stacks[i - 1]]
    xs = np.asarray(x, dtype=float)
    out = [np.asarray(v, dtype=float) for v in series]
    at = [(xs[i - 1] + xs[i]) / 2 for i in cuts]
    for i, b in zip(reversed(cuts), reversed(at)):
        xs = np.insert(xs, i, b)
        out = [np.insert(v, i, np.nan) for v in out]
    return xs, out, at


def _labels(names: Sequence[str]) -> tuple[list[str], str]:
    """Short tick labels for site names and the axis title that explains them.

    ``hidden_states.k`` becomes ``k`` (the layer); other names lose their common dotted prefix,
    and when that still leaves long names, the site's index in the list is used instead.
    """
    prefix = "hidden_states."
    if names and all(n.startswith(prefix) for n in names):
        return [n[len(prefix):] for n in names], "layer (hidden_states index)"
    stacks = [hidden_state_stack(n) or "" for n in names]
    if names and all(stacks):
        # several stacks (encoder and decoder, two towers): "enc 0", "dec 1", "text 2", ...
        abbr = {s: _STACK_SHORT.get(s, s.removesuffix("hidden_states").rstrip("_") or "h") for s in stacks}
        legend = ", ".join(f"{abbr[s]} = {s}" for s in dict.fromkeys(stacks))
        return [f"{abbr[s]} {n.rsplit('.', 1)[1]}" for s, n in zip(stacks, names)], f"layer ({legend})"
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
    axis.probe_names = True  # labelled with names, not values: :func:`_label_ends` leaves it alone


#: a PNG larger than this is re-encoded with a 256-colour palette
PNG_BUDGET = 250_000


#: rc settings for every saved file: TrueType (Type 42) fonts in PDF and PS, not Type 3 (which
#: IEEE PDF eXpress and ACM's checks reject)
SAVE_RC: dict[str, Any] = {"pdf.fonttype": 42, "ps.fonttype": 42}


def _savefig(fig, target, fmt: str, dpi: int, fixed: bool) -> None:
    """``fig.savefig`` under :data:`SAVE_RC`. ``fixed``: keep the figure's own size (a print size,
    laid out by constrained layout) instead of the tight bounding box, which can grow the canvas
    past the column's width by the few points an artist overhangs."""
    import matplotlib

    with matplotlib.rc_context(SAVE_RC):  # type: ignore[arg-type]
        fig.savefig(target, format=fmt, dpi=dpi, bbox_inches=None if fixed else "tight", facecolor="white")


def _save(fig, path: str, fmt: str = "png", dpi: int = DPI, fixed: bool = False) -> str:
    """Write ``fig`` as ``fmt``: a PNG (:func:`png_bytes`), or a PDF or SVG, vector files whose
    scatter clouds stay rasterized at ``dpi``; ``fixed``: exactly the figure's size (:func:`_savefig`)."""
    if fmt != "png":
        _savefig(fig, path, fmt, dpi, fixed)
        return path
    with open(path, "wb") as f:
        f.write(png_bytes(fig, dpi, fixed=fixed))
    return path


def png_bytes(fig, dpi: int = DPI, *, fixed: bool = False) -> bytes:
    """``fig`` as PNG bytes, palette-encoded when the full-colour image is large; either way the
    file records ``dpi`` (its ``pHYs`` chunk).

    Scatter clouds drawn with alpha make thousands of distinct shades that PNG compresses badly
    (450 KB for one figure); an adaptive 256-colour palette brings them to a third, invisibly.
    Heatmaps stay full colour (a palette would band their colorbars). Pillow ships with matplotlib.

    Args:
        fig: a matplotlib figure (e.g. from :func:`figures`).
        dpi: pixels per inch.
        fixed: keep the figure's own size rather than its tight bounding box (:func:`_savefig`).

    Returns:
        The PNG file's bytes.

    Example:
        >>> png_bytes(figures(run, "depth")["depth.png"])[:4]
        b'\\x89PNG'
    """
    import io

    buf = io.BytesIO()
    _savefig(fig, buf, "png", dpi, fixed)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - matplotlib depends on pillow
        Image = None  # type: ignore[assignment]
    if Image is None or buf.tell() <= PNG_BUDGET:
        return buf.getvalue()
    buf.seek(0)
    out = io.BytesIO()
    with Image.open(buf) as im:
        im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE) \
            .save(out, format="PNG", optimize=True, dpi=(dpi, dpi))
    return out.getvalue()


def _cmap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def _log_limits(values: np.ndarray, top: float, span: float) -> tuple[float, str]:
    """``(vmin, extend)`` of a log colour scale over positive ``values`` up to ``top``: the smallest
    value, so nothing is clipped, unless it lies below ``span * top``; then the scale starts
    there and ``extend="min"`` gives the colour bar the arrow that says values lie below it."""
    smallest = float(values.min()) if values.size else top * span
    if smallest >= top * span:
        return smallest, "neither"
    return top * span, "min"


def _depth_colorbar(fig, ax, cm, colors, names: Sequence[str], label: str):
    norm = colors.Normalize(vmin=0, vmax=max(1, len(names) - 1))
    sm = cm.ScalarMappable(norm=norm, cmap=_cmap(CMAP_DEPTH))
    bar = fig.colorbar(sm, ax=ax, pad=0.01, fraction=0.04)
    labels, _ = _labels(names)
    step = max(1, math.ceil(len(names) / 12))
    ticks = list(range(0, len(names), step))
    bar.set_ticks(ticks)
    bar.set_ticklabels([labels[i] for i in ticks], fontsize=7)
    bar.ax.xaxis.probe_names = bar.ax.yaxis.probe_names = True
    bar.set_label(label, fontsize=8)
    return norm


def _title(run: Run) -> str:
    """The model's name, for a figure's title (what the figure shows of it goes before)."""
    model = run.meta.get("model", {})
    return str(model.get("name_or_path") or model.get("class") or "model")


def _kept(run: Run) -> str:
    """Which tokens a figure of the kept values counts, for its caption (the title names no option)."""
    skip = run.meta.get("skip_first", 0)
    if not skip:
        return "Every real token is counted (skip_first=0)"
    return f"The first {skip} position(s) of each sequence are left out (skip_first={skip})"


def _sites_with(run: Run, kind: str) -> list[str]:
    """Sites that hold the ``kind`` statistic (disabled sites hold none)."""
    return [n for n in run.sites if run[n].has(kind)]


def _axis(run: Run, names: Sequence[str]) -> tuple[list[str], list[str], str]:
    """The sites a per-site figure's axis runs over — ``names`` (the sites holding its statistic)
    and the sites holding no statistic at all (disabled: a gap in the data), not the sites that
    hold only statistics of their own kind (MoE routers and experts, attention: they would be empty
    rows) — with their tick labels (where they are indices, indices in ``run.sites``) and the axis
    title."""
    keep, stats = set(names), run.meta.get("stats") or ()
    axis = [n for n in run.sites if n in keep or not any(run[n].has(k) for k in stats)]
    labels, title = _labels(axis)
    if title.startswith("site (index"):  # indices: into run.sites, where a reader looks them up
        at = {n: i for i, n in enumerate(run.sites)}
        labels = [str(at[n]) for n in axis]
    return axis, labels, title


def _missing(kind: str, stat: str, run: Run) -> _Missing:
    got = list(run.meta.get("stats") or [])
    if stat in got:  # captured, but at no site that can hold it
        only = sorted(_held(run))
        held = f" (its sites hold {', '.join(only)} statistics only)" if only else ""
        return _Missing(f"plot kind {kind!r} needs {stat} statistics, and no site of this run holds them{held}; "
                        "expected hidden-state or module sites; capture them too (e.g. sites=['hidden_states', "
                        f"'moe']) or leave out kind {kind!r}")
    return _Missing(f"plot kind {kind!r} needs {stat} statistics; expected a run captured with stats including "
                    f"{stat!r}; got stats={got!r}; capture again with stats including {stat!r} or leave out "
                    f"kind {kind!r}")


def _held(run: Run) -> set[str]:
    """The statistics some site of ``run`` holds."""
    return {k for n in run.sites for k in (run.meta.get("stats") or ()) if run[n].has(k)}


# ---------------------------------------------------------------------------- histograms
def _asinh_edges(lo: float, hi: float, width: float, bins: int) -> np.ndarray:
    """``bins + 1`` edges from exactly ``lo`` to exactly ``hi``, evenly spaced in ``asinh(x / width)``:
    the same bins an ``asinh`` axis with ``linear_width=width`` draws as equal widths."""
    if not hi > lo:
        lo, hi = lo - max(abs(lo), 1.0) * 0.5, hi + max(abs(hi), 1.0) * 0.5
    t = np.linspace(np.arcsinh(lo / width), np.arcsinh(hi / width), bins + 1)
    edges = np.sinh(t) * width
    edges[0], edges[-1] = lo, hi  # exact: every value lies in [edges[0], edges[-1]]
    return np.maximum.accumulate(edges)


def _scale_of(views) -> float:
    """The asinh axis' linear width: the smallest std drawn (so the narrowest site keeps its shape;
    wider ones turn logarithmic past it). Never 0."""
    stds = [v.std for v in views if np.isfinite(v.std) and v.std > 0]
    return float(min(stds)) if stds else 1.0


def _edges(lo: float, hi: float, width: float, bins: int, linear: bool) -> np.ndarray:
    """The bins of a value axis: equal widths on the asinh axis (:func:`_asinh_edges`), or on a
    linear one (``linear``), from exactly ``lo`` to exactly ``hi``."""
    if not linear:
        return _asinh_edges(lo, hi, width, bins)
    if not hi > lo:
        lo, hi = lo - max(abs(lo), 1.0) * 0.5, hi + max(abs(hi), 1.0) * 0.5
    edges = np.linspace(lo, hi, bins + 1)
    edges[0], edges[-1] = lo, hi
    return edges


def _hist_density(s, edges: np.ndarray) -> np.ndarray:
    """The site's density per unit of x in each bin: its share of the values divided by the bin's
    width, so ``sum(density * diff(edges))`` is 1 over edges spanning [min, max].

    A density, not a share per bin: asinh bins widen with ``|x|``, so a share per bin grows away
    from 0 on any site wider than the axis' linear region and draws a unimodal distribution as
    two humps with a dip at 0. Per unit of x the curve has the distribution's own shape on any axis.
    """
    counts, _ = s.histogram(bins=edges)
    widths = np.diff(edges)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(widths > 0, counts / (max(float(s.count), 1.0) * widths), 0.0)


def _value_axis(ax, lo: float, hi: float, width: float, axis: str = "x", linear: bool = False) -> None:
    from matplotlib.ticker import FuncFormatter

    setter = ax.set_xscale if axis == "x" else ax.set_yscale
    if linear:
        setter("linear")
    else:
        setter("asinh", linear_width=width)
    (ax.set_xlim if axis == "x" else ax.set_ylim)(lo, hi)
    (ax.xaxis if axis == "x" else ax.yaxis).set_major_formatter(FuncFormatter(lambda v, _: _number(v)))


def _signed(v: float) -> str:
    """A symlog tick label with its sign always written: ``-0.3``, ``0``, ``10``, ``1000``, and
    from 10**4 on ``10^4`` or ``-2×10^5``, where a symlog axis' own formatter would write ``10^0``
    and ``-3×10^-1`` for 1 and -0.3."""
    if v == 0:
        return "0"
    if abs(v) < 1e4:
        return _number(v)
    e = math.floor(math.log10(abs(v)))
    m = float(f"{v / 10.0**e:.2g}")
    sign = "-" if m < 0 else ""
    return f"$\\mathdefault{{{sign}10^{{{e}}}}}$" if abs(m) == 1 else f"$\\mathdefault{{{m:g}\\times10^{{{e}}}}}$"


def _number(v: float) -> str:
    """A value-axis tick label: three significant digits, without an exponent below 10**5
    (``3000``, not ``3e+03``)."""
    text = f"{v:.3g}"
    return f"{v:.0f}" if "e+" in text and abs(v) < 1e5 else text


def _floor(curves: Sequence[np.ndarray]) -> float:
    """The bottom of a log density axis: half the smallest non-zero density drawn (never 0)."""
    positive = [float(c[c > 0].min()) for c in curves if np.any(c > 0)]
    return 0.5 * min(positive) if positive else 1e-12


def _mark_extremes(ax, s, color) -> None:
    """Triangles at the exact min and max, so the tails' reach is visible however thin."""
    ax.plot([s.min, s.max], [0, 0], ls="none", marker="^", ms=4, color=color, clip_on=False,
            transform=ax.get_xaxis_transform(), zorder=5)


def _hist_sites(run: Run, kind: str = "histograms") -> list[str]:
    names = [n for n in _sites_with(run, "histogram") if run[n].count and np.isfinite(run[n].min)]
    if not names:
        raise _missing(kind, "histogram", run)
    return names


def _histograms(run: Run, out: _Out, opts: dict) -> list[str]:
    _, Figure, colors, cm = _mpl()
    from matplotlib.ticker import NullLocator

    names = _hist_sites(run)
    labels, axis_label = _labels(run.sites)
    index = {n: i for i, n in enumerate(run.sites)}
    views = [run[n] for n in names]
    shared, linear = bool(opts.get("shared")), bool(opts.get("linear"))
    lo_all, hi_all = min(v.min for v in views), max(v.max for v in views)
    width_all = _scale_of(views)
    scale = "linear" if linear else "asinh"
    binned = "equal-width bins" if linear else "bins of equal width on the axis"

    # grid: one panel per site; each on its own axis from its exact min to its exact max, or
    # (shared=True) all on one axis from the smallest min to the largest max
    n = len(views)
    # panels at least 1.1 in wide in the target width: a column holds three across
    cols = out.cols(min(n, max(1, math.ceil(math.sqrt(n * 1.6)))), 1.1)
    rows = math.ceil(n / cols)
    width = SIZES.get(out.size)
    row = 1.3 if out.narrow else 1.45  # design inches a row of panels takes
    tallest = COLUMN_HEIGHT if out.narrow else PAGE_HEIGHT
    # the title's two lines and the x label: at a print size their text shrinks by less than the
    # figure (:func:`_resize` scales the grid by ``ratio``, its text by ``shrink``), so their room
    # grows in design inches as the figure narrows
    ratio = min(1.0, width / (1.9 * cols)) if width is not None else 1.0
    shrink = max(0.55, math.sqrt(ratio)) if ratio < 1 else 1.0
    header = max(0.7, ((2 * _shrunk(10, shrink) + _shrunk(9, shrink)) * 1.3 / 72 + 0.25) / ratio)
    if width is not None:  # a printed grid fits a column's (or page's) height: the rows beyond it are left out
        most = max(1, int((tallest / ratio - header) / row))
        if rows > most:
            keep = [v for v in views if v.name in (opts.get("layers") or ())] or views
            views = [run[x] for x in _pick([v.name for v in keep], min(len(keep), cols * most))]
            n, rows = len(views), math.ceil(len(views) / cols)
    fig = Figure(figsize=(1.9 * cols, row * rows + header), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False, sharex=shared, sharey=shared)).ravel()
    drawn = []
    for ax, s in zip(axes, views):
        lo, hi, width = (lo_all, hi_all, width_all) if shared else (s.min, s.max, _scale_of([s]))
        edges = _edges(lo, hi, width, HIST_BINS, linear)
        drawn.append((ax, s, lo, hi, width, edges, _hist_density(s, edges)))
    floor = _floor([d[-1] for d in drawn])
    top = max(float(d[-1].max()) for d in drawn)
    for ax, s, lo, hi, width, edges, density in drawn:
        ax.stairs(density, edges, fill=True, color="#3b6ea5", alpha=0.85, baseline=floor * 0.5)
        ax.set_yscale("log")
        # a panel spans ~10 decades in an inch: minor ticks would be a grey comb (and cost seconds to lay out)
        ax.yaxis.set_minor_locator(NullLocator())
        _value_axis(ax, lo, hi, width, linear=linear)
        _mark_extremes(ax, s, "#c44e52")
        # pad: clear of the top y tick label, which stands half above the panel's top
        ax.set_title(f"{labels[index[s.name]]}: σ={_short(s.std)} κ={_short(s.kurtosis, 2)}", fontsize=7, pad=4.5)
        ax.tick_params(labelsize=6, pad=1)
        if not linear:
            ax.xaxis.set_major_locator(_asinh_locator(lo, hi, width, most=5))
        else:
            ax.xaxis.set_major_locator(_linear_locator(5))
    for ax in axes[:n]:
        ax.set_ylim(floor * 0.5, max(top, floor) * 2 if shared else None)
    for ax in axes[n:]:
        ax.set_visible(False)
    how = ("one shared axis for every panel" if shared else "each panel from its own exact min to max")
    xlabel = f"activation value ({scale} scale, {how}; {HIST_BINS} {binned}; red ▲: exact min and max)"
    ylabel = "density per unit of x (log; integrates to 1)"
    w, h = fig.get_size_inches()
    tall = h * (SIZES.get(out.size) or w) / w  # the height :func:`_resize` gives the figure
    if len(xlabel) > out.chars(w, 9) or len(ylabel) > 0.9 * tall * 72 / (0.55 * _shrunk(9, shrink)):
        # one line each or the layout has no room for the panels: short labels, the rest in the caption
        xlabel, ylabel = f"activation value ({scale} scale)", "density (log)"
        _note(fig, f"y: density per unit of x, each panel's curve integrating to 1 (log scale); x: {scale} "
                   f"scale, {how}, {HIST_BINS} {binned}; red ▲: exact min and max")
    fig.supxlabel(xlabel, fontsize=9)
    fig.supylabel(ylabel, fontsize=9)
    which = "Histogram per site" if n == len(names) else f"Histograms of {n} of {len(names)} sites"
    fig.suptitle(f"{which} — {_title(run)}\nPanel: {axis_label.split(' (')[0]}, σ = std, κ = excess kurtosis",
                 fontsize=10)
    if n < len(names):
        shown = {v.name for v in views}
        left = [labels[index[x]] for x in names if x not in shown]
        why = f"a {out.size}-wide grid of all would be taller than {tallest:g} in"
        if opts.get("layers"):
            _note(fig, f"{n} of {len(names)} sites, as chosen (--layers) and as fit ({why}); left out: {', '.join(left)}")
        else:
            _note(fig, f"{n} of {len(names)} sites, evenly spaced with the first and last; left out: "
                       f"{', '.join(left)} ({why}); choose the sites with --layers")
    _note(fig, _kept(run))
    paths = [out.save(fig, "hist_grid.png")]

    # overlay: a few chosen sites, distinct colours, one shared axis reaching every min and max
    chosen = opts.get("layers") or _pick(names, 6)
    chosen = [n for n in chosen if n in names]
    if not chosen:
        raise ProbeError(f"--layers: none of the chosen layers has histogram statistics; expected some of "
                         f"{names[:3]}…; choose other layers")
    cviews = [run[n] for n in chosen]
    lo, hi, width = min(v.min for v in cviews), max(v.max for v in cviews), _scale_of(cviews)
    edges = _edges(lo, hi, width, 2 * HIST_BINS - 1, linear)
    fig = Figure(figsize=(NARROW_DESIGN, 6.6) if out.narrow else (9, 4.8), layout="constrained")
    ax = fig.subplots()
    palette = _palette(len(chosen))
    curves = [_hist_density(s, edges) for s in cviews]
    for s, density, color in zip(cviews, curves, palette):
        inside = (edges[1:] > s.min) & (edges[:-1] < s.max)  # bins the site's values can reach
        ax.stairs(np.where(inside, density, np.nan), edges, color=color, lw=1.1,
                  label=f"{labels[index[s.name]]}: σ={s.std:.3g}, range [{s.min:.3g}, {s.max:.3g}]")
        _mark_extremes(ax, s, color)
    ax.set_yscale("log")
    ax.set_ylim(bottom=_floor(curves))
    _value_axis(ax, lo, hi, width, linear=linear)
    if not linear:
        ax.xaxis.set_major_locator(_asinh_locator(lo, hi, width))
    if out.narrow:  # beside the axis, the legend would take half a column's width
        # one column: two of "k: σ=…, range […]" would be wider than the column itself
        fig.legend(fontsize=7, title=axis_label.split(" (")[0], title_fontsize=7, loc="outside lower center",
                   ncol=1)
    else:
        ax.legend(fontsize=7, title=axis_label.split(" (")[0], title_fontsize=7, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0))
    reach = "linear" if linear else f"asinh scale: linear within ±{width:.2g}, logarithmic beyond"
    label = (f"activation value ({reach}; axis from the smallest min to the largest max; "
             "▲: each site's exact min and max)")
    if not linear:  # the note under the label, each wrapped to the width the file will have
        import textwrap

        note = ASINH_NOTE.format(width=f"{width:.2g}")
        room = out.chars(fig.get_size_inches()[0], 8)
        # in a column, five lines of note would be as tall as the plot: it becomes the caption
        if out.narrow or out.notes_apart:
            _note(fig, note, first=True)
            label = textwrap.fill(label, room)
        else:
            label = textwrap.fill(label, room) + "\n" + textwrap.fill(note, room)
    ax.set_xlabel(label, fontsize=8)
    ax.set_ylabel("density per unit of x (log; each curve integrates to 1)", fontsize=8)
    fig.suptitle(f"Histograms of {len(chosen)} of {len(names)} sites — {_title(run)}", fontsize=10)
    if len(chosen) < len(names) and not opts.get("layers"):
        _note(fig, "Choose the sites with --layers")
    _note(fig, _kept(run))
    ax.grid(alpha=0.25, lw=0.5)
    paths.append(out.save(fig, "hist_overlay.png"))
    return paths


def _linear_locator(most: int):
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(nbins=most)


def _asinh_locator(lo: float, hi: float, width: float, most: int = 9):
    """Ticks at 0 and at ±1, 2, 5 × powers of ten inside [lo, hi], thinned to ``most``, and a round
    value near each end of the data (:func:`_far_end`).

    The thinning drops a magnitude on both sides at once (the tick farther from zero of the two
    closest), so where the data reach both sides the ticks are the same either side of 0 (not 20
    above and -50 below); the end labels then say how far each side reaches."""
    from matplotlib.ticker import FixedLocator

    big = max(abs(lo), abs(hi), width)
    mags = [m * 10.0**e for e in range(int(np.floor(np.log10(width))) - 1, int(np.ceil(np.log10(big))) + 1)
            for m in (1, 2, 5)]
    inside = [m for m in mags if lo <= m <= hi or lo <= -m <= hi]
    room = max(1, (most - 1) // 2)  # magnitudes, with 0 and the two ends
    while len(inside) > room:
        pos = np.arcsinh(np.asarray(inside) / width)
        i = int(np.argmin(np.diff(pos))) if len(inside) > 1 else 0
        inside.pop(i + 1 if len(inside) > 1 else 0)  # keep the magnitude nearer zero
    ticks = {0.0, *[t for m in inside for t in (m, -m) if lo <= t <= hi]}
    for end in (lo, hi):
        value = _far_end(end, [t for t in ticks if t * end > 0], width)
        if value is not None:
            ticks.add(value)
    return FixedLocator(sorted(ticks))


def _far_end(end: float, side: Sequence[float], width: float) -> float | None:
    """A round value between ``end`` (where the data stop) and halfway (on the asinh axis) to the
    last 1, 2, 5 × 10**k value before it: ``end`` rounded toward zero to the fewest significant
    digits that reach that far (843, past 500: 800; -182, past -100: -180). ``None`` where a tick
    of ``side`` (those on its side of 0) already reaches, or the end lies in the linear region."""
    if end == 0 or abs(end) <= width:
        return None
    e = math.floor(math.log10(abs(end)))
    nice = max(m * 10.0**k for k in (e - 1, e) for m in (1, 2, 5) if m * 10.0**k <= abs(end) * (1 + 1e-12))
    half = float(np.sinh((np.arcsinh(abs(end) / width) + np.arcsinh(nice / width)) / 2) * width)
    if any(abs(t) >= half for t in side):
        return None
    for digits in range(1, 6):
        step = 10.0 ** (e - digits + 1)
        value = float(f"{math.trunc(end / step) * step:.{digits + 1}g}")  # toward zero: inside the data
        if abs(value) >= half:
            return value
    return None


def _palette(n: int) -> list:
    """``n`` distinct colours: tab10 up to ten, then evenly spaced turbo hues."""
    if n <= 10:
        return [_cmap("tab10")(i) for i in range(n)]
    return [_cmap("turbo")(x) for x in np.linspace(0.05, 0.95, n)]


# ------------------------------------------------------------------------------------ depth
DEPTH_BANDS = ((0.001, 0.999), (0.01, 0.99), (0.25, 0.75))


def _depth(run: Run, out: _Out, opts: dict) -> list[str]:
    """Width by depth: quantile bands, std and excess kurtosis against the site index."""
    _, Figure, colors, cm = _mpl()
    names = _hist_sites(run, "depth")
    views = [run[n] for n in names]
    axis, labels, axis_label = _axis(run, names)
    index = {n: i for i, n in enumerate(axis)}
    x = np.array([index[n] for n in names])
    qs = sorted({q for band in DEPTH_BANDS for q in band} | {0.5})
    table = np.array([v.quantile(qs) for v in views])  # [sites, len(qs)]
    col = {q: table[:, i] for i, q in enumerate(qs)}
    width = _scale_of(views)
    fig = Figure(figsize=(NARROW_DESIGN, 7.6) if out.narrow else (11, 7.2), layout="constrained")
    top, mid, low = fig.subplots(3, 1, sharex=True, height_ratios=(3, 1.2, 1.2))
    shades = ("#c6dbef", "#6baed6", "#2171b5")
    kurt = np.array([v.kurtosis for v in views])
    # a stack's lines stop at its last site: the next stack (a decoder after its encoder) starts anew
    xb, (mins, maxs, stds, kurts, *bands), cuts = _stack_breaks(
        x, names, [v.min for v in views], [v.max for v in views], [v.std for v in views], kurt,
        *(col[q] for q in qs))
    colb = dict(zip(qs, bands))
    for (a, b), shade in zip(DEPTH_BANDS, shades):
        top.fill_between(xb, colb[a], colb[b], color=shade, step=None, lw=0, label=f"q{a:g} – q{b:g}")
    top.plot(xb, colb[0.5], color="black", lw=1, label="median")
    top.plot(xb, mins, ls=":", color="#c44e52", lw=1, marker="v", ms=3, label="min / max (exact)")
    top.plot(xb, maxs, ls=":", color="#c44e52", lw=1, marker="^", ms=3)
    lo, hi = min(v.min for v in views), max(v.max for v in views)
    # a margin of at most 0.3 in asinh units (x1.35 past the extremes): wider, the view's end labels
    # would read as data far beyond the exact min/max
    pad = min(0.08 * (np.arcsinh(hi / width) - np.arcsinh(lo / width)), 0.3)
    top.set_yscale("asinh", linear_width=width)
    top.set_ylim(np.sinh(np.arcsinh(lo / width) - pad) * width, np.sinh(np.arcsinh(hi / width) + pad) * width)
    top.yaxis.set_major_locator(_asinh_locator(lo, hi, width, most=13))
    from matplotlib.ticker import FuncFormatter

    top.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _number(v)))
    top.set_ylabel(f"activation value\n(asinh: linear within ±{width:.2g})", fontsize=8)
    if out.narrow:
        fig.legend(*top.get_legend_handles_labels(), fontsize=7, loc="outside lower center", ncol=3)
    else:
        top.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    top.set_title("quantile bands of the kept values per site", fontsize=9)
    mid.plot(xb, stds, color="#3b6ea5", marker="o", ms=3, lw=1)
    mid.set_yscale("log")
    mid.set_ylabel("std (log)", fontsize=8)
    low.plot(xb, kurts, color="#55a868", marker="o", ms=3, lw=1)
    for ax in (top, mid, low):
        for c in cuts:
            ax.axvline(c, color="0.55", lw=0.8, ls="--")
    low.axhline(0, color="0.4", lw=0.7)
    low.set_yscale("symlog", linthresh=1.0)
    finite = kurt[np.isfinite(kurt)]
    if finite.size:
        low.set_ylim(min(-0.3, float(finite.min()) * 1.5), max(1.0, float(finite.max()) * 3))
    low.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _signed(v)))
    low.yaxis.probe_numbers = True  # :func:`_label_ends`' added ticks: written by this formatter too
    low.set_ylabel("excess kurtosis\n(symlog; 0 = normal)", fontsize=8)
    for ax in (top, mid, low):
        ax.grid(alpha=0.25, lw=0.5)
        ax.tick_params(labelsize=7)
    _index_ticks(low.xaxis, labels, most=40)
    low.set_xlabel(axis_label, fontsize=8)
    fig.suptitle(f"Width by depth — {_title(run)}", fontsize=10)
    _note(fig, _kept(run))
    return [out.save(fig, "depth.png")]


# --------------------------------------------------------------------------------- cross
def _cross(run: Run, out: _Out, opts: dict) -> list[str]:
    _, Figure, colors, cm = _mpl()
    cross = run.cross
    if not cross.available or cross.cov.size == 0 or not (cross.n > 0 or cross.n_all > 0):
        raise _missing("cross", "cross", run)
    labels, axis_label = _labels(cross.sites)
    skip = run.meta.get("skip_first", 0)
    kept = f"kept tokens (first {skip} of each sequence excluded)" if skip else "kept tokens (every token)"
    panels = [(kept, cross.cov, cross.r2, cross.n), ("all real tokens", cross.cov_all, cross.r2_all, cross.n_all)]
    # with nothing skipped both halves are the same matrix: draw it once
    panels = [p for p in panels if p[3] > 0] if cross.n != cross.n_all else panels[1:]
    noun = "Layer" if axis_label.startswith("layer") else "Site"
    size = max(3.6, min(6.5, 0.16 * len(labels) + 1.2))
    fs = 6 if len(labels) > 24 else 7

    def grid(values, norm, cmap, label, title, name, signed=False, extend="neither"):
        """``values``: ``(panel title, matrix)``, or ``(panel title, matrix, norm, extend)`` for a
        panel on its own colour scale, which then gets a colour bar of its own."""
        stack = out.narrow and len(panels) > 1  # one above the other in a column
        shape = (len(panels), 1) if stack else (1, len(panels))
        fig = Figure(figsize=(size + 1.2, size * len(panels) + 0.5) if stack else
                     (size * len(panels) + 1.2, size + 0.5), layout="constrained")
        axes = np.atleast_1d(fig.subplots(*shape, squeeze=False)).ravel()
        im = None
        own = any(len(p) > 2 for p in values)
        for ax, (what, v, *scale) in zip(axes, values):
            im = ax.imshow(np.ma.masked_invalid(np.abs(v) if signed else v), norm=scale[0] if scale else norm,
                           cmap=cmap, interpolation="nearest")
            if own:
                bar = fig.colorbar(im, ax=ax, shrink=0.85, pad=0.02, extend=scale[1] if scale else extend)
                bar.set_label(label, fontsize=8)
                bar.ax.tick_params(labelsize=7)
            if signed:
                yy, xx = np.nonzero(np.nan_to_num(v) < 0)
                ax.scatter(xx, yy, marker="_", s=12 if len(labels) <= 40 else 4, color="white", lw=0.9)
            ax.set_title(what, fontsize=9)
            _index_ticks(ax.xaxis, labels, fontsize=fs)
            _index_ticks(ax.yaxis, labels, fontsize=fs)
            ax.tick_params(axis="x", labelrotation=90)
            ax.set_xlabel(axis_label, fontsize=8)
            ax.set_ylabel(axis_label, fontsize=8)
        if own and len(values) > 1:
            _note(fig, "Each panel has its own colour scale (its colour bar beside it)")
        if not own:
            bar = fig.colorbar(im, ax=list(axes), shrink=0.85, pad=0.02, extend=extend)
            bar.set_label(label, fontsize=8)
            bar.ax.tick_params(labelsize=7)
        fig.suptitle(f"{title} — {_title(run)}", fontsize=10)
        return out.save(fig, name)

    # Covariances run from ~1e-4 (embeddings) to ~1e4 (massive-activation layers): the colour is
    # log10 |cov|, and the few negative entries (all tiny in practice) are marked rather than given
    # half of a diverging colormap. Each panel has its own scale and colour bar: the first token's
    # massive activations put the all-token panel 10-100x above the kept one, whose structure a
    # shared scale would paint in one flat colour.
    def scale(matrix):
        mags = np.abs(matrix[np.isfinite(matrix)]).ravel()
        mags = mags[mags > 0]
        top = float(mags.max()) if mags.size else 1.0
        # every entry on the scale: from the smallest |cov| up, unless that is below 1e-12 of the
        # largest (then the colour bar's arrow says the few entries below are clipped)
        low, extend = _log_limits(mags, top, 1e-12)
        return colors.LogNorm(vmin=low, vmax=top), extend

    covs = [(p[0], p[1], *scale(p[1])) for p in panels]
    paths = [grid(covs, covs[0][2], _cmap("viridis"),
                  "|covariance| (log scale;\nwhite dash = negative entry)",
                  f"{noun} × {noun.lower()} covariance (population, per channel-token observation)", "cross_cov.png",
                  signed=True, extend=covs[0][3])]

    paths.append(grid([(p[0], p[2]) for p in panels], colors.Normalize(0, 1), _cmap("magma"),
                      "R² (squared Pearson correlation, linear 0–1)", f"{noun} × {noun.lower()} R²",
                      "cross_r2.png"))
    return paths


# ------------------------------------------------------------------------------- scatter
def _pick(names: Sequence[str], k: int = 3) -> list[str]:
    """``k`` evenly spaced entries of ``names``, first and last included."""
    if len(names) <= k:
        return list(names)
    idx = sorted({round(i * (len(names) - 1) / (k - 1)) for i in range(k)})
    return [names[i] for i in idx]


def _extremes(s, axis: str) -> tuple[np.ndarray, np.ndarray, str]:
    """The exact extreme values a run stores for one scatter panel: ``(x, value, legend label)``
    of the site's top-k entries over every real token (``x`` their position or channel), or,
    without ``topk``, its exact absmax over the kept tokens alone."""
    if s.has("topk") and len(s.topk):
        t = s.topk
        return (t[axis].astype(np.float64), t["value"].astype(np.float64),
                f"exact top {len(t)} |x| (stored, every real token)")
    if s.has("moments") and s.count and np.isfinite(s.absmax):
        value = s.max if s.max >= -s.min else s.min
        return (np.array([float(s.absmax_at[axis])]), np.array([float(value)]),
                "exact max |x| (stored, kept tokens)")
    return np.empty(0), np.empty(0), ""


def _scatter(run: Run, out: _Out, opts: dict) -> list[str]:
    _, Figure, colors, cm = _mpl()
    from matplotlib.ticker import FuncFormatter

    found = {}
    for name in _sites_with(run, "sample"):
        sm = run[name].sample
        finite = np.isfinite(sm.value)  # a sampled NaN or inf (kept so sites pair up) has no place on an axis
        if finite.any():
            found[name] = (sm.position[finite], sm.channel[finite], sm.value[finite])
    if not found:
        raise _missing("scatter", "sample", run)
    heavy = None
    if opts.get("layers"):
        chosen = [n for n in opts["layers"] if n in found]
        if not chosen:
            raise ProbeError(f"--layers: none of the chosen layers has sample statistics; expected some of "
                             f"{list(found)[:3]}…; choose other layers")
    else:
        chosen = _pick(list(found))
        # plus the most heavy-tailed site (largest max|x| / std in the sample), where outlier
        # channels and massive activations show best, when first/middle/last missed it
        ratio = {n: float(np.max(np.abs(v[2])) / (np.std(v[2]) or 1.0)) for n, v in found.items()}
        heavy = max(ratio, key=lambda n: ratio[n])
        if heavy not in chosen:
            chosen = sorted(chosen + [heavy], key=run.sites.index)
    labels, axis_label = _labels(run.sites)
    what = axis_label.split(" (")[0]
    index = {n: i for i, n in enumerate(run.sites)}
    cols = out.cols(min(len(chosen), 4), 1.6)  # panels at least 1.6 in wide: two across a column
    rows = math.ceil(len(chosen) / cols)
    paths = []
    for x_name, col, xlabel, file in (("position", 0, "token position", "scatter_position.png"),
                                      ("channel", 1, "channel", "scatter_channel.png")):
        fig = Figure(figsize=(3.7 * cols, 3.3 * rows + 0.5), layout="constrained")
        axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
        for ax, name in zip(axes, chosen):
            values = found[name][2]
            # asinh y: linear near zero, logarithmic far out, and smooth in between, so the
            # density of dots never jumps at a threshold (symlog's kink drew false bands)
            width = float(np.std(values)) or 1.0
            ax.scatter(found[name][col], values, s=1.5, alpha=0.3, color="#1f4e79", linewidths=0, rasterized=True)
            # a uniform sample all but never holds the few extreme values (a first-token massive
            # activation is one in 10**6): the exact top-k the run stores are drawn on top
            ex, ey, what_ex = _extremes(run[name], x_name)
            if len(ey):
                ax.scatter(ex, ey, s=16, marker="o", facecolors="none", edgecolors="#c44e52", linewidths=0.8,
                           zorder=4, label=what_ex)
            every = np.concatenate([values, ey])
            lo, hi = float(every.min()), float(every.max())
            ax.set_yscale("asinh", linear_width=width)
            pad = 0.04 * (np.arcsinh(hi / width) - np.arcsinh(lo / width)) or 0.1
            ax.set_ylim(np.sinh(np.arcsinh(lo / width) - pad) * width, np.sinh(np.arcsinh(hi / width) + pad) * width)
            ax.yaxis.set_major_locator(_asinh_locator(lo, hi, width))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _number(v)))
            tag = " (heaviest tail)" if name == heavy and name not in _pick(list(found)) else ""
            ax.set_title(f"{what} {labels[index[name]]}{tag}: {len(values):,} values", fontsize=9)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.25, lw=0.5)
        for ax in axes[len(chosen):]:
            ax.set_visible(False)
        # one label for every row of panels (on the first panel alone it named only that one)
        fig.supylabel("activation value (asinh: linear within ±std)", fontsize=8)
        handles, names = axes[0].get_legend_handles_labels()
        if handles:  # outside the panels: inside one, the legend would cover the extremes it names
            fig.legend(handles, names, fontsize=7, loc="outside lower center", ncol=len(handles), markerscale=1.0)
        fig.suptitle(f"Uniform sample of kept values vs {x_name}, {len(chosen)} of {len(found)} sites — "
                     f"{_title(run)}", fontsize=10)
        _note(fig, _kept(run))
        if len(chosen) < len(found) and not opts.get("layers"):
            _note(fig, "Choose the sites with --layers")
        paths.append(out.save(fig, file))
    return paths


# ------------------------------------------------------------------------------ channels
def _channels(run: Run, out: _Out, opts: dict) -> list[str]:
    _, Figure, colors, cm = _mpl()
    names = [n for n in _sites_with(run, "moments") if run[n].count]
    if not names:
        raise _missing("channels", "moments", run)
    width = max(len(run[n].channel) for n in names)
    axis, labels, axis_label = _axis(run, names)
    grid = np.full((len(axis), width), np.nan)
    index = {n: i for i, n in enumerate(axis)}
    for n in names:
        a = run[n].channel.absmax
        grid[index[n], :len(a)] = a
    pos = grid[np.isfinite(grid) & (grid > 0)]
    if pos.size == 0:
        raise _missing("channels", "moments", run)
    # a log colour scale: typical channels sit near 1, outlier channels 100-1000x above
    top = float(pos.max())
    low, extend = _log_limits(pos, top, 1e-6)
    fig = Figure(figsize=(NARROW_DESIGN if out.narrow else 11, max(3.2, 0.17 * len(axis) + 1.4)),
                 layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(np.ma.masked_invalid(np.where(grid > 0, grid, np.nan)), aspect="auto",
                   interpolation="nearest", cmap=_cmap("magma"), norm=colors.LogNorm(vmin=low, vmax=top))
    _index_ticks(ax.yaxis, labels, fontsize=6 if len(labels) > 24 else 7)
    ax.set_ylabel(axis_label, fontsize=8)
    ax.set_xlabel("channel", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    bar = fig.colorbar(im, ax=ax, pad=0.01, extend=extend)
    bar.set_label("max |activation| over kept tokens (log scale"
                  + ("; ▼: below 1e-6 of the largest, clipped)" if extend == "min" else ")"), fontsize=8)
    bar.ax.tick_params(labelsize=7)
    fig.suptitle(f"Per-channel absmax — {_title(run)}", fontsize=10)
    _note(fig, _kept(run))
    return [out.save(fig, "channels_absmax.png")]


# ----------------------------------------------------------------------------- positions
def _positions(run: Run, out: _Out, opts: dict) -> list[str]:
    _, Figure, colors, cm = _mpl()
    from matplotlib.ticker import FixedLocator, FuncFormatter

    views = []
    for name in _sites_with(run, "position"):
        p = run[name].position
        if len(p):
            views.append((name, p))
    if not views:
        raise _missing("positions", "position", run)
    labels, axis_label = _labels(run.sites)
    index = {n: i for i, n in enumerate(run.sites)}
    # a few sites in distinct colours, not 31 shades of one colour map: evenly spaced with the first
    # and last, plus the one with the largest max |x| (the massive activation the figure is read for)
    every = [n for n, _ in views]
    if opts.get("layers"):
        chosen = [n for n in opts["layers"] if n in every] or every
    else:
        chosen = _pick(every, POSITION_LINES)
        heaviest = max(views, key=lambda v: float(np.nanmax(v[1].absmax)))[0]
        if heaviest not in chosen:
            chosen = sorted([*chosen, heaviest], key=run.sites.index)
    views = [v for v in views if v[0] in chosen]
    if out.narrow:  # the two profiles one above the other, each over its token counts
        fig = Figure(figsize=(NARROW_DESIGN, 8.4), layout="constrained")
        col = fig.subplots(4, 1, height_ratios=(4, 1, 4, 1))
        for upper, lower in ((col[0], col[1]), (col[2], col[3])):
            upper.sharex(lower)
        axes = np.array([[col[0], col[2]], [col[1], col[3]]])
    else:
        fig = Figure(figsize=(12, 6.2), layout="constrained")
        axes = fig.subplots(2, 2, sharex=True, height_ratios=(4, 1))
    longest = max(len(p) for _, p in views)
    for (name, p), c in zip(views, _palette(len(views))):
        x = np.arange(len(p))
        axes[0, 0].plot(x, np.where(p.absmax > 0, p.absmax, np.nan), color=c, lw=0.9, label=labels[index[name]])
        axes[0, 1].plot(x, np.where(p.std > 0, p.std, np.nan), color=c, lw=0.9)
    what = axis_label.split(" (")[0]
    if out.narrow:  # below the panels: beside them it would take a third of the column
        fig.legend(*axes[0, 0].get_legend_handles_labels(), fontsize=7, title=what, title_fontsize=7,
                   loc="outside lower center", ncol=min(len(views), 7))
    else:
        fig.legend(*axes[0, 0].get_legend_handles_labels(), fontsize=7, title=what, title_fontsize=7,
                   loc="outside right upper")
    if opts.get("layers"):
        _note(fig, f"{len(views)} of {len(every)} sites, as chosen (--layers)")
    elif len(views) < len(every):
        _note(fig, f"{len(views)} of {len(every)} sites: evenly spaced with the first and last, and the one "
                   "with the largest max |activation|; choose the sites with --layers")
    # one count says how noisy each position's numbers are: one bar where every site saw the same
    # tokens, else one outline per site (an encoder's frames and its decoder's tokens, two towers)
    tokens = views[0][1].tokens
    same = all(len(p.tokens) == len(tokens) and np.array_equal(p.tokens, tokens) for _, p in views)
    if not same:
        _note(fig, "the sites saw other tokens (several stacks or grids): the token counts are one outline per site")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for j, (what, short) in enumerate((("max |activation|", "max |x| (log)"),
                                       ("std over channels and tokens", "std (log)"))):
        ax, low = axes[0, j], axes[1, j]
        ax.set_yscale("log")
        ax.set_title(f"{what} per position", fontsize=9)
        ax.set_ylabel(short, fontsize=8)
        ax.grid(alpha=0.25, lw=0.5)
        ax.tick_params(labelsize=7)
        if same:
            low.stairs(tokens, np.arange(len(tokens) + 1) - 0.5, fill=True, color="0.6")
        else:
            for (_, p), c in zip(views, _palette(len(views))):
                low.stairs(p.tokens, np.arange(len(p.tokens) + 1) - 0.5, color=c, lw=0.9)
        low.set_ylim(bottom=0)
        low.set_ylabel("tokens", fontsize=8)
        low.tick_params(labelsize=7)
        low.grid(alpha=0.25, lw=0.5)
        # symlog x: position 0 (the first-token effect) and the first few positions get room of
        # their own, and a 4096-token context still fits
        low.set_xscale("symlog", linthresh=1, linscale=0.4)
        low.set_xlim(-0.5, max(longest, 2))
        # 1, 2, 5 x 10**k: the default symlog ticks are decades, 0, 1 and 10 for 50 positions
        low.xaxis.set_major_locator(FixedLocator([0.0, *[m * 10.0**e for e in range(int(math.log10(max(longest, 2))) + 1)
                                                         for m in (1, 2, 5) if m * 10.0**e <= longest]]))
        low.xaxis.set_major_formatter(plain)
        for a in (ax, low):  # positions are whole numbers: no end label such as -0.5 (shared x)
            a.xaxis.probe_names = True
        low.set_xlabel("token position (log scale past 1)", fontsize=8)
    fig.suptitle(f"Per-position profile over every real token — {_title(run)}", fontsize=10)
    _note(fig, "skip_first does not apply to the per-position statistics")
    return [out.save(fig, "positions.png")]


# --------------------------------------------------------------------------------- steps
def _steps(run: Run, out: _Out, opts: dict) -> list[str]:
    _, Figure, colors, cm = _mpl()
    names = _sites_with(run, "moments")
    if not names:
        raise _missing("steps", "moments", run)
    # one Run per stored row rather than run.at(step): step labels need not be unique or sorted,
    # and a window that saw no token (e.g. committed at exit right after a snapshot) is left out
    from ..results.run import Run

    windows = []
    for row in run.rows:
        window = Run(run.meta, [row], run.path)
        if any(window[n].tokens for n in names):
            windows.append((int(row.step), window))
    windows.sort(key=lambda w: w[0])
    if len(windows) < 2:
        got = f"{len(windows)} window" + ("" if len(windows) == 1 else "s")
        raise _Missing(f"plot kind 'steps' needs two or more windows with tokens; this run has {got}; capture "
                       "with probe.capture(..., every=N) (a window per N forwards) or call run.snapshot(step) in "
                       "the capture block")
    steps = [w[0] for w in windows]
    table = {n: np.full((3, len(steps)), np.nan) for n in names}
    for j, (_, window) in enumerate(windows):
        for n in names:
            s = window[n]
            table[n][:, j] = (s.std, s.absmax, s.kurtosis)
    _, axis_label = _labels(run.sites)
    index = {n: i for i, n in enumerate(run.sites)}
    cmap = _cmap(CMAP_DEPTH)
    fig = Figure(figsize=(NARROW_DESIGN, 8.0) if out.narrow else (13, 4.2), layout="constrained")
    axes = fig.subplots(3, 1, sharex=True) if out.narrow else fig.subplots(1, 3)
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
        if not out.narrow or ax is axes[-1]:  # stacked panels share the bottom one's x axis
            ax.set_xlabel("step (window label)", fontsize=8)
        ax.grid(alpha=0.25, lw=0.5)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"Per-window statistics over {len(steps)} windows — {_title(run)}", fontsize=10)
    return [out.save(fig, "steps.png")]


def _timeline(run: Run, out: _Out, opts: dict) -> list[str]:
    from .timeline import plot_timeline, timeline  # the figure lives with its rules

    try:
        fig = plot_timeline(timeline(run), title=_title(run), columns=2 if out.narrow else None)
    except ProbeError as err:
        raise _Missing(str(err)) from err
    return [out.save(fig, "timeline.png")]


def _as_run(run: Any) -> Run:
    """A :class:`Run`, also from a finished ``probe.capture(...)`` (its ``.result``)."""
    from ..results.run import Run

    if isinstance(run, Run):
        return run
    result = getattr(run, "result", None)
    if isinstance(result, Run):
        return result
    if hasattr(run, "result"):
        raise ProbeError("the capture has no results yet; expected an exited capture; "
                         "plot after the with-block, or call run.snapshot() and plot probe.load(out)")
    raise ProbeError(f"run must be a probe Run; got {type(run).__name__}; pass probe.load('run.h5')")


def _experts(run: Run, out: _Out, opts: dict) -> list[str]:  # the figure lives in present/experts.py
    from .experts import draw_experts

    return draw_experts(run, out, opts, _mpl(), _Missing, _title(run))


_DRAW = {"histograms": _histograms, "depth": _depth, "cross": _cross, "scatter": _scatter,
         "channels": _channels, "positions": _positions, "steps": _steps, "timeline": _timeline,
         "experts": _experts}


def parse_layers(run: Run, text: str | Sequence[str]) -> list[str]:
    """Site names from ``"0,5,10-12"``, ``"all"``, site names, or a list of those.

    Numbers are the layer numbers the tables show (``5`` is ``hidden_states.5``; for other sites
    the index in ``run.sites``); ``a-b`` is inclusive.

    Args:
        run: the run whose sites are meant.
        text: the selection (the CLI's ``--layers``).

    Returns:
        Site names, in the order chosen, without repeats.

    Raises:
        ProbeError: an unknown site or layer, an empty selection.

    Example:
        >>> parse_layers(run, "0-1"), len(parse_layers(run, "all"))
        (['hidden_states.0', 'hidden_states.1'], 3)
    """
    from .report import resolve_site

    parts = [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if str(p).strip()]
    out: list[str] = []
    for part in parts:
        if part == "all":
            out += run.sites
            continue
        a, dash, b = part.partition("-")
        if dash and a.strip().isdigit() and b.strip().isdigit():
            if int(a) > int(b):
                raise ProbeError(f"--layers {part}: a reversed range; expected low-high; pass e.g. "
                                 f"--layers {b.strip()}-{a.strip()}")
            out += [resolve_site(run, str(k), "--layers") for k in range(int(a), int(b) + 1)]
        else:
            out.append(resolve_site(run, part, "--layers"))
    out = list(dict.fromkeys(out))
    if not out:
        raise ProbeError(f"--layers: expected layer numbers, ranges, names or 'all', got {text!r}; "
                         "pass e.g. --layers 0,5,10-12")
    return sorted(out, key=run.sites.index)


def _plan(run, kinds) -> tuple[Run, list[str], bool]:
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
    if not asked and not any(name.endswith((":router", ":experts")) for name in run.sites):
        chosen.remove("experts")  # a dense model's run: that figure was never to be expected
    return run, [k for k in KINDS if k in chosen], asked


def _draw(run, kinds, out: _Out, layers, shared: bool, progress, linear: bool = False,
          skipped: Callable[[str, str], None] | None = None) -> list[str]:
    run, chosen, asked = _plan(run, kinds)
    opts = {"layers": parse_layers(run, layers) if layers is not None else None, "shared": shared, "linear": linear}
    paths: list[str] = []
    for i, kind in enumerate(chosen, 1):
        if progress is not None:
            progress(kind, i, len(chosen))
        try:
            paths += _DRAW[kind](run, out, opts)
        except _Missing as err:
            if asked:
                raise
            if skipped is not None:
                skipped(kind, str(err))
    return paths


def _check_output(fmt: str, dpi: int | None, size: str) -> None:
    if fmt not in FORMATS:
        raise ProbeError(f"format (--format): expected one of {', '.join(FORMATS)}, got {fmt!r}; pass e.g. --format pdf")
    if dpi is not None and not (isinstance(dpi, int) and 10 <= dpi <= 1200):
        raise ProbeError(f"dpi (--dpi): expected an integer from 10 to 1200, got {dpi!r}; pass e.g. --dpi 300")
    if size not in SIZES:
        raise ProbeError(f"size (--size): expected one of {', '.join(SIZES)}, got {size!r}; pass e.g. --size column")


# ---------------------------------------------------------------------------------- public
def plot_run(run: Run, out_dir: str | os.PathLike, kinds: Sequence[Kind] | Kind | None = None, *,
             layers: str | Sequence[str] | None = None, shared: bool = False, linear: bool = False,
             format: Format = "png", dpi: int | None = None, size: Size = "screen",
             titles: bool = True, progress: Callable[[str, int, int], None] | None = None,
             skipped: Callable[[str, str], None] | None = None,
             caption: Callable[[str, str], None] | None = None) -> list[str]:
    """Draw a run's figures as files in ``out_dir`` (created if missing).

    Args:
        run: a :class:`probe.results.run.Run` (``probe.load(path)``, or a capture after its block).
        out_dir: folder for the files; existing files of the same name are replaced.
        kinds: names from :data:`KINDS`; ``None`` draws every kind the run has data for and
            silently skips the rest (a run captured with ``stats=("moments",)`` gets
            ``channels_absmax.png`` only).
        layers: the sites of ``hist_overlay.png`` and the scatter figures, as for
            :func:`parse_layers` (``"all"`` for every site); default: about six evenly spread
            for the overlay; first, middle, last and the heaviest-tailed for the scatter. At a
            print size, ``hist_grid.png`` holds at most as many rows as fit :data:`COLUMN_HEIGHT`
            at ``"column"`` (21 panels, leaving a column room for its caption) or
            :data:`PAGE_HEIGHT` at ``"page"``: past that, evenly spaced sites of ``layers`` (default:
            of all), first and last included, and a caption saying so.
        shared: draw every ``hist_grid.png`` panel on one shared x and y axis.
        linear: histograms on a linear value axis with equal-width bins (default: asinh).
        format: ``"png"``, ``"pdf"`` or ``"svg"`` (:data:`FORMATS`); the files' suffix.
        dpi: pixels per inch of PNGs (and of the rasterized scatter clouds and heat maps in PDF/SVG);
            default 110 at ``size="screen"``, 300 (:data:`PRINT_DPI`) at the print sizes.
        size: ``"screen"`` (each figure's own size), ``"column"`` (3.5 in wide, a paper's
            column), ``"page"`` (7 in) or ``"slide"`` (13.33 in, 16:9): :data:`SIZES`.
        titles: draw each figure's title; ``False`` (``probe plot --no-title``) leaves it out for a
            paper, whose caption says it: the title's text then opens the file's caption.
        progress: called as ``progress(kind, i, n)`` before each kind is drawn.
        skipped: called as ``skipped(kind, why)`` for each kind left out because the run lacks
            its data (``kinds=None`` only; a kind asked for by name raises instead): e.g.
            ``steps`` on a run with one window, ``why`` naming the fix (``every=``).
        caption: called as ``caption(path, text)`` for a file with a caption, the text a figure
            leaves to it (:func:`figures` leaves it on the figure as ``fig.probe_caption``): which
            sites a figure of a subset shows and the option that chooses them (``--layers``),
            which tokens were kept (``skip_first``), ``hist_overlay``'s :data:`ASINH_NOTE` at a
            column's width (``size="column"``), where its five lines would be as tall as the plot,
            ``hist_grid``'s list of the sites it left out to fit the height, and with
            ``titles=False`` the title.

    Returns:
        The paths written, in the order of :data:`KINDS`.

    Raises:
        ProbeError: an unknown kind or layer; a kind asked for by name whose statistics the run
            lacks (``"steps"`` also needs two or more windows); ``out_dir`` an existing file;
            an unknown format or size, a dpi outside 10..1200; matplotlib missing.

    Example:
        >>> [os.path.basename(p) for p in plot_run(run, os.path.join(tmp, "figures"), kinds=["histograms"])]
        ['hist_grid.png', 'hist_overlay.png']
        >>> [os.path.basename(p) for p in plot_run(run, tmp, kinds="depth", format="svg", size="column")]
        ['depth.svg']
    """
    _check_output(format, dpi, size)
    _plan(run, kinds)
    out = os.fspath(out_dir)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ProbeError(f"-o {out}: is an existing file; expected a folder for the figures; "
                         "pass a folder name (created if missing)")
    made = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    sink = _Out(out, fmt=format, dpi=dpi or (DPI if size == "screen" else PRINT_DPI), size=size)
    sink.caption = caption
    sink.titles = bool(titles)
    try:
        return _draw(run, kinds, sink, layers, shared, progress, linear, skipped)
    except BaseException:
        if made:  # a folder this call made and nothing was drawn into: not left behind
            try:
                os.rmdir(out)
            except OSError:
                pass
        raise


def figures(run: Run, kinds: Sequence[Kind] | Kind | None = None, *, layers: str | Sequence[str] | None = None,
            shared: bool = False, linear: bool = False, size: Size = "screen",
            notes: bool = True, titles: bool = True) -> dict[str, Any]:
    """The figures :func:`plot_run` would write, as ``{file name: matplotlib Figure}``, unsaved.

    Same arguments and errors as :func:`plot_run`; for inspecting what is drawn, or saving in
    another format (``fig.savefig("hist_grid.svg")``). ``notes=False`` leaves every reading note
    (``hist_overlay``'s :data:`ASINH_NOTE`) out of the figure, as ``fig.probe_caption``, for a
    caption that carries it (the HTML report's); at a column's width it is left out anyway.
    ``titles=False`` leaves each title out too, its text the caption's first sentence.

    Returns:
        ``{file name: matplotlib.figure.Figure}`` in the order of :data:`KINDS`.

    Example:
        >>> figs = figures(run, kinds=["cross"])
        >>> sorted(figs)[:1], figs[sorted(figs)[0]].savefig(os.path.join(tmp, "cross.svg"))
        (['cross_cov.png'], None)
    """
    _check_output("png", None, size)
    out = _Out(None, keep=True, size=size)
    out.notes_apart = not notes
    out.titles = bool(titles)
    _draw(run, kinds, out, layers, shared, None, linear)
    return dict(out.kept or {})


def plot_diff(a: Run, b: Run, path: str | os.PathLike, *, dpi: int | None = None) -> str:
    """Draw the per-site shift from run ``a`` to run ``b`` (see :func:`probe.present.report.diff`) to ``path``.

    Up to three panels, one bar per site present in both runs: the std ratio ``std_b / std_a``
    (log scale, 1 = unchanged); the Jensen–Shannon divergence between the two bucket histograms
    (bits, 0 = identical, 1 = disjoint; needs histograms in both); and the shift of the q0.001,
    q0.5 and q0.999 quantiles in units of ``std_a``, so that layers of very different scale share
    one axis, each bar with the interval the histogram buckets bound the exact shift to as its
    error bar.

    Args:
        a, b: the runs to compare; ``a`` is the reference.
        path: the file to write (``.png``, ``.pdf`` or ``.svg``, by its suffix; another suffix
            writes a PNG); its folder is created if missing.
        dpi: pixels per inch of a PNG (default 110).

    Returns:
        ``path`` as a string.

    Raises:
        ProbeError: the runs share no site; matplotlib missing.

    Example:
        >>> os.path.basename(plot_diff(run, run, os.path.join(tmp, "diff.png")))
        'diff.png'
    """
    _check_output("png", dpi, "screen")
    fig = _diff_figure(_as_run(a), _as_run(b))
    path = os.fspath(path)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    suffix = os.path.splitext(path)[1].lower().lstrip(".")
    return _save(fig, path, suffix if suffix in FORMATS else "png", dpi or DPI)


def _diff_figure(a: Run, b: Run):
    from .report import DIFF_QUANTILES, diff, diff_warnings

    _, Figure, colors, cm = _mpl()
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    rows = diff(a, b)  # raises when the runs share no site
    names = [r["site"] for r in rows]
    labels, axis_label = _labels(names)
    x = np.arange(len(rows))

    def col(key: str) -> np.ndarray:
        return np.array([np.nan if r.get(key) is None else float(r[key]) for r in rows])

    ratio, js = col("std_ratio"), col("js")
    std_a = np.array([a[n].std for n in names], dtype=np.float64)
    qs = tuple(str(q) for q in DIFF_QUANTILES)  # the quantiles of probe diff's table
    shift = {q: np.array([np.nan if (r.get("quantile_shift") or {}).get(q) is None else r["quantile_shift"][q]
                          for r in rows], dtype=np.float64) for q in qs}
    bounds = {q: np.array([[np.nan, np.nan] if (r.get("quantile_shift_bounds") or {}).get(q) is None
                           else [np.nan if v is None else v for v in r["quantile_shift_bounds"][q]] for r in rows],
                          dtype=np.float64).reshape(-1, 2) for q in qs}
    with np.errstate(all="ignore"):
        shift = {q: np.where(std_a > 0, v / std_a, np.nan) for q, v in shift.items()}
        bounds = {q: np.where(std_a[:, None] > 0, v / std_a[:, None], np.nan) for q, v in bounds.items()}
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
            # a symmetric view: a tick on either side of 1, however one-sided the bars
            reach = float(np.max(np.abs(logr))) if logr.size and np.max(np.abs(logr)) > 0 else np.log10(1.01)
            ax.set_ylim(-1.15 * reach, 1.15 * reach)
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
                # error bars: the interval the buckets bound the exact shift to (it holds the bar)
                err = np.abs(np.stack([shift[q] - bounds[q][:, 0], bounds[q][:, 1] - shift[q]]))
                ax.bar(x + (k - 1) * width, shift[q], width=width, color=c, label=f"q{q}",
                       yerr=np.nan_to_num(err), error_kw={"elinewidth": 0.8, "capsize": 1.5, "ecolor": "0.15"})
            ax.axhline(0, color="0.3", lw=0.8)
            ax.legend(fontsize=7, ncol=3, loc="best")
            ax.set_ylabel("(q_b − q_a) / std_a", fontsize=8)
            ax.set_title("quantile shift in units of run a's std (error bar: where the exact shift lies, "
                         "from the histogram buckets)", fontsize=9)
        ax.grid(axis="y", alpha=0.25, lw=0.5)
        ax.tick_params(labelsize=7)
    _index_ticks(axes[-1].xaxis, labels, most=48, fontsize=7)
    axes[-1].set_xlabel(axis_label, fontsize=8)
    axes[-1].set_xlim(-0.6, len(rows) - 0.4)
    title = f"Shift from a = {a.path or 'run a'} to b = {b.path or 'run b'}"
    caveats = diff_warnings(a, b)
    if caveats:  # the figure travels without the terminal's warnings: it carries them itself
        import textwrap

        room = int(0.9 * fig.get_size_inches()[0] * 72 / (0.55 * 8))
        lines = [textwrap.fill(f"caveat: {c}", room) for c in caveats]
        fig.suptitle(title + "\n" + "\n".join(lines), fontsize=8, color="#8a1c1c")
    else:
        fig.suptitle(title, fontsize=10)
    _declutter(fig)
    _label_ends(fig)
    return fig
