"""Mixture-of-experts tables and the ``experts`` figure: routing per layer, and coverage.

Recipe::

    from probe.present.experts import moe_table, print_moe, coverage_table, print_coverage
    print_moe(moe_table(run))                    # probe show: one row per MoE layer
    print_coverage(coverage_table(run, 16))      # probe show --quant: experts with 0 or < 16 tokens
    figures(run, kinds="experts")                # experts.png: tokens per expert per layer

Each row is read through :class:`probe.results.moe.RouterView` (``max/mean``, ``cv``, entropy,
never-routed experts) and, where captured, :class:`probe.results.moe.ExpertsView` (tokens per
expert at the experts' input: the coverage calibration has).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..results.moe import moe_layers

__all__ = ["moe_table", "print_moe", "coverage_table", "print_coverage", "draw_experts", "has_moe"]


def has_moe(run) -> bool:
    """Whether ``run`` holds any mixture-of-experts site."""
    return bool(moe_layers(run))


def _counts(run, layer) -> np.ndarray | None:
    """Tokens per expert of a layer: the router's assignments, else the experts site's tokens."""
    if layer.router is not None and run[layer.router].has("router"):
        return run[layer.router].router.counts
    if layer.experts is not None and run[layer.experts].has("experts"):
        return run[layer.experts].experts.tokens
    if layer.down is not None and run[layer.down].has("experts"):
        return run[layer.down].experts.tokens
    return None


def moe_table(run) -> list[dict[str, Any]]:
    """One dict per mixture-of-experts layer: ``layer, router, experts, down, E, k, tokens, max_over_mean,
    cv, entropy, entropy_max, never_routed, counts, ranks, idle_on_a_rank, rank_counts`` (``None`` where
    not captured; ``rank_counts`` ``[ranks][E]``, ``idle_on_a_rank`` the experts some rank never routed to)."""
    rows = []
    for layer in moe_layers(run):
        row: dict[str, Any] = {"layer": layer.layer, "router": layer.router, "experts": layer.experts,
                               "down": layer.down,
                               "E": None, "k": None, "tokens": None, "max_over_mean": None, "cv": None,
                               "entropy": None, "entropy_max": None, "never_routed": None, "counts": None,
                               "ranks": 1, "idle_on_a_rank": None, "rank_counts": None}
        if layer.router is not None and run[layer.router].has("router"):
            r = run[layer.router].router
            row.update(E=r.n_experts, k=r.top_k, tokens=r.tokens, max_over_mean=r.max_over_mean, cv=r.cv,
                       entropy=r.entropy_mean, entropy_max=r.entropy_max, never_routed=r.never_routed,
                       counts=[int(c) for c in r.counts], ranks=int(r.rank_counts.shape[0]),
                       idle_on_a_rank=r.idle_on_a_rank, rank_counts=r.rank_counts.tolist())
        elif layer.experts is not None and run[layer.experts].has("experts"):
            t = run[layer.experts].experts.tokens
            mean = t.mean() if t.size else float("nan")
            row.update(E=int(t.size), counts=[int(c) for c in t], never_routed=[int(e) for e in np.flatnonzero(t == 0)],
                       max_over_mean=float(t.max() / mean) if t.sum() else None,
                       cv=float(t.std() / mean) if t.sum() else None)
        rows.append(row)
    return rows


def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _experts_list(ids: list[int] | None, most: int = 8) -> str:
    if ids is None:
        return "–"
    if not ids:
        return "none"
    text = ",".join(str(e) for e in ids[:most])
    return text + (f" (+{len(ids) - most})" if len(ids) > most else "")


def print_moe(rows: list[dict[str, Any]], console=None) -> None:
    """The table of :func:`moe_table` (``rich``)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="mixture of experts: routing per layer", header_style="bold", pad_edge=False,
                  caption="max/mean, cv: of the tokens per expert (1 and 0 when balanced) · entropy of softmax("
                          "router logits), nats (of ln E) · over real tokens")
    ranked = any((r.get("ranks") or 1) > 1 for r in rows)
    cols = ("site", "E", "k", "tokens", "max/mean", "cv", "entropy", "never routed") + (("idle on a rank",) if ranked else ())
    for col in cols:
        table.add_column(col, justify="left" if col in ("site", "never routed", "idle on a rank") else "right",
                         no_wrap=True)
    for r in rows:
        ent = "–" if r["entropy"] is None else f"{r['entropy']:.3g} / {r['entropy_max']:.3g}"
        cells = [str(r["router"] or r["experts"]), _num(r["E"]), _num(r["k"]), _num(r["tokens"]),
                 _num(r["max_over_mean"]), _num(r["cv"]), ent, _experts_list(r["never_routed"])]
        if ranked:
            cells.append(_experts_list(r.get("idle_on_a_rank")))
        table.add_row(*cells)
    console.print(table)


def coverage_table(run, min_tokens: int = 1) -> list[dict[str, Any]]:
    """Per experts site (per router site when no experts site was captured): ``site, E, least,
    most, zero, below`` — the experts with no token and those with fewer than ``min_tokens``."""
    rows = []
    for layer in moe_layers(run):
        t = _counts(run, layer)
        if t is None:
            continue
        rows.append({"site": layer.experts or layer.router, "E": int(t.size), "least": int(t.min()),
                     "most": int(t.max()), "zero": [int(e) for e in np.flatnonzero(t == 0)],
                     "below": [int(e) for e in np.flatnonzero((t > 0) & (t < min_tokens))],
                     "min_tokens": int(min_tokens)})
    return rows


