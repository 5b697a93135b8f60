"""One self-contained HTML report of a run, or of two runs and their shift: ``probe report``.

Recipe::

    import probe
    from probe.present.html import report_html, write_report
    write_report(probe.load("run.h5"), "report.html")                       # one run
    write_report(probe.load("a.h5"), "report.html", b=probe.load("b.h5"))   # a, b and the diff

The file needs nothing else: the CSS is inline, every figure is an inline PNG (``data:`` URI), no
script runs and nothing is fetched from a network, so it opens offline, attaches to a mail and
archives as is. It holds the summary table, every figure :func:`probe.present.plot.figures` draws
for the run, the massive-activation and outlier-channel tables with decoded tokens, and, for two
runs, the :func:`probe.present.report.diff` table with each quantile shift's interval and the
diff figure with its error bars. Figures need matplotlib (``pip install "probe[plot]"``); without
it the report says so and keeps the tables.
"""

from __future__ import annotations

import base64
import html
import math
import os
from typing import TYPE_CHECKING, Any

from ..errors import ProbeError

if TYPE_CHECKING:
    from ..results.run import Run

__all__ = ["report_html", "write_report"]

_CSS = """
body { font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: #1d1d1f;
       margin: 0 auto; max-width: 1180px; padding: 24px 28px 60px; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 32px 0 8px; border-bottom: 1px solid #ddd;
       padding-bottom: 4px; } h3 { font-size: 15px; margin: 20px 0 6px; }
.meta { color: #555; margin: 0 0 16px; } .note { color: #555; font-size: 12.5px; margin: 4px 0 10px; }
.warn { color: #8a5300; background: #fff6e5; border-left: 3px solid #e0a030; padding: 6px 10px; margin: 6px 0; }
table { border-collapse: collapse; font-size: 12.5px; margin: 6px 0 4px; }
th, td { padding: 3px 8px; border-bottom: 1px solid #eee; text-align: right; white-space: nowrap; }
th { background: #f5f5f7; font-weight: 600; position: sticky; top: 0; }
td.l, th.l { text-align: left; } tr.flag td { color: #b00020; } td.dim { color: #999; }
.wide { overflow-x: auto; max-width: 100%; } td.flag { color: #b00020; font-weight: 600; }
@media print { .wide { overflow: visible; } th { position: static; } }
figure { margin: 14px 0 22px; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 12.5px; margin-top: 4px; }
nav a { margin-right: 12px; color: #0b57d0; text-decoration: none; }
code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; background: #f5f5f7; padding: 0 3px; }
"""

#: what each figure shows, as the report's captions say it
_CAPTIONS = {
    "hist_grid": "Per-site histograms: density per unit of x on a log axis (each panel integrates to 1), "
                 "on an asinh value axis from the site's exact min to its exact max (red ▲).",
    "hist_overlay": "A few sites' densities per unit of x on one shared asinh axis; ▲ marks each exact min and max. "
                    "Past the axis' linear width the axis is logarithmic: it squeezes wide x ranges, so a wide "
                    "site's slowly falling density draws as a plateau; the heights are true, and "
                    "probe plot --linear shows the shape near the peak.",
    "depth": "Width by depth: quantile bands, exact min and max, std and excess kurtosis per site.",
    "cross_cov": "Layer × layer covariance, |cov| on a log colour scale (white dash: negative entry).",
    "cross_r2": "Layer × layer R², with and without the first tokens.",
    "scatter_position": "Uniform sample of kept values against token position; circles: the exact top-k the run "
                        "stores (over every real token).",
    "scatter_channel": "Uniform sample of kept values against channel; circles: the exact stored top-k.",
    "channels_absmax": "Per-channel max |activation| per site (log colour; an arrow on the bar marks clipping).",
    "positions": "Per-position max |activation| and std, and the number of real tokens at each position.",
    "steps": "Per-window std, max |activation| and excess kurtosis.",
    "diff": "Shift from run A to run B: std ratio, Jensen–Shannon divergence, and quantile shifts in units of A's "
            "std with error bars where the exact shift lies.",
}


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _table(headers: list[str], rows: list[list[Any]], left: tuple[int, ...] = (0,),
           flagged: set[int] | None = None) -> str:
    """An HTML table, every row in the page (no fixed-height scroll box: a print or a screenshot
    shows them all); cells are escaped unless given as ``("raw", html)``; rows in ``flagged`` red."""
    head = "".join(f'<th class="l">{_e(h)}</th>' if i in left else f"<th>{_e(h)}</th>" for i, h in enumerate(headers))
    body = []
    for r, row in enumerate(rows):
        cells = []
        for i, cell in enumerate(row):
            cls = ' class="l"' if i in left else ""
            text = cell[1] if isinstance(cell, tuple) and cell[0] == "raw" else _e(cell)
            cells.append(f"<td{cls}>{text}</td>")
        flag = ' class="flag"' if flagged and r in flagged else ""
        body.append(f"<tr{flag}>{''.join(cells)}</tr>")
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _token(run: Run, token: Any) -> str:
    if token is None or int(token) < 0:
        return "–"
    text = run.meta.get("token_text", {}).get(str(int(token)))
    return f"{text!r} (#{int(token)})" if text is not None else f"#{int(token)}"


