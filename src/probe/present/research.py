"""What ``probe show`` says about the geometry of the hidden states: the largest activations with
their tokens, per-token norms, anisotropy and block influence. Plain dicts for ``--json``; a
rich table for people.

Rules, spelled out:

- **massive activation** (Sun et al. 2024, "Massive Activations in Large Language Models", §2):
  an entry of a site's top-k with ``|x| > 100`` and ``|x| > 1000 ×`` the median ``|x|`` of that
  site. The top-k covers every real token, first positions included; the median comes from the
  site's histogram, i.e. the kept tokens (all real tokens unless ``skip_first`` > 0, where the
  few skipped head tokens cannot move a median over thousands of values by more than a rank each).
- **block influence** (Men et al. 2024, "ShortGPT", eq. 1): ``1 - E[cos(h_l, h_{l+1})]`` over
  kept tokens between consecutive sites of the cross-layer matrices; small means the block
  barely turns the hidden state, a candidate for pruning.
- **anisotropy** (Ethayarajh 2019): the mean cosine between two distinct kept tokens of a site.
- **norm scale**: ``sqrt(D) / E||h||``, the factor that gives hidden states a mean norm of
  ``sqrt(D)`` (sparse-autoencoder input normalisation).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..results.run import Run

__all__ = ["summary", "massive_topk", "print_research", "MASSIVE_VALUE", "MASSIVE_RATIO"]

MASSIVE_VALUE, MASSIVE_RATIO = 100.0, 1000.0


def _median_abs(state: dict) -> float:
    """Median |x| from a site's float-bit histogram (both signs folded onto the positive half)."""
    h = state.get("histogram")
    if not h:
        return float("nan")
    from ..stats._buckets import Buckets, quantile

    buckets = Buckets.of(np.shape(h["counts"])[0])
    folded = buckets.signed_counts(buckets.magnitudes(h["counts"]))
    return float(quantile(folded, bool(h["lossless"]), 0.5))


def _text(run: Run, token: int) -> str | None:
    text = run.meta.get("token_text", {}).get(str(int(token)))
    return None if text is None else str(text)


def _num(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


def massive_topk(run: Run) -> list[dict[str, Any]]:
    """Every top-k entry meeting the massive-activation rule (module docstring), by site, largest first."""
    out = []
    for name in run.sites:
        state = run.total.sites.get(name, {})
        if not state.get("topk"):
            continue
        med = _median_abs(state)
        for e in run[name].topk:
            mag = abs(float(e["value"]))
            if mag > MASSIVE_VALUE and med > 0 and mag > MASSIVE_RATIO * med:
                entry = {"site": name, "value": float(e["value"]), "ratio": mag / med, "median_abs": med,
                         "row": int(e["row"]), "position": int(e["position"]), "channel": int(e["channel"]),
                         "token": int(e["token"])}
                text = _text(run, e["token"])
                if text is not None:
                    entry["text"] = text
                out.append(entry)
    return out


def summary(run: Run, top: int = 5) -> dict[str, Any]:
    """Per site: the ``top`` largest entries (with decoded token text when ``meta["token_text"]``
    has it), norm statistics, anisotropy; the block influence of consecutive sites; the massive
    activations. JSON-ready (non-finite numbers as ``None``)."""
    sites = []
    for name in run.sites:
        state = run.total.sites.get(name, {})
        entry: dict[str, Any] = {"site": name}
        if state.get("topk"):
            entry["topk"] = []
            for e in run[name].topk[:top]:
                item = {f: (float(e[f]) if f == "value" else int(e[f])) for f in e.dtype.names}
                text = _text(run, e["token"])
                if text is not None:
                    item["text"] = text
                entry["topk"].append(item)
        if state.get("norm"):
            n = run[name].norm
            entry["norm"] = {"count": n.count, "mean": _num(n.mean), "std": _num(n.std), "min": _num(n.min),
                             "max": _num(n.max), "scale": _num(n.scale), "nonfinite": n.nonfinite,
                             "first_position_mean": _num(n.position_mean[0]) if len(n.position_mean) else None}
            entry["anisotropy"] = _num(n.anisotropy)
        sites.append(entry)
    cross = run.cross
    influence = [{"from": a, "to": b, "value": _num(v)}
                 for a, b, v in zip(cross.sites, cross.sites[1:], cross.block_influence)]
    return {"sites": sites, "block_influence": influence, "massive_topk": massive_topk(run)}


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def print_research(run: Run, console=None, site: str | None = None) -> None:
    """Print the geometry table (and, with ``site``, that site's top entries); prints nothing
    for a run captured without ``topk``, ``norm`` and cross-layer cosines."""
    from rich.console import Console
    from rich.table import Table

    data = summary(run, top=10 if site else 1)
    has_norm = any("norm" in e for e in data["sites"])
    has_topk = any("topk" in e for e in data["sites"])
    if not (has_norm or has_topk or data["block_influence"]):
        return
    console = console or Console()
    influence = {b["from"]: b["value"] for b in data["block_influence"]}
    table = Table(title="hidden-state geometry", header_style="bold", pad_edge=False,
                  caption="scale = √d / E‖h‖ · anisotropy = mean cos between tokens · "
                          "block influence = 1 − E\\[cos(h_l, h_l+1)] · top |x| over every real token")
    columns = ("site", "E‖h‖", "std ‖h‖", "‖h‖ at p0", "scale", "anisotropy", "block infl.", "top |x|", "at")
    for col in columns:
        table.add_column(col, justify="left" if col in ("site", "at") else "right")
    for e in data["sites"]:
        if site is not None and e["site"] != site:
            continue
        n = e.get("norm", {})
        top = (e.get("topk") or [None])[0]
        at = "–"
        if top is not None:
            at = f"p{top['position']} c{top['channel']}"
            at += f" {top['text']!r}" if "text" in top else (f" #{top['token']}" if top["token"] >= 0 else "")
        table.add_row(e["site"], _fmt(n.get("mean")), _fmt(n.get("std")), _fmt(n.get("first_position_mean")),
                      _fmt(n.get("scale")), _fmt(e.get("anisotropy")), _fmt(influence.get(e["site"])),
                      _fmt(top["value"]) if top else "–", at)
    console.print(table)
    if site is not None:
        e = next((x for x in data["sites"] if x["site"] == site), {})
        if e.get("topk"):
            console.print("largest |x|: " + ", ".join(
                f"{t['value']:.4g} (r{t['row']} p{t['position']} c{t['channel']}"
                + (f" {t['text']!r}" if "text" in t else "") + ")" for t in e["topk"]))
    hits = data["massive_topk"]
    if hits:
        console.print(f"[bold red]massive activations[/] (|x| > {MASSIVE_VALUE:g} and > {MASSIVE_RATIO:g}× the "
                      f"site's median |x|, Sun et al. 2024): {len(hits)} in the top-k, e.g. "
                      + ", ".join(f"{h['site']} {h['value']:.4g} at p{h['position']} c{h['channel']}"
                                  + (f" {h['text']!r}" if "text" in h else "") for h in hits[:4])
                      + (" …" if len(hits) > 4 else ""))
