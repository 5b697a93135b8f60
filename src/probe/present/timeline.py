"""A run's windows as time series, the steps where a series jumps, and what caused each jump.

Recipe::

    run = probe.load("train.h5")          # captured with every=1 (or a schedule) during training
    tl = timeline(run)
    for e in tl.events:                   # one per step where some site's series jumped
        print(e.step, e.site, e.series, e.channel, e.position, e.token, e.score)
    tl.first_nonfinite                    # the first NaN/Inf: step, site, position (and token)

**Series** (one value per site per window, windows in step order; ``probe timeline`` and
``probe watch`` read them): ``absmax``, ``std`` and excess ``kurtosis`` of the kept values
(the ``moments`` statistic); ``norm_p50``, ``norm_p99`` and ``norm_max`` of the per-token L2
norms (``norm``); ``nonfinite``, the NaN and ±Inf values over every real token (``position``,
else the kept values of ``moments``); ``grad_*`` the same of the site's gradient; ``maxlogit``, at
an attention site (``sites="attention"``), the window's largest MaxLogit over its heads (the
series QK-Clip keeps below a threshold), with ``nonfinite`` its query rows left out. A site
without the statistic has NaN there. An event at an attention site names the head as its
``channel`` and the MaxLogit's query position, row and query token.

**Jump score** (robust z-score against the trailing window). For a series ``x`` at window
``t``, with ``H = x[t-W : t]`` the finite values of the previous ``W`` windows::

    z_t = (x_t - median(H)) / max(1.4826 · MAD(H), floor · |median(H)|, 1e-30)

``MAD(H) = median(|H - median(H)|)``; ``1.4826 · MAD`` estimates the standard deviation of
normal noise (Rousseeuw & Croux 1993), and the median/MAD pair ignores earlier spikes in ``H``
(Iglewicz & Hoaglin 1993, the "modified z-score"). ``floor`` (default 0.1) keeps a flat history
from turning a small change into a huge score: a series must rise by at least
``threshold · floor`` of its median (100 %, a doubling, by default) to count. ``z_t`` is NaN while
``H`` holds fewer than ``min_history`` values. A **jump** is ``z_t > threshold`` (rises only: a
spike is a rise of absmax, kurtosis or norm; a collapse is not flagged). Defaults:
:data:`WINDOW` = 16, :data:`MIN_HISTORY` = 8, :data:`THRESHOLD` = 10, :data:`FLOOR` = 0.1. The
threshold is high because absmax and kurtosis are extremes of a window, heavy-tailed from window
to window: over the first 19 training steps of a 4-layer Llama (width 32, 2×12 tokens a step)
the largest score of plain noise was 6.9 with a window of 16 (11.2 with 8), and after a planted
spike had shaken the weights, an absmax 69 % above its median scored 12.7 with a floor of 0.05;
one token's channel raised by 200 standard deviations scored in the thousands.

**Events.** One per window where any scored series jumps, placed at the **first site in model
order** (``run.sites``) that jumped: its series with the highest score there, and the channel,
position, row and token of that window's largest top-``k`` entry at a kept position
(``position >= skip_first``; the largest kept value's location, ``absmax_at``, when the run has
no ``topk``). ``sites`` lists every site that jumped in that window, in model order.

**First non-finite.** The first window (in step order) where any site holds a NaN or Inf, at
the first such site in model order; its position is the lowest position with a non-finite value
(from ``position``), its row, channel and token from the ``nonfinite`` statistic when the run
holds it (else ``-1``: the other statistics record no location for non-finite values).

Nothing here imports torch or matplotlib; :func:`plot_timeline` imports matplotlib when called.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ProbeError

if TYPE_CHECKING:
    from ..results.run import Run, SiteView

__all__ = ["Event", "Timeline", "timeline", "robust_scores", "print_timeline", "window_table",
           "print_window", "plot_timeline", "SERIES", "SCORED", "WINDOW", "MIN_HISTORY", "THRESHOLD", "FLOOR"]

#: previous windows a score is measured against
WINDOW = 16
#: fewest finite previous values a score needs (earlier windows are not scored)
MIN_HISTORY = 8
#: a score above this is a jump
THRESHOLD = 10.0
#: the smallest noise scale, as a share of the trailing median's magnitude
FLOOR = 0.1
#: the normal-consistency constant of the MAD: 1 / Φ⁻¹(3/4)
MAD_NORMAL = 1.4826
#: the suffix of a site's gradient (``capture(grads=True)``)
GRAD = "@grad"

#: every series, per site per window
SERIES: tuple[str, ...] = ("absmax", "std", "kurtosis", "norm_p50", "norm_p99", "norm_max", "nonfinite",
                           "grad_absmax", "grad_std", "grad_norm_p99", "maxlogit")
#: the series whose jumps make events (``nonfinite`` has its own rule: the first non-zero)
SCORED: tuple[str, ...] = ("absmax", "std", "kurtosis", "norm_p99", "norm_max", "grad_absmax", "grad_norm_p99",
                           "maxlogit")


@dataclass(frozen=True)
class Event:
    """One step where a series jumped (or the first non-finite value), and what was responsible.

    Attributes:
        step: the window's label (``run.steps``).
        site: the first site, in model order, where it shows.
        layer: that site's layer (``hf_index``; its index in ``run.sites`` when it has none).
        series: the series that jumped there (``"nonfinite"`` for the first NaN/Inf).
        score: the robust z-score (see the module); ``None`` for the first non-finite.
        value: the series' value in that window (the non-finite count for ``"nonfinite"``).
        baseline: the median of the trailing window (``None`` for ``"nonfinite"``).
        channel, position, row, token: where the window's largest kept top-``k`` entry sits
            (``-1`` unknown); for ``"nonfinite"``, the first non-finite value's.
        magnitude: that entry's value (activation units; ``None`` for ``"nonfinite"``).
        sites: every site that jumped in the window, in model order.
    """

    step: int
    site: str
    layer: int
    series: str
    score: float | None
    value: float
    baseline: float | None
    channel: int
    position: int
    row: int
    token: int
    magnitude: float | None = None
    sites: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The event as plain JSON-ready values (non-finite floats as ``None``)."""
        d = asdict(self)
        d["sites"] = list(self.sites)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