def _massive_cell(hits: list[dict[str, Any]]) -> Any:
    """The summary's massive-activation cell of one site: its largest massive value, where it is
    (sink or another token, position), in red; "–" without one."""
    if not hits:
        return "–"
    big = max(hits, key=lambda m: m["absmax"])
    where = f"{'sink' if big['kind'] == 'sink' else 'token'} p{big['position']}"
    if big.get("channel") is not None:
        where += f" c{big['channel']}"
    return ("raw", f'<span style="color:#b00020;font-weight:600">{_e(_num(big["absmax"], 4))}</span> ({_e(where)})')


def _summary_section(run: Run, data: dict[str, Any], tag: str) -> str:
    hits: dict[str, list[dict[str, Any]]] = {}
    for m in data["massive"]:
        hits.setdefault(m["site"], []).append(m)
    rows: list[list[Any]] = []
    for e in data["sites"]:
        at = e["absmax_at"]
        where = f"r{at['row']} p{at['position']} c{at['channel']}"
        rows.append([e["site"], e["tokens"], _num(e["mean"]), _num(e["std"]), _num(e["skew"]), _num(e["kurtosis"]),
                     _num(e["min"], 4), _num(e["max"], 4), _num(e["absmax"], 4), where, _token(run, at.get("token")),
                     _massive_cell(hits.get(e["site"], []))])
    table = _table(["site", "tokens", "mean", "std", "skew", "kurt", "min", "max", "absmax", "at", "token",
                    "massive |x|"], rows, left=(0, 9, 10, 11))
    return (f'<h2 id="summary{tag}">Summary — {_which(run, tag)}</h2>'
            f'<p class="note">Per site over the kept tokens: moments (kurt = excess kurtosis), exact min, max and '
            f'absmax with its row (r), position (p), channel (c) and decoded token. <b>massive |x|</b> (red): the '
            f'largest massive activation over every real token, the first position(s) included, so it can exceed '
            f'the absmax beside it, which covers the kept tokens only (skip_first='
            f'{_e(run.meta.get("skip_first"))}).</p>{table}')


def _which(run: Run, tag: str) -> str:
    """The run a section covers, as its heading says it: ``run A (a.h5)``, or the file alone."""
    name = _e(os.path.basename(run.path) if run.path else "in memory")
    label = tag.strip("-").upper() if tag.strip("-") else ""
    return f"run {label} ({name})" if label else f"run {name}"


