"""What ``probe show`` says about the geometry of the hidden states: the largest activations with
their tokens, per-token norms, anisotropy and block influence. Plain dicts for ``--json``; a
rich table for people.

Rules, spelled out:

- **massive activation** (Sun et al. 2024, "Massive Activations in Large Language Models", §2:
  "activations with magnitudes larger than 100 and ... about 1,000 times larger than the median"):
  ``|x| > MASSIVE_VALUE`` (100) and ``|x| > MASSIVE_RATIO`` (1000) ``×`` the median ``|x|`` of
  its site, both strict as in the paper; :func:`is_massive` is the one rule, applied here to the
  entries of a site's top-k and by :func:`probe.present.report.massive` to the per-position and
  site absmax. The top-k covers every real token, first positions included; the median comes
  from the site's histogram (:meth:`~probe.results.run.SiteView.abs_quantile`), i.e. the kept
  tokens (all real tokens unless ``skip_first`` > 0, where the few skipped head tokens cannot move
  a median over thousands of values by more than a rank each).
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

from ..results.attention import is_attention_site
from ..results.moe import is_moe_site
from ..results.run import TOPK_DTYPE, Run, SiteView

__all__ = ["summary", "massive_topk", "is_massive", "median_abs", "print_research", "site_labels", "MASSIVE_VALUE",
           "MASSIVE_RATIO"]

#: Sun et al. (2024): a massive activation is larger than 100 in magnitude ...
MASSIVE_VALUE = 100.0
#: ... and about 1000 times the median magnitude of its hidden state
MASSIVE_RATIO = 1000.0


def is_massive(magnitude: float, median: float) -> bool:
    """The massive-activation rule (Sun et al. 2024, §2): ``magnitude > MASSIVE_VALUE`` and
    ``magnitude > MASSIVE_RATIO * median``, both strict (the paper's "larger than").

    Args:
        magnitude: ``|x|`` of one activation (activation units).
        median: the median ``|x|`` of its site (:func:`median_abs`); a rule needs ``median > 0``.

    Returns:
        Whether ``magnitude`` is a massive activation.

    Example:
        >>> is_massive(2500.0, 0.5), is_massive(100.0, 0.01), is_massive(500.0, 1.0)
        (True, False, False)
    """
    return median > 0 and magnitude > MASSIVE_VALUE and magnitude > MASSIVE_RATIO * median


def median_abs(site: SiteView) -> float:
    """The median ``|x|`` of a site's kept values, from its histogram (NaN without one).

    Args:
        site: a site's view, ``run[name]``.

    Returns:
        The median magnitude (activation units), within the histogram's relative error bound;
        NaN when the site has no ``histogram`` statistic.

    Example:
        >>> bool(median_abs(run[0]) > 0)
        True
    """
    return float(site.abs_quantile(0.5)) if site.has("histogram") else float("nan")


def _text(run: Run, token: int) -> str | None:
    text = run.meta.get("token_text", {}).get(str(int(token)))
    return None if text is None else str(text)


def _num(v: float | None) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


def massive_topk(run: Run) -> list[dict[str, Any]]:
    """Every top-k entry meeting the massive-activation rule (:func:`is_massive`).

    Args:
        run: a run (sites without ``topk`` are left out).

    Returns:
        JSON-ready dicts, by site and then largest first: ``site``, ``value``, ``ratio``
        (``|value| / median_abs``), ``median_abs``, ``row``, ``position``, ``channel``, ``token``
        and ``text`` when ``run.meta["token_text"]`` decodes the token.

    Example:
        >>> massive_topk(run)  # a tiny random GPT-2 has none
        []
    """
    out = []
    for site in run:
        if not site.has("topk"):
            continue
        med = median_abs(site)
        for e in site.topk:
            mag = abs(float(e["value"]))
            if is_massive(mag, med):
                entry: dict[str, Any] = {
                    "site": site.name, "value": float(e["value"]), "ratio": mag / med, "median_abs": med,
                    "row": int(e["row"]), "position": int(e["position"]), "channel": int(e["channel"]),
                    "token": int(e["token"])}
                text = _text(run, e["token"])
                if text is not None:
                    entry["text"] = text
                out.append(entry)
    return out


def summary(run: Run, top: int = 5) -> dict[str, Any]:
    """The geometry of the hidden states, JSON-ready (non-finite numbers as ``None``).

    Args:
        run: a run; each part is left out for the sites (or cross view) that lack its statistic.
        top: how many of each site's largest entries to list.

    Returns:
        ``{"sites": [...], "block_influence": [...], "massive_topk": [...]}``: per site its
        ``top`` largest entries (``topk``, with decoded ``text`` when ``meta["token_text"]`` has
        it), ``norm`` statistics and ``anisotropy``; the block influence ``{"from", "to",
        "value"}`` of consecutive cross sites (empty without ``cos``); :func:`massive_topk`.

    Example:
        >>> data = summary(run, top=2)
        >>> len(data["sites"][0]["topk"]), data["block_influence"]
        (2, [])
    """
    sites = []
    for site in run:
        if is_moe_site(site.name) or is_attention_site(site.name):  # their own statistic only: their tables
            continue
        entry: dict[str, Any] = {"site": site.name}
        if site.has("topk"):
            entry["topk"] = []
            for e in site.topk[:top]:
                item: dict[str, Any] = {f: (float(e[f]) if f == "value" else int(e[f])) for f in TOPK_DTYPE.names or ()}
                text = _text(run, e["token"])
                if text is not None:
                    item["text"] = text
                entry["topk"].append(item)
        if site.has("norm"):
            n = site.norm
            entry["norm"] = {"count": n.count, "mean": _num(n.mean), "std": _num(n.std), "min": _num(n.min),
                             "max": _num(n.max), "scale": _num(n.scale), "nonfinite": n.nonfinite,
                             "first_position_mean": _num(n.position_mean[0]) if len(n.position_mean) else None}
            entry["anisotropy"] = _num(n.anisotropy)
        sites.append(entry)
    cross = run.cross
    influence = [{"from": a, "to": b, "value": _num(v)}
                 for a, b, v in zip(cross.sites, cross.sites[1:], cross.block_influence)] if "cos" in cross else []
    return {"sites": sites, "block_influence": influence, "massive_topk": massive_topk(run)}


def site_labels(sites: list[str]) -> tuple[dict[str, str], str]:
    """How ``probe show``'s tables name sites, one way in every table: ``({site: label}, column
    header)``; the layer number under ``layer`` when every site is ``hidden_states.k``, else the
    full name under ``site``.

    Example:
        >>> site_labels(["hidden_states.0", "hidden_states.1"])
        ({'hidden_states.0': '0', 'hidden_states.1': '1'}, 'layer')
    """
    prefix = "hidden_states."
    if sites and all(n.startswith(prefix) for n in sites):
        return {n: n[len(prefix):] for n in sites}, "layer"
    return {n: n for n in sites}, "site"


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def print_research(run: Run, console=None, site: str | None = None) -> None:
    """Print the geometry table (and, with ``site``, that site's top entries); prints nothing
    for a run captured without ``topk``, ``norm`` and cross-layer cosines. The massive
    activations are printed by :func:`probe.present.report.print_summary`, in one block.

    Args:
        run: the run.
        console: a ``rich.console.Console`` (default: a new one on stdout).
        site: print only this site's row, and its ten largest entries.

    Example:
        >>> from rich.console import Console
        >>> console = Console(width=160, record=True, file=open(os.devnull, "w"))
        >>> print_research(run, console, site="hidden_states.1")
        >>> "largest |x|" in console.export_text()
        True
    """
    from rich.console import Console
    from rich.table import Table

    data = summary(run, top=10 if site else 1)
    if not data["sites"] or (site is not None and all(e["site"] != site for e in data["sites"])):
        return  # only sites with their own tables (attention, mixture of experts)
    has_norm = any("norm" in e for e in data["sites"])
    has_topk = any("topk" in e for e in data["sites"])
    if not (has_norm or has_topk or data["block_influence"]):
        return
    console = console or Console()
    influence = {b["from"]: b["value"] for b in data["block_influence"]}
    # sites named as the summary table above names them: the layer number when every site is one
    name, label = site_labels([n for n in run.sites if not (is_moe_site(n) or is_attention_site(n))])
    caption = "scale = √d / E‖h‖ · anisotropy = mean cos between tokens · "
    # block influence needs the opt-in cosines: without them the column would be "–" throughout
    if influence:
        caption += "block influence = 1 − E\\[cos(h_l, h_l+1)] to the next site · "
    table = Table(title="hidden-state geometry", header_style="bold", pad_edge=False,
                  caption=caption + "top x = the value of largest |x| over every real token, signed")
    columns = [label, "E‖h‖", "std ‖h‖", "‖h‖ at p0", "scale", "anisotropy"] + (["block infl."] if influence else [])
    for col in columns + ["top x", "at"]:
        table.add_column(col, justify="left" if col in (label, "at") else "right")
    for e in data["sites"]:
        if site is not None and e["site"] != site:
            continue
        n = e.get("norm", {})
        top = (e.get("topk") or [None])[0]
        at = "–"
        if top is not None:
            at = f"p{top['position']} c{top['channel']}"
            at += f" {top['text']!r}" if "text" in top else (f" #{top['token']}" if top["token"] >= 0 else "")
        cells = [name[e["site"]], _fmt(n.get("mean")), _fmt(n.get("std")), _fmt(n.get("first_position_mean")),
                 _fmt(n.get("scale")), _fmt(e.get("anisotropy"))]
        cells += [_fmt(influence.get(e["site"]))] if influence else []
        table.add_row(*cells, _fmt(top["value"]) if top else "–", at)
    console.print(table)
    if site is not None:
        chosen: dict[str, Any] = next((x for x in data["sites"] if x["site"] == site), {})
        if chosen.get("topk"):
            console.print("largest |x|: " + ", ".join(
                f"{t['value']:.4g} (r{t['row']} p{t['position']} c{t['channel']}"
                + (f" {t['text']!r}" if "text" in t else "") + ")" for t in chosen["topk"]))