@dataclass
class Timeline:
    """A run's per-window series and the events found in them (see the module for the rules).

    Attributes:
        steps: ``[T]`` window labels, in step order (windows without tokens left out).
        sites: the sites, in model order.
        series: ``{series: {site: [T] float64}}`` (NaN where a site lacks the statistic).
        scores: ``{series: {site: [T] float64}}`` robust z-scores of :data:`SCORED` series.
        events: the jumps, in step order.
        first_nonfinite: the first NaN/Inf, or ``None``.
        window, min_history, threshold, floor: the rule's parameters.
    """

    steps: np.ndarray
    sites: list[str]
    series: dict[str, dict[str, np.ndarray]]
    scores: dict[str, dict[str, np.ndarray]]
    events: list[Event] = field(default_factory=list)
    first_nonfinite: Event | None = None
    window: int = WINDOW
    min_history: int = MIN_HISTORY
    threshold: float = THRESHOLD
    floor: float = FLOOR

    def to_list(self) -> list[dict[str, Any]]:
        """The events as dicts (``probe timeline --json``): the jumps in step order, then the
        first non-finite value as an event of series ``"nonfinite"`` (placed in step order)."""
        events = list(self.events) + ([self.first_nonfinite] if self.first_nonfinite else [])
        events.sort(key=lambda e: (e.step, e.series == "nonfinite"))
        return [e.to_dict() for e in events]