def _flags_section(run: Run, data: dict[str, Any], tag: str = "") -> str:
    from .report import OUTLIER_RMS, OUTLIER_SITES, OUTLIER_TOKENS, OUTLIER_VALUE
    from .research import MASSIVE_RATIO, MASSIVE_VALUE

    parts = [f'<h2 id="massive{tag}">Massive activations — {_which(run, tag)}</h2><p class="note">|x| &gt; {MASSIVE_VALUE:g} and &gt; '
             f'{MASSIVE_RATIO:g}× the site\'s median |x| (Sun et al. 2024), over every real token; the attention '
             "sink is the first position(s). Channel and token come from the stored top-k where the "
             "per-position maximum alone does not keep them.</p>"]
    massive = data["massive"]
    if massive:
        rows = [[m["site"], m["kind"], _num(m["absmax"], 5), _num(m["ratio"], 4), _num(m["median_abs"]),
                 _num(m.get("position")), _num(m.get("channel")), _token(run, m.get("token"))] for m in massive]
        parts.append(_table(["site", "kind", "|x|", "× median", "median |x|", "position", "channel", "token"], rows,
                            left=(0, 1, 7)))
    else:
        parts.append('<p class="note">None found.</p>')
    topk = data["research"]["massive_topk"]
    if topk:
        parts.append("<h3>In the stored top-k</h3>")
        rows = [[h["site"], _num(h["value"], 5), _num(h["ratio"], 4), h["row"], h["position"], h["channel"],
                 _token(run, h["token"])] for h in topk]
        parts.append(_table(["site", "value", "× median", "row", "position", "channel", "token"], rows, left=(0, 6)))
    parts.append(f'<h2 id="outliers{tag}">Outlier channels — {_which(run, tag)}</h2><p class="note">|x| ≥ {OUTLIER_VALUE:g} in ≥ '
                 f"{OUTLIER_TOKENS:.0%} of the kept tokens at ≥ {OUTLIER_SITES:.0%} of the sites, with RMS ≥ "
                 f"{OUTLIER_RMS:g}× the site's median channel RMS (after LLM.int8()).</p>")
    outliers = data["outlier_channels"]
    if outliers:
        parts.append(_table(["channel", "flagged at", "of sites"], [[o["channel"], o["sites"], o["of"]]
                                                                     for o in outliers]))
    else:
        parts.append('<p class="note">None found.</p>')
    return "".join(parts)


def _figure(name: str, fig: Any, dpi: int) -> str:
    from .plot import png_bytes

    stem = os.path.splitext(name)[0]
    data = base64.b64encode(png_bytes(fig, dpi)).decode("ascii")
    caption = _CAPTIONS.get(stem, "")
    return (f'<figure id="fig-{_e(stem)}"><img alt="{_e(stem)}" src="data:image/png;base64,{data}">'
            f"<figcaption><code>{_e(name)}</code> — {_e(caption)}</figcaption></figure>")


def _figures_section(run: Run, dpi: int, tag: str = "") -> str:
    try:
        from .plot import figures
        figs = figures(run, notes=False)  # the captions carry the reading notes
    except ProbeError as err:
        if "matplotlib" not in str(err):
            raise
        return f'<h2 id="figures{tag}">Figures — {_which(run, tag)}</h2><p class="warn">{_e(str(err))}</p>'
    try:
        body = "".join(_figure(name, fig, dpi) for name, fig in figs.items())
    finally:
        figs.clear()
    return f'<h2 id="figures{tag}">Figures — {_which(run, tag)}</h2>{body or "<p class=note>The run holds no data a figure draws.</p>"}'


def _diff_section(a: Run, b: Run, dpi: int) -> str:
    from .report import DIFF_QUANTILES, diff, diff_warnings, resolution, shown

    rows = diff(a, b)
    parts = [f'<h2 id="diff">Shift from {_which(a, "A")} to {_which(b, "B")}</h2>']
    parts += [f'<p class="warn">{_e(w)}</p>' for w in diff_warnings(a, b)]
    parts.append('<p class="note">Δq: the quantile of B minus that of A, as the interval the histogram buckets '
                 "bound the exact shift to (grey: the interval holds 0, the sign is not resolved). JS: "
                 "Jensen–Shannon divergence of the two histograms in bits (0 identical, 1 disjoint). A mean or "
                 "a shift below 2⁻²³ × the larger std (float32's resolution at the site's scale) prints as 0.</p>")
    table_rows: list[list[Any]] = []
    for r in rows:
        bounds = r.get("quantile_shift_bounds") or {}
        res = resolution(r)
        cells: list[Any] = [r["site"], _num(shown(r["mean_a"], res)), _num(shown(r["mean_b"], res)),
                            _num(r["std_ratio"], 4), _num(r.get("js"))]
        for q in DIFF_QUANTILES:
            pair = bounds.get(str(q))
            if not pair or pair[0] is None or pair[1] is None:
                cells.append("–")
                continue
            lo, hi = (0.0 if abs(v) < res else v for v in pair)
            text = f"{lo:+.3g}" if f"{lo:+.3g}" == f"{hi:+.3g}" else f"{lo:+.3g} … {hi:+.3g}"
            cells.append(("raw", f'<span style="color:#999">{_e(text)}</span>' if lo <= 0 <= hi else _e(text)))
        table_rows.append(cells)
    parts.append(_table(["site", "mean A", "mean B", "std B/A", "JS (bits)", *[f"Δq{q:g}" for q in DIFF_QUANTILES]],
                        table_rows))
    try:
        from .plot import _diff_figure

        parts.append(_figure("diff.png", _diff_figure(a, b), dpi))
    except ProbeError as err:
        if "matplotlib" not in str(err):
            raise
        parts.append(f'<p class="warn">{_e(str(err))}</p>')
    return "".join(parts)