def print_coverage(rows: list[dict[str, Any]], console=None) -> None:
    """The table of :func:`coverage_table`, and one line on what it means for quantization."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if not rows:
        return
    n = rows[0]["min_tokens"]
    table = Table(title="expert coverage (calibration data per expert)", header_style="bold", pad_edge=False)
    for col in ("site", "E", "least", "most", "no token", f"< {n} tokens"):
        table.add_column(col, justify="left" if col in ("site", "no token") or col.startswith("<") else "right",
                         no_wrap=True)
    for r in rows:
        table.add_row(r["site"], str(r["E"]), str(r["least"]), str(r["most"]), _experts_list(r["zero"]),
                      _experts_list(r["below"]))
    console.print(table)
    missing = sum(len(r["zero"]) for r in rows)
    if missing:
        console.print(f"[bold yellow]{missing} expert(s) saw no calibration token[/]: their imatrix rows hold zeros "
                      "(count 0) and their scales are 0; calibrate on more or more varied text before quantizing")


def draw_experts(run, out, opts: dict, mpl, missing, title: str) -> list[str]:
    """``experts.png``: tokens per expert per layer as a heat map (share of the layer's
    assignments relative to uniform, log colour scale under the map, no token marked ×), and per
    layer the max/mean and coefficient of variation of the counts.

    Args:
        run: the run; out: the figure sink (``out.save(fig, name)``); opts: unused plot options;
        mpl: ``present.plot._mpl()``; missing: the exception class for a run without the data;
        title: the run's title line.
    """
    matplotlib, Figure, colors, _ = mpl
    import matplotlib.ticker  # noqa: F401 - matplotlib.ticker below
    layers = []
    for layer in moe_layers(run):
        c = _counts(run, layer)
        if c is not None and c.sum() > 0:
            layers.append((layer, c))
    if not layers:
        raise missing("plot kind 'experts' needs mixture-of-experts sites with tokens; expected a capture with "
                      "sites='moe' (or 'linear_inputs'); recapture with probe.capture(model, sites='moe')")
    width = max(c.size for _, c in layers)
    grid = np.full((len(layers), width), np.nan)
    for i, (_, c) in enumerate(layers):
        grid[i, :c.size] = c / (c.sum() / c.size)  # 1 = a uniform share
    positive = grid[np.isfinite(grid) & (grid > 0)]
    span = max(2.0, float(np.nanmax(np.abs(np.log2(positive)))) if positive.size else 2.0)
    norm = colors.LogNorm(vmin=2.0 ** -span, vmax=2.0 ** span)
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#dddddd")
    height = 1.6 + 0.32 * len(layers)
    if getattr(out, "narrow", False):  # a paper's column: the map above the bars, each the column's width
        fig = Figure(figsize=(5.5, 2 * max(2.8, height) + 0.8), layout="constrained")
        left, right = fig.subplots(2, 1)
    else:
        fig = Figure(figsize=(min(4 + 0.28 * width, 16) + 3.2, max(2.8, height)), layout="constrained")
        left, right = fig.subplots(1, 2, width_ratios=[max(3.0, 0.28 * width), 3.0])
    shown = np.where(grid > 0, grid, np.nan)
    im = left.imshow(shown, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    for i, j in zip(*np.nonzero(grid == 0)):
        left.text(j, i, "×", ha="center", va="center", fontsize=8, color="#b00000")
    labels = [str(layer.layer) if layer.layer is not None else (layer.router or layer.experts or "?")
              for layer, _ in layers]
    left.set_yticks(range(len(layers)), labels, fontsize=7)
    step = max(1, width // 32)
    left.set_xticks(range(0, width, step), [str(e) for e in range(0, width, step)], fontsize=7)
    left.set_xlabel("expert", fontsize=8)
    left.set_ylabel("layer", fontsize=8)
    left.set_title("tokens per expert ÷ uniform share (× = no token)", fontsize=9)
    # under the heat map: beside it, the bar's label would sit where the bar chart's layer label goes
    bar = fig.colorbar(im, ax=left, location="bottom", fraction=0.05, pad=0.02, aspect=30)
    bar.set_label("share ÷ 1/E (log)", fontsize=8)
    ticks = [2.0 ** p for p in range(-int(span), int(span) + 1)]
    bar.ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    bar.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
    bar.ax.tick_params(which="both", labelsize=7)
    y = np.arange(len(layers))
    mom = [float(c.max() / c.mean()) for _, c in layers]
    cv = [float(c.std() / c.mean()) for _, c in layers]
    right.barh(y - 0.2, mom, height=0.38, color="#4c72b0", label="max / mean")
    right.barh(y + 0.2, cv, height=0.38, color="#dd8452", label="coefficient of variation")
    right.axvline(1.0, color="#4c72b0", lw=0.7, ls="--")
    right.set_yticks(y, labels, fontsize=7)
    right.set_ylabel("layer", fontsize=8)
    right.invert_yaxis()
    right.set_xlabel("load imbalance (1 / 0 when balanced)", fontsize=8)
    right.tick_params(labelsize=7)
    right.grid(axis="x", alpha=0.25, lw=0.5)
    right.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    tokens = int(max(c.sum() for _, c in layers))
    fig.suptitle(f"Experts: routing over real tokens ({tokens} assignments per layer at most) — {title}", fontsize=10)
    return [out.save(fig, "experts.png")]