def robust_scores(x: np.ndarray, window: int = WINDOW, min_history: int = MIN_HISTORY,
                  floor: float = FLOOR) -> np.ndarray:
    """The robust z-score of each value of ``x`` against the ``window`` values before it.

    ``z_t = (x_t - median(H)) / max(1.4826 · MAD(H), floor · |median(H)|, 1e-30)`` over the
    finite values ``H`` of ``x[t - window : t]`` (see the module docstring for the sources).

    Args:
        x: ``[T]`` a series in step order (NaN: no value).
        window: previous values each score is measured against (>= 1).
        min_history: fewest finite previous values a score needs (>= 1); before that, NaN.
        floor: the smallest noise scale, as a share of ``|median(H)|`` (>= 0).

    Returns:
        ``[T]`` float64 scores; NaN where ``x_t`` is not finite or the history is too short.

    Raises:
        ProbeError: a parameter out of range.

    Example:
        >>> z = robust_scores(np.array([1.0, 1.1, 0.9, 1.0, 1.05, 5.0]), window=5, min_history=3)
        >>> bool(np.isnan(z[:3]).all()), round(float(z[-1]), 1)
        (True, 40.0)
    """
    if window < 1 or min_history < 1 or min_history > window or not floor >= 0:
        raise ProbeError(f"timeline: expected window >= min_history >= 1 and floor >= 0; got window={window}, "
                         f"min_history={min_history}, floor={floor}; pass e.g. window=8, min_history=4")
    x = np.asarray(x, dtype=np.float64)
    out = np.full(x.shape, np.nan)
    for t in range(len(x)):
        h = x[max(0, t - window):t]
        h = h[np.isfinite(h)]
        if len(h) < min_history or not np.isfinite(x[t]):
            continue
        med = float(np.median(h))
        scale = max(MAD_NORMAL * float(np.median(np.abs(h - med))), floor * abs(med), 1e-30)
        out[t] = (x[t] - med) / scale
    return out


def _values(view: SiteView, dim: int) -> dict[str, float]:
    """One window's series values at one site."""
    nan = float("nan")
    out = dict.fromkeys(SERIES, nan)
    if view.has("moments") and view.count:
        out.update(absmax=view.absmax, std=view.std, kurtosis=view.kurtosis)
    if view.has("moments"):
        out["nonfinite"] = float(view.nan + view.posinf + view.neginf)
    if view.has("position"):
        p = view.state("position")
        out["nonfinite"] = max(out["nonfinite"] if math.isfinite(out["nonfinite"]) else 0.0,
                               float((p["tokens"] * dim - p["n"]).sum()))
    if view.has("norm") and view.norm.count:
        q = view.norm.quantile([0.5, 0.99])
        out.update(norm_p50=float(q[0]), norm_p99=float(q[1]), norm_max=view.norm.max)
    if view.has("attention") and view.attention.tokens:  # an attention site: the largest MaxLogit over heads
        out["maxlogit"] = view.attention.max
        out["nonfinite"] = float(view.attention.nonfinite.sum())
    grad = getattr(view, "grad", None)  # activation gradients, when the run recorded them
    if grad is not None and grad.has("moments") and grad.count:
        out.update(grad_absmax=grad.absmax, grad_std=grad.std)
        if grad.has("norm") and grad.norm.count:
            out["grad_norm_p99"] = float(grad.norm.quantile(0.99))
    return out


def _culprit(view: SiteView, skip_first: int) -> tuple[int, int, int, int, float | None]:
    """(channel, position, row, token, value) of the window's largest kept top-k entry; at an
    attention site, (head, query position, row, query token, MaxLogit) of its largest MaxLogit."""
    if view.has("attention") and view.attention.tokens:
        att = view.attention
        h = att.argmax_head
        row, pos, _, tok = (int(v) for v in att.maxlogit_at[h])
        return h, pos, row, tok, att.max
    if view.has("topk"):
        t = view.topk
        kept = t[t["position"] >= skip_first] if len(t) else t
        if len(kept):
            e = kept[int(np.argmax(np.abs(kept["value"])))]
            return int(e["channel"]), int(e["position"]), int(e["row"]), int(e["token"]), float(e["value"])
    if view.has("moments") and view.count:
        a = view.absmax_at
        return a["channel"], a["position"], a["row"], a["token"], view.absmax
    return -1, -1, -1, -1, None