def _describe(run: Run, tag: str) -> str:
    model = run.meta.get("model", {})
    name = model.get("name_or_path") or model.get("class") or "model"
    texts = run.meta.get("texts")
    tokens = run[run.sites[0]].tokens if run.sites else 0
    bits = [f"<b>{_e(tag)}</b> {_e(run.path or 'in memory')}", f"model {_e(name)}", f"{len(run.sites)} sites",
            f"{len(run.rows)} window(s)", f"{tokens:,} kept tokens", f"skip_first={_e(run.meta.get('skip_first'))}"]
    if texts is not None:
        bits.append(f"{_e(texts)} documents")
    if run.meta.get("partial"):
        bits.append(f'<span style="color:#b00020">partial: {_e(run.meta["partial"].get("reason", "interrupted"))}'
                    "</span>")
    return " · ".join(bits)


def report_html(a: Run, b: Run | None = None, *, dpi: int = 90) -> str:
    """The report of run ``a`` (and of ``b`` with the shift from ``a`` to ``b``) as one HTML page.

    Args:
        a: the run (or the reference run of a comparison).
        b: a second run to compare with ``a``; its summary and the diff are added.
        dpi: pixels per inch of the inline figures.

    Returns:
        The page, self-contained (inline CSS and PNGs, no script, no external reference).

    Raises:
        ProbeError: ``b`` shares no site with ``a``.

    Example:
        >>> page = report_html(run)
        >>> page.startswith("<!DOCTYPE html>"), "Massive activations" in page, "://" in page
        (True, True, False)
    """
    from .report import summary

    data = summary(a)
    title = f"probe report — {a.path or 'run'}" + (f" vs {b.path or 'run b'}" if b is not None else "")
    t = "-a" if b is not None else ""
    nav = [f'<a href="#summary{t}">summary</a>', f'<a href="#massive{t}">massive</a>',
           f'<a href="#outliers{t}">outliers</a>', f'<a href="#figures{t}">figures</a>']
    body = [f"<h1>{_e(title)}</h1>", f'<p class="meta">{_describe(a, "A" if b is not None else "run")}']
    if b is not None:
        body.append(f"<br>{_describe(b, 'B')}")
        nav.insert(1, '<a href="#diff">diff</a>')
    body.append("</p>")
    body.append(f"<nav>{''.join(nav)}</nav>")
    if data["partial"]:
        body.append(f'<p class="warn">Partial run: {_e(data["partial"].get("reason", "interrupted"))}; the numbers '
                    "cover only what ran.</p>")
    body.append(_summary_section(a, data, t))
    if b is not None:
        body.append(_diff_section(a, b, dpi))
        body.append(_summary_section(b, summary(b), "-b"))
    body.append(_flags_section(a, data, t))
    body.append(_figures_section(a, dpi, t))
    versions = ", ".join(f"{k.split('_')[0]} {a.meta[k]}" for k in ("probe_version", "torch_version",
                                                                    "transformers_version") if a.meta.get(k))
    body.append(f'<p class="note">Captured with {_e(versions or "probe")}; written by probe report.</p>')
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>{''.join(body)}</body></html>\n")


def write_report(a: Run, path: str | os.PathLike, *, b: Run | None = None, dpi: int = 90) -> str:
    """Write :func:`report_html` to ``path`` (UTF-8).

    Args:
        a: the run (or the reference run of a comparison).
        path: the HTML file to write; replaced if it exists.
        b: a second run to compare with ``a``.
        dpi: pixels per inch of the inline figures.

    Returns:
        ``path`` as a string.

    Raises:
        ProbeError: ``b`` shares no site with ``a``.

    Example:
        >>> os.path.basename(write_report(run, os.path.join(tmp, "report.html")))
        'report.html'
    """
    page = report_html(a, b, dpi=dpi)
    path = os.fspath(path)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path
