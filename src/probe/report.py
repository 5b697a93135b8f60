"""Tables and flags for ``probe show`` / ``probe diff``: plain dicts for ``--json``, rich for people.

Flags, with their rules spelled out:

- **outlier channel** (after Dettmers et al. 2022, LLM.int8()): a channel whose magnitude is at
  least 6 in at least 6 % of the kept tokens, at at least 25 % of the sites. On a residual stream
  whose typical scale is itself above 6 that alone would flag every channel, so a site only counts
  when the channel's RMS is also at least 4 × the median channel RMS of that site.
- **massive activation** (Sun et al. 2024): a site whose largest magnitude is at least 100 and at
  least 1000 × the median magnitude of that site.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import research
from .run import Run

__all__ = ["summary", "outlier_channels", "massive", "diff", "print_summary", "print_diff"]

OUTLIER_VALUE, OUTLIER_TOKENS, OUTLIER_SITES, OUTLIER_RMS = 6.0, 0.06, 0.25, 4.0
MASSIVE_VALUE, MASSIVE_RATIO = 100.0, 1000.0
QUANTILES = (0.001, 0.01, 0.5, 0.99, 0.999)


def _median_abs(run: Run, name: str) -> float:
    state = run.total["sites"].get(name, {}).get("histogram")
    if not state:
        return float("nan")
    from .stats.histogram import quantile

    counts = state["counts"]
    half = counts.shape[0] // 2
    folded = np.concatenate([counts[:half] + counts[half:], np.zeros(half, dtype=counts.dtype)])
    return float(quantile(folded, bool(state["lossless"]), 0.5))


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def summary(run: Run) -> dict[str, Any]:
    """Every site's headline numbers, the flags, and the run's description, JSON-ready."""
    token_text = run.meta.get("token_text", {})
    sites = []
    for name in run.sites:
        s = run[name]
        entry = {
            "site": name, "module": s.module, "hf_index": s.hf_index, "dtype": s.dtype,
            "tokens": s.tokens, "count": s.count, "mean": s.mean, "std": s.std, "var": s.var,
            "skew": s.skew, "kurtosis": s.kurtosis, "min": s.min, "max": s.max, "absmax": s.absmax,
            "absmax_at": dict(s.absmax_at), "nan": s.nan, "posinf": s.posinf, "neginf": s.neginf,
        }
        tok = s.absmax_at["token"]
        if str(tok) in token_text:
            entry["absmax_at"]["text"] = token_text[str(tok)]
        try:
            entry["quantiles"] = {str(q): v for q, v in zip(QUANTILES, s.quantile(QUANTILES).tolist())}
            entry["median_abs"] = _median_abs(run, name)
        except Exception:  # no histogram captured
            pass
        sites.append({k: _clean(v) for k, v in entry.items()})
    return {
        "file": run.path, "model": run.meta.get("model", {}).get("name_or_path") or
        run.meta.get("model", {}).get("class"), "windows": len(run.rows), "steps": run.steps,
        "skip_first": run.meta.get("skip_first"), "sites": sites,
        "outlier_channels": outlier_channels(run), "massive": massive(run),
        "research": research.summary(run),
    }


def outlier_channels(run: Run) -> list[dict[str, Any]]:
    """Channels meeting the LLM.int8() outlier rule (see module docstring)."""
    hits: dict[int, list[str]] = {}
    names = [n for n in run.sites if run.total["sites"].get(n, {}).get("moments")]
    for name in names:
        s = run[name]
        if not s.tokens:
            continue
        frac = s.channel.large / s.tokens
        rms = np.sqrt(np.nan_to_num(s.channel.var) + np.nan_to_num(s.channel.mean) ** 2)
        ratio = rms / max(float(np.median(rms)), 1e-30)
        for c in np.flatnonzero((frac >= OUTLIER_TOKENS) & (ratio >= OUTLIER_RMS)):
            hits.setdefault(int(c), []).append(name)
    need = max(1, math.ceil(OUTLIER_SITES * len(names)))
    found = [{"channel": c, "sites": len(v), "of": len(names)} for c, v in hits.items() if len(v) >= need]
    return sorted(found, key=lambda o: (-o["sites"], o["channel"]))


def massive(run: Run) -> list[dict[str, Any]]:
    """Sites whose largest magnitude meets the massive-activation rule (see module docstring)."""
    out = []
    for name in run.sites:
        s = run[name]
        med = _median_abs(run, name)
        if s.count and s.absmax >= MASSIVE_VALUE and med > 0 and s.absmax >= MASSIVE_RATIO * med:
            out.append({"site": name, "absmax": s.absmax, "median_abs": med, "ratio": s.absmax / med,
                        **s.absmax_at})
    return out


def _js(p: np.ndarray, q: np.ndarray) -> float:
    p = p / p.sum() if p.sum() else p
    q = q / q.sum() if q.sum() else q
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0  # where a > 0, m > 0 too
        return float((a[nz] * np.log2(a[nz] / m[nz])).sum())

    return float(max(0.0, (kl(p) + kl(q)) / 2))


def diff(a: Run, b: Run) -> list[dict[str, Any]]:
    """Per-site shift from run ``a`` to run ``b``: mean and std ratios, quantile shifts and the
    Jensen–Shannon divergence (bits, 0..1) between the two bucket histograms."""
    rows = []
    for name in a.sites:
        if name not in b.sites:
            continue
        sa, sb = a[name], b[name]
        row = {"site": name, "mean_a": sa.mean, "mean_b": sb.mean, "std_a": sa.std, "std_b": sb.std,
               "std_ratio": sb.std / sa.std if sa.std else float("nan"),
               "mean_shift": sb.mean - sa.mean}
        ha = a.total["sites"].get(name, {}).get("histogram")
        hb = b.total["sites"].get(name, {}).get("histogram")
        if ha and hb and ha["counts"].shape == hb["counts"].shape:
            row["js"] = _js(ha["counts"].astype(np.float64), hb["counts"].astype(np.float64))
            qa, qb = sa.quantile(QUANTILES), sb.quantile(QUANTILES)
            row["quantile_shift"] = {str(q): float(y - x) for q, x, y in zip(QUANTILES, qa, qb)}
        rows.append({k: _clean(v) for k, v in row.items()})
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "–"
        return f"{v:.3g}"
    return str(v)


def print_summary(run: Run, console=None, site: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    data = summary(run)
    title = f"{data['file'] or 'run'} · {data['model']} · {data['windows']} window(s) · skip_first={data['skip_first']}"
    table = Table(title=title, header_style="bold", caption="at: (row,) position, channel (and token) of absmax",
                  pad_edge=False)
    prefix = "hidden_states."
    short = all(e["site"].startswith(prefix) for e in data["sites"])
    wide = console.width >= 120
    cols = ["layer" if short else "site", "tokens", "mean", "std", "skew", "kurt"]
    cols += ["min", "max", "absmax", "at"] if wide else ["absmax", "at"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("site", "at") else "right", no_wrap=col != "at")
    table.columns[0].justify = "left"
    flagged = {m["site"] for m in data["massive"]}
    for e in data["sites"]:
        if site is not None and e["site"] != site:
            continue
        at = e["absmax_at"]
        where = f"r{at['row']} p{at['position']} c{at['channel']}"
        if "text" in at:
            where += f" {at['text']!r}"
        elif at["token"] >= 0:
            where += f" #{at['token']}"
        name = e["site"][len(prefix):] if short else e["site"]
        name = f"[bold red]{name}[/]" if e["site"] in flagged else name
        if not wide:
            where = f"p{at['position']} c{at['channel']}"
        cells = [name, _fmt(e["tokens"]), _fmt(e["mean"]), _fmt(e["std"]), _fmt(e["skew"]), _fmt(e["kurtosis"])]
        cells += [_fmt(e["min"]), _fmt(e["max"])] if wide else []
        table.add_row(*cells, _fmt(e["absmax"]), where)
    console.print(table)
    research.print_research(run, console, site)
    if site is not None:
        e = next(x for x in data["sites"] if x["site"] == site)
        if "quantiles" in e:
            console.print("quantiles: " + ", ".join(f"q{q}={_fmt(v)}" for q, v in e["quantiles"].items()))
        s = run[site]
        if s.channel is not None:
            top = np.argsort(-np.nan_to_num(s.channel.absmax, nan=-1))[:8]
            console.print("largest channels: " + ", ".join(f"{c} ({s.channel.absmax[c]:.4g})" for c in top))
        if s.nan or s.posinf or s.neginf:
            console.print(f"[yellow]non-finite: nan={s.nan} +inf={s.posinf} -inf={s.neginf}[/]")
    if data["massive"]:
        console.print(f"[bold red]massive activations[/] (|x| ≥ {MASSIVE_VALUE:g} and ≥ {MASSIVE_RATIO:g}× median |x|): "
                      + ", ".join(f"{m['site']} {m['absmax']:.4g} at pos {m['position']} ch {m['channel']}"
                                  for m in data["massive"][:6]) + (" …" if len(data["massive"]) > 6 else ""))
    if data["outlier_channels"]:
        console.print(f"[bold yellow]outlier channels[/] (|x| ≥ {OUTLIER_VALUE:g} in ≥ {OUTLIER_TOKENS:.0%} of tokens "
                      f"at ≥ {OUTLIER_SITES:.0%} of sites, RMS ≥ {OUTLIER_RMS:g}× the median channel's): "
                      + ", ".join(f"{o['channel']} ({o['sites']}/{o['of']})" for o in data["outlier_channels"][:12])
                      + (f" … {len(data['outlier_channels'])} in all" if len(data["outlier_channels"]) > 12 else ""))


def print_diff(rows: list[dict[str, Any]], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="distribution shift (A → B)", header_style="bold")
    for col in ("site", "mean A", "mean B", "std B/A", "JS (bits)", "Δq0.01", "Δq0.5", "Δq0.99"):
        table.add_column(col, justify="left" if col == "site" else "right")
    for r in rows:
        qs = r.get("quantile_shift", {})
        table.add_row(r["site"], _fmt(r["mean_a"]), _fmt(r["mean_b"]), _fmt(r["std_ratio"]), _fmt(r.get("js")),
                      _fmt(qs.get("0.01")), _fmt(qs.get("0.5")), _fmt(qs.get("0.99")))
    console.print(table)