def _nonfinite_at(view: SiteView, dim: int) -> tuple[int, int, int, int]:
    """(channel, position, row, token) of a window's first non-finite value at one site."""
    if view.has("nonfinite"):
        s = view.state("nonfinite")
        if int(s["count"]) > 0:
            row, pos, ch, tok = (int(v) for v in s["first_at"])
            return ch, pos, row, tok
    if view.has("position"):
        p = view.state("position")
        bad = np.flatnonzero(p["tokens"] * dim - p["n"] > 0)
        if len(bad):
            return -1, int(bad[0]), -1, -1
    return -1, -1, -1, -1


def _window_views(run: Run, last: int | None = None) -> list[tuple[int, dict[str, SiteView]]]:
    """(step, {site: that window's view}) for each window with tokens, in step order."""
    from ..results.run import SiteView

    info = {s["name"]: s for s in run.meta.get("sites", [])}
    rows = run.rows
    first = 0 if last is None else max(0, len(rows) - last)
    out = []
    for r in range(first, len(rows)):
        row = rows[r]
        views = {n: SiteView(n, info[n], row.sites.get(n, {}), run.meta) for n in run.sites}
        for n, view in views.items():  # a site's gradient (capture(grads=True)) is its series, not a site
            view.grad = views.get(f"{n}{GRAD}")
        views = {n: v for n, v in views.items() if not n.endswith(GRAD)}
        if any(v.tokens or (v.has("position") and int(v.state("position")["tokens"].sum()))
               or (v.has("attention") and v.attention.tokens) for v in views.values()):
            out.append((int(row.step), views))
    out.sort(key=lambda w: w[0])  # stable: equal labels keep commit order
    return out


def _dim(run: Run, name: str) -> int:
    view = run[name]
    if view.has("moments"):
        return len(view.state("moments")["n"])
    if view.has("norm"):
        return view.norm.dim
    return 0


def _layer(run: Run, index: int) -> int:
    info = run.meta.get("sites", [])[index]
    hf = info.get("hf_index")
    return int(hf) if isinstance(hf, int) and not isinstance(hf, bool) else index


def timeline(run: Run, *, window: int = WINDOW, min_history: int = MIN_HISTORY, threshold: float = THRESHOLD,
             floor: float = FLOOR, last: int | None = None) -> Timeline:
    """Per-site series over a run's windows, the steps where they jump, and the first NaN/Inf.

    Args:
        run: a :class:`probe.results.run.Run` with one window per step (``every=1``, a
            ``schedule`` or ``ProbeCallback``); a one-window run gives series of length 1 and
            no event.
        window, min_history, floor: the score's parameters (:func:`robust_scores`).
        threshold: a score above it is a jump (> 0).
        last: read only the last ``last`` windows (``probe watch``); ``None`` reads all.

    Returns:
        A :class:`Timeline`.

    Raises:
        ProbeError: a parameter out of range.

    Example:
        >>> tl = timeline(run)
        >>> tl.sites == run.sites, len(tl.steps), tl.events
        (True, 1, [])
    """
    if not threshold > 0:
        raise ProbeError(f"timeline: threshold must be > 0; got {threshold!r}; pass e.g. threshold=6")
    robust_scores(np.zeros(0), window, min_history, floor)  # checks the parameters
    skip = int(run.meta.get("skip_first") or 0)
    sites = [n for n in run.sites if not n.endswith(GRAD)]
    dims = {n: _dim(run, n) for n in sites}
    windows = _window_views(run, last)
    steps = np.array([w[0] for w in windows], dtype=np.int64)
    series = {k: {n: np.full(len(windows), np.nan) for n in sites} for k in SERIES}
    for t, (_, views) in enumerate(windows):
        for n in sites:
            for k, v in _values(views[n], dims[n]).items():
                series[k][n][t] = v
    scores = {k: {n: robust_scores(series[k][n], window, min_history, floor) for n in sites} for k in SCORED}
    tl = Timeline(steps, sites, series, scores, window=window, min_history=min_history, threshold=threshold,
                  floor=floor)
    for t, (step, views) in enumerate(windows):
        jumped = [i for i, n in enumerate(sites)
                  if any(scores[k][n][t] > threshold for k in SCORED)]
        if not jumped:
            continue
        i = jumped[0]
        n = sites[i]
        best = max((k for k in SCORED if scores[k][n][t] > threshold), key=lambda k: scores[k][n][t])
        h = series[best][n][max(0, t - window):t]
        h = h[np.isfinite(h)]
        ch, pos, row, tok, mag = _culprit(views[n], skip)
        tl.events.append(Event(step, n, _layer(run, i), best, float(scores[best][n][t]), float(series[best][n][t]),
                               float(np.median(h)), ch, pos, row, tok, mag, tuple(sites[j] for j in jumped)))
    for t, (step, views) in enumerate(windows):
        bad = [i for i, n in enumerate(sites) if series["nonfinite"][n][t] > 0]
        if bad:
            n = sites[bad[0]]
            ch, pos, row, tok = _nonfinite_at(views[n], dims[n])
            tl.first_nonfinite = Event(step, n, _layer(run, bad[0]), "nonfinite", None,
                                       float(series["nonfinite"][n][t]), None, ch, pos, row, tok, None,
                                       tuple(sites[j] for j in bad))
            break
    return tl


def _fmt(v: float | None) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:.4g}"


def _where(e: Event) -> str:
    return " ".join(f"{k} {v}" for k, v in (("ch", e.channel), ("pos", e.position), ("row", e.row),
                                            ("token", e.token)) if v >= 0) or "–"


def print_timeline(tl: Timeline, console=None) -> None:
    """``probe timeline RUN``: the events as a rich table, then the first non-finite value."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    span = f"steps {tl.steps[0]}..{tl.steps[-1]}" if len(tl.steps) else "no windows"
    console.print(f"[bold]{len(tl.steps)} windows[/] ({span}), {len(tl.sites)} sites; jump: robust z > "
                  f"{tl.threshold:g} against the previous {tl.window} windows (median/MAD, floor "
                  f"{tl.floor:g}·|median|)")
    if tl.events:
        table = Table(title="jumps (first site in model order)")
        for col in ("step", "site", "layer", "series", "value", "median before", "z", "where", "|x|", "also at"):
            table.add_column(col, justify="left" if col in ("site", "series", "where") else "right")
        for e in tl.events:
            table.add_row(str(e.step), e.site, str(e.layer), e.series, _fmt(e.value), _fmt(e.baseline),
                          _fmt(e.score), _where(e), _fmt(abs(e.magnitude) if e.magnitude is not None else None),
                          str(len(e.sites) - 1))
        console.print(table)
    else:
        console.print("no jumps")
    bad = tl.first_nonfinite
    if bad is None:
        console.print("no NaN or Inf")
    else:
        console.print(f"[red]first NaN/Inf[/]: step {bad.step} at {bad.site} (layer {bad.layer}): {int(bad.value)} "
                      f"non-finite value(s); {_where(bad)}; {len(bad.sites)} site(s) in that window")


def window_table(tl: Timeline, t: int = -1) -> list[dict[str, Any]]:
    """One row per site of window ``t`` (default the latest): the series and the largest score.

    Returns:
        ``[{"site", "step", series..., "z"}]`` (non-finite as ``None``); ``[]`` without windows.
    """
    if not len(tl.steps):
        return []
    rows = []
    for n in tl.sites:
        row: dict[str, Any] = {"site": n, "step": int(tl.steps[t])}
        for k in SERIES:
            v = float(tl.series[k][n][t])
            row[k] = v if math.isfinite(v) else None
        z = [float(tl.scores[k][n][t]) for k in SCORED if math.isfinite(tl.scores[k][n][t])]
        row["z"] = max(z) if z else None
        rows.append(row)
    return rows


def print_window(tl: Timeline):
    """A rich table of the latest window (``probe watch``): one row per site, a jump in red."""
    from rich.table import Table

    step = int(tl.steps[-1]) if len(tl.steps) else None
    table = Table(title=f"step {step} · {len(tl.steps)} window(s) read" if step is not None else "no window yet")
    cols = ("site", "absmax", "std", "kurtosis", "norm_p99", "nonfinite", "grad_absmax", "z")
    for col in cols:
        table.add_column(col, justify="left" if col == "site" else "right")
    for row in window_table(tl):
        z = row["z"]
        style = "red" if z is not None and z > tl.threshold else None
        table.add_row(*(row["site"] if c == "site" else _fmt(row[c]) for c in cols), style=style)
    return table


def _tick(v: float) -> str:
    """A kurtosis tick label: three significant digits, ``10^k`` from 10**5 on."""
    text = f"{v:.3g}"
    if "e" not in text:
        return text
    if abs(v) < 1e5:
        return f"{v:.0f}"
    return f"{'-' if v < 0 else ''}$10^{{{math.log10(abs(v)):.3g}}}$"


def plot_timeline(tl: Timeline, *, series: Sequence[str] = ("absmax", "std", "kurtosis", "norm_p99"),
                  title: str = "", columns: int | None = None):
    """The series over steps, one line per site coloured by depth, each jump a dashed red line.

    Args:
        tl: a :class:`Timeline`.
        series: the panels, from :data:`SERIES` (those with no finite value are left out).
        title: the figure's title.
        columns: panels per row (default: all in one row); ``probe plot --size column`` draws two.

    Returns:
        A matplotlib ``Figure``.

    Raises:
        ProbeError: fewer than two windows, or no panel with data; matplotlib missing.
    """
    try:
        from matplotlib import colormaps
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError as err:  # pragma: no cover - the plot extra
        raise ProbeError('plotting needs matplotlib; expected it installed; pip install "probe[plot]"') from err
    if len(tl.steps) < 2:
        raise ProbeError(f"a timeline needs two or more windows; got {len(tl.steps)}; capture with every=1 or a "
                         "schedule during training")
    panels = [k for k in series if any(np.isfinite(tl.series[k][n]).any() for n in tl.sites)]
    if not panels:
        raise ProbeError(f"no series with data among {list(series)}; expected a run with moments or norm")
    if columns is None:
        columns = len(panels)
    rows = -(-len(panels) // columns)
    fig = Figure(figsize=(3.6 * columns + 1.2, 3.4 * rows + 0.4), layout="constrained")
    grid = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    for ax in grid[len(panels):]:
        ax.set_visible(False)
    axes = grid[:len(panels)]
    cmap = colormaps["viridis"]
    depth = max(len(tl.sites) - 1, 1)
    for ax, k in zip(axes, panels):
        for i, n in enumerate(tl.sites):
            ax.plot(tl.steps, tl.series[k][n], color=cmap(i / depth), lw=1, alpha=0.85)
        for e in tl.events:
            ax.axvline(e.step, color="tab:red", lw=0.8, ls="--", alpha=0.7)
        if tl.first_nonfinite is not None:
            ax.axvline(tl.first_nonfinite.step, color="black", lw=1.2, ls=":")
        if k != "kurtosis":
            ax.set_yscale("log")
        else:
            ax.set_yscale("symlog", linthresh=1.0)
            # symlog's own labels write every digit of the view's ends (-4.5008×10^-1) in its linear part
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _tick(v)))
        ax.set_title(k.replace("_", " "), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.25, lw=0.5)
        ax.tick_params(which="both", labelsize=7)
    sm = _scalar_mappable(cmap, len(tl.sites))
    bar = fig.colorbar(sm, ax=list(axes), fraction=0.03, pad=0.01)
    ticks = np.unique(np.linspace(0, len(tl.sites) - 1, min(len(tl.sites), 8)).round().astype(int))
    bar.set_ticks(ticks.tolist(), labels=[tl.sites[i] for i in ticks])
    for axis in (bar.ax.xaxis, bar.ax.yaxis):  # names, not values: no end labels added
        setattr(axis, "probe_names", True)
    bar.set_label("site (model order)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    marks = "dashed red: jumps" + ("; dotted black: first NaN/Inf" if tl.first_nonfinite is not None else "")
    fig.suptitle(f"{title + ' — ' if title else ''}{len(tl.steps)} windows; {marks}", fontsize=10)
    return fig


def _scalar_mappable(cmap, n: int):
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    return ScalarMappable(norm=Normalize(0, max(n - 1, 1)), cmap=cmap)
