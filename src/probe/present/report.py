"""Tables and flags for ``probe show`` / ``probe diff``: plain dicts for ``--json``, rich for people.

Flags, with their rules spelled out:

- **outlier channel** (after Dettmers et al. 2022, LLM.int8()): a channel whose magnitude is at
  least 6 in at least 6 % of the kept tokens, at at least 25 % of the sites. On a residual stream
  whose typical scale is itself above 6 that alone would flag every channel, so a site only counts
  when the channel's RMS is also at least 4 × the median channel RMS of that site.
- **massive activation** (Sun et al. 2024, §2): :func:`probe.present.research.is_massive`, the
  one rule of ``probe show`` — a magnitude larger than 100 and larger than 1000 × the median
  magnitude of its site (the median over the kept tokens). Looked for over every real token,
  ``skip_first`` or not: the first positions (``max(skip_first, 1)`` of them) from the
  per-position absmax, listed apart as the **attention sink**, the other tokens from the site's
  absmax (or the per-position absmax past the first positions), and each site's top-k entries
  (:func:`probe.present.research.massive_topk`); ``probe show`` prints them as one block.

Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ProbeError, closest
from ..results.attention import is_attention_site
from ..results.moe import is_moe_site
from . import research
from .research import MASSIVE_RATIO, MASSIVE_VALUE, is_massive, median_abs

if TYPE_CHECKING:
    from ..results.run import Run

__all__ = ["summary", "outlier_channels", "massive", "diff", "diff_warnings", "resolve_site", "print_summary",
           "print_diff", "describe", "DIFF_QUANTILES", "resolution", "shown", "quantile_bounds", "print_quant", "MASSIVE_VALUE", "MASSIVE_RATIO"]

OUTLIER_VALUE, OUTLIER_TOKENS, OUTLIER_SITES, OUTLIER_RMS = 6.0, 0.06, 0.25, 4.0
QUANTILES = (0.001, 0.01, 0.5, 0.99, 0.999)
#: the quantiles whose shift ``probe diff`` reports, in its table, its JSON and its plot
DIFF_QUANTILES = (0.001, 0.5, 0.999)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def hidden_state_stack(name: str) -> str | None:
    """The stack of a hidden-state site ``<stack>.<layer>`` whose stack is one transformers returns
    (``decoder_hidden_states.3``: ``decoder_hidden_states``); ``None`` for any other site.

    Example:
        >>> hidden_state_stack("text_hidden_states.2"), hidden_state_stack("model.layers.2")
        ('text_hidden_states', None)
    """
    head, _, layer = name.rpartition(".")
    return head if head.endswith("hidden_states") and layer.isdigit() else None


def resolve_site(run: Run, name: str, flag: str = "--site") -> str:
    """The site ``name`` means: a site name, or the layer number the tables show (``"5"`` is
    ``"hidden_states.5"``, else the one stack's ``<stack>_hidden_states.5``; for other sites, the
    index in ``run.sites``); a negative number counts from the end (``"-1"`` is the last site), as
    ``run[-1]`` and ``run["-1"]`` do.

    Args:
        run: the run whose sites are meant.
        name: a site name or a layer number, as text (the CLI's ``--site``).
        flag: the option the error names.

    Returns:
        The site's name in ``run.sites``.

    Raises:
        ProbeError: no such site (the closest names are listed), or a layer number that several
            stacks have (an encoder's and its decoder's: their names are listed).

    Example:
        >>> resolve_site(run, "1"), resolve_site(run, "hidden_states.2"), resolve_site(run, "-1")
        ('hidden_states.1', 'hidden_states.2', 'hidden_states.2')
    """
    if name in run.sites:
        return name
    text = name.strip()
    if text.lstrip("-").isdigit():
        k = int(text)
        if f"hidden_states.{k}" in run.sites:
            return f"hidden_states.{k}"
        stacked = [n for n in run.sites if hidden_state_stack(n) and n.rpartition(".")[2] == str(k)]
        if len(stacked) == 1:
            return stacked[0]
        if len(stacked) > 1:  # an encoder's layer k and its decoder's
            raise ProbeError(f"{flag} {name}: several stacks have a layer {k} ({', '.join(stacked)}); "
                             "pass one of these names")
        if not all(n.startswith("hidden_states.") for n in run.sites) and 0 <= k < len(run.sites):
            return run.sites[k]
        if -len(run.sites) <= k < 0:  # from the end, as run[-1] counts
            return run.sites[k]
    layers = [n[len("hidden_states."):] for n in run.sites if n.startswith("hidden_states.")]
    span = f" or a layer number {layers[0]}..{layers[-1]}" if layers else ""
    raise ProbeError(f"{flag} {name}: no such site; expected a site name{span}"
                     f"{closest(name, run.sites)}; see the names in `probe show`")


def summary(run: Run, sites: list[str] | None = None) -> dict[str, Any]:
    """Every site's headline numbers (or only ``sites``'), the flags, and the run's description:
    what ``probe show --json`` prints.

    Args:
        run: the run.
        sites: the sites to list (default: all, in capture order).

    Returns:
        A JSON-ready dict (non-finite numbers as ``None``): ``file``, ``model``, ``windows``,
        ``steps``, ``skip_first``, ``partial`` (set when the run was interrupted or failed before
        its end), ``sites`` (per site: the :class:`~probe.results.run.SiteView` headline numbers,
        and ``quantiles`` of :data:`QUANTILES` and ``median_abs`` with a histogram),
        ``disabled``, ``outlier_channels``, ``research`` (:func:`probe.present.research.summary`)
        and ``massive`` (:func:`massive`); with ``sites``, the last three keep to those sites (an
        outlier channel when flagged at one of them).

    Example:
        >>> data = summary(run)
        >>> [e["site"] for e in data["sites"]] == run.sites, data["sites"][0]["tokens"], data["massive"]
        (True, 10, [])
    """
    token_text = run.meta.get("token_text", {})
    rows = []
    for name in run.sites if sites is None else sites:
        if is_moe_site(name) or is_attention_site(name):  # their own statistic only: their own tables show it
            continue
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
        if s.has("histogram"):
            entry["quantiles"] = {str(q): v for q, v in zip(QUANTILES, s.quantile(QUANTILES).tolist())}
            entry["median_abs"] = median_abs(s)
        rows.append({k: _clean(v) for k, v in entry.items()})
    chosen = set(run.sites if sites is None else sites)
    geometry = research.summary(run)
    if sites is not None:  # only what concerns the chosen sites
        geometry = {"sites": [e for e in geometry["sites"] if e["site"] in chosen],
                    "block_influence": [b for b in geometry["block_influence"] if b["from"] in chosen or b["to"] in chosen],
                    "massive_topk": [m for m in geometry["massive_topk"] if m["site"] in chosen]}
    return {
        "file": run.path, "model": run.meta.get("model", {}).get("name_or_path") or
        run.meta.get("model", {}).get("class"), "windows": len(run.rows), "steps": run.steps,
        "skip_first": run.meta.get("skip_first"), "partial": run.meta.get("partial"), "sites": rows,
        "disabled": dict(run.meta.get("disabled") or {}),
        "outlier_channels": outlier_channels(run, at=None if sites is None else sorted(chosen, key=run.sites.index)),
        "research": geometry,
        "massive": [m for m in massive(run) if m["site"] in chosen],
    }


def outlier_channels(run: Run, at: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Channels meeting the LLM.int8() outlier rule (see the module docstring).

    Args:
        run: the run (sites without ``moments`` are left out).
        at: keep only the channels flagged at one of these sites (default: every flagged channel).

    Returns:
        ``[{"channel", "sites", "of"}]``: each channel flagged at ``sites`` of the ``of`` sites,
        most sites first.

    Example:
        >>> outlier_channels(run)  # a tiny random GPT-2 has none
        []
    """
    hits: dict[int, list[str]] = {}
    names = [n for n in run.sites if run[n].has("moments")]
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
    found = [{"channel": c, "sites": len(v), "of": len(names)} for c, v in hits.items()
             if len(v) >= need and (at is None or set(v) & set(at))]
    return sorted(found, key=lambda o: (-o["sites"], o["channel"]))


def massive(run: Run) -> list[dict[str, Any]]:
    """Massive activations over every real token (see module docstring), JSON-ready.

    The rule is :func:`probe.present.research.is_massive` (the one rule of ``probe show``).

    Args:
        run: the run (sites without a histogram have no median and are left out).

    Returns:
        One entry per site and kind: ``kind="sink"`` for the first ``max(skip_first, 1)``
        positions (``position`` is the one holding the largest value), ``kind="token"`` for the
        rest; each with ``row``, ``channel`` and ``token`` of the value: from the site's absmax, or
        from the top-k entry of that magnitude at that position (the per-position statistic keeps
        neither), ``None`` where neither holds it. ``absmax`` and
        ``median_abs`` are in activation units; ``ratio`` is ``absmax / median_abs``.

    Example:
        >>> massive(run)  # a tiny random GPT-2 has none
        []
    """
    out = []
    head = max(int(run.meta.get("skip_first") or 0), 1)
    for name in run.sites:
        s = run[name]
        med = median_abs(s)
        if not s.count or not med > 0:
            continue

        def hit(value: float) -> bool:
            return is_massive(value, med)

        per_pos = None
        if s.has("position"):
            per_pos = np.nan_to_num(s.position.absmax, nan=-1.0)
        if per_pos is not None and len(per_pos):
            first = per_pos[:head]
            p = int(np.argmax(first))
            if hit(float(first[p])):
                out.append({"site": name, "kind": "sink", "absmax": float(first[p]), "median_abs": med,
                            "ratio": float(first[p]) / med, "position": p,
                            **_stored_at(s, p, float(first[p]))})
        where: dict[str, int | None]
        if s.absmax_at["position"] >= head or per_pos is None:
            value, where = s.absmax, dict(s.absmax_at)
        elif len(per_pos) > head:  # the site's absmax is in the sink: the largest elsewhere
            p = head + int(np.argmax(per_pos[head:]))
            value = float(per_pos[p])
            where = {"position": p, **_stored_at(s, p, value)}
        else:
            continue
        if hit(value):
            out.append({"site": name, "kind": "token", "absmax": value, "median_abs": med, "ratio": value / med,
                        **where})
    return out


def _stored_at(s: Any, position: int, magnitude: float) -> dict[str, int | None]:
    """``row``, ``channel`` and ``token`` of the top-k entry at ``position`` whose ``|value|`` is
    ``magnitude`` (the per-position absmax keeps neither channel nor token; the top-k, over every
    real token, holds them when the value is among the site's k largest); ``None`` each without one."""
    if s.has("topk") and len(s.topk):
        t = s.topk
        match = np.flatnonzero((t["position"] == position)
                               & np.isclose(np.abs(t["value"].astype(np.float64)), magnitude, rtol=1e-6, atol=0))
        if match.size:
            e = t[int(match[0])]
            return {"row": int(e["row"]), "channel": int(e["channel"]), "token": int(e["token"])}
    return {"row": None, "channel": None, "token": None}


def _js(p: np.ndarray, q: np.ndarray) -> float:
    p = p / p.sum() if p.sum() else p
    q = q / q.sum() if q.sum() else q
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0  # where a > 0, m > 0 too
        return float((a[nz] * np.log2(a[nz] / m[nz])).sum())

    return float(max(0.0, (kl(p) + kl(q)) / 2))


def quantile_bounds(s: Any, q: Sequence[float] | np.ndarray) -> np.ndarray:
    """Where the exact quantiles of a site's kept values can lie, from its bucket counts alone.

    ``numpy.quantile`` interpolates between two order statistics; each lies in a known float-bit
    bucket, so the exact quantile lies between the lower edge of the first one's bucket and the
    upper edge of the second one's, cut to the site's exact ``[min, max]``. For lossless data
    (bf16) the interval is the quantile itself.

    Args:
        s: a :class:`~probe.results.run.SiteView` with ``histogram``.
        q: probabilities in ``[0, 1]``.

    Returns:
        float64 ``[len(q), 2]``: ``(low, high)`` per quantile, containing :meth:`SiteView.quantile`'s
        estimate; NaN without values.

    Raises:
        ProbeError: ``histogram`` not captured at this site; a ``q`` outside ``[0, 1]``.

    Example:
        >>> lo, hi = quantile_bounds(run[1], [0.5])[0]
        >>> bool(lo <= run[1].quantile(0.5) <= hi)
        True
    """
    from ..stats._buckets import Buckets

    qs = np.atleast_1d(np.asarray(q, dtype=np.float64))
    point = np.atleast_1d(s.quantile(qs))
    counts = s.histogram_counts
    if s.histogram_lossless:
        return np.stack([point, point], axis=1)
    c, a, b, _ = Buckets.of(np.shape(counts)[0]).sorted(np.asarray(counts), False)
    n = int(c.sum())
    if n == 0:
        return np.full((len(qs), 2), np.nan)
    cum = np.cumsum(c)
    prev = np.floor((n - 1) * qs).astype(np.int64)
    nxt = np.minimum(prev + 1, n - 1)
    low, high = a[np.searchsorted(cum, prev, side="right")], b[np.searchsorted(cum, nxt, side="right")]
    if s.has("moments") and s.count and np.isfinite(s.min) and np.isfinite(s.max):
        low, high = np.clip(low, s.min, s.max), np.clip(high, s.min, s.max)
    return np.stack([np.minimum(low, point), np.maximum(high, point)], axis=1)


def diff(a: Run, b: Run) -> list[dict[str, Any]]:
    """Per-site shift from run ``a`` to run ``b``: mean and std ratios, the shift of the
    :data:`DIFF_QUANTILES` and the Jensen–Shannon divergence (bits, 0..1) between the two bucket
    histograms. What ``probe diff --json`` prints.

    Args:
        a: the reference run.
        b: the run compared with it.

    Returns:
        One JSON-ready row per site present in both runs, in ``a``'s order: ``mean_a``,
        ``mean_b``, ``mean_shift`` (activation units), ``std_a``, ``std_b``, ``std_ratio``,
        ``tokens_a``, ``tokens_b``; with histograms in both, ``js`` (Jensen–Shannon divergence
        in bits, 0..1), ``quantile_shift`` (``{q: q_b - q_a}``, the estimates' difference) and
        ``quantile_shift_bounds`` (``{q: [low, high]}``: the exact shift lies inside, since each
        side's exact quantile lies inside :func:`quantile_bounds`; an interval holding 0 leaves
        the sign unresolved).

    Raises:
        ProbeError: the runs share no site; a site of both has different widths (channels) in
            each: runs of two different models.

    Example:
        >>> rows = diff(run, run)
        >>> len(rows), rows[0]["std_ratio"], rows[0]["js"]
        (3, 1.0, 0.0)
    """
    common = [n for n in a.sites if n in set(b.sites)]
    if not common:
        raise ProbeError(f"the runs share no site; expected common site names; got {a.sites[:3]} in "
                         f"{a.path or 'run a'} and {b.sites[:3]} in {b.path or 'run b'}; compare runs captured "
                         "with the same sites=")
    for name in common:  # same-named sites of two different models are no comparison
        sa, sb = a[name], b[name]
        if sa.has("moments") and sb.has("moments") and sa.count and sb.count:
            wa, wb = len(sa.channel), len(sb.channel)
            if wa != wb:
                raise ProbeError(f"site {name!r} is {wa} channels wide in {a.path or 'run a'} and {wb} in "
                                 f"{b.path or 'run b'}; expected runs of the same model (same widths); compare "
                                 "runs captured from one model")
    rows = []
    for name in common:
        sa, sb = a[name], b[name]
        row = {"site": name, "mean_a": sa.mean, "mean_b": sb.mean, "std_a": sa.std, "std_b": sb.std,
               "std_ratio": sb.std / sa.std if sa.std else float("nan"),
               "mean_shift": sb.mean - sa.mean, "tokens_a": sa.tokens, "tokens_b": sb.tokens}
        if sa.has("histogram") and sb.has("histogram") and sa.histogram_counts.shape == sb.histogram_counts.shape:
            with np.errstate(all="ignore"):
                row["js"] = _js(sa.histogram_counts.astype(np.float64), sb.histogram_counts.astype(np.float64))
            qa, qb = sa.quantile(DIFF_QUANTILES), sb.quantile(DIFF_QUANTILES)
            row["quantile_shift"] = {str(q): float(y - x) for q, x, y in zip(DIFF_QUANTILES, qa, qb)}
            ba, bb = quantile_bounds(sa, DIFF_QUANTILES), quantile_bounds(sb, DIFF_QUANTILES)
            row["quantile_shift_bounds"] = {str(q): [float(bb[i, 0] - ba[i, 1]), float(bb[i, 1] - ba[i, 0])]
                                            for i, q in enumerate(DIFF_QUANTILES)}
        rows.append({k: _clean(v) for k, v in row.items()})
    return rows


def describe(run: Run) -> dict[str, Any]:
    """What a run was captured with, as :func:`diff_warnings` compares it.

    Args:
        run: the run.

    Returns:
        ``{"model", "skip_first", "sites", "stats", "mask_policy", "dtype", "kept_tokens",
        "real_tokens"}``: the model's name, ``skip_first``, the site names, the statistics
        captured (sorted), the padding rule, the sites' dtypes (sorted), the kept tokens (those
        the statistics cover) and the real tokens (every non-padding token, from the
        per-position counts; ``None`` without ``position``) of the first site.

    Example:
        >>> d = describe(run)
        >>> d["skip_first"], d["kept_tokens"] == d["real_tokens"] == run[0].tokens, len(d["sites"])
        (0, True, 3)
    """
    m = run.meta.get("model", {})
    first = run[run.sites[0]] if run.sites else None
    real = None
    if first is not None and first.has("position") and len(first.position):
        real = int(np.asarray(first.position.tokens).sum())
    return {"model": str(m.get("name_or_path") or m.get("class") or "?"), "skip_first": run.meta.get("skip_first"),
            "sites": list(run.sites), "stats": sorted(run.meta.get("stats") or []),
            "mask_policy": run.meta.get("mask_policy"), "dtype": sorted({run[n].dtype for n in run.sites} - {""}),
            "kept_tokens": first.tokens if first is not None else 0, "real_tokens": real}


def diff_warnings(a: Run, b: Run) -> list[str]:
    """What makes runs ``a`` and ``b`` hard to compare, from their descriptions (:func:`describe`):
    another model, dtype, ``skip_first``, site list, statistics, padding rule, or number of
    tokens, and a partial run. A token count that differs only because ``skip_first`` does is
    said as such (the same real tokens, a different share of them kept), not blamed on the data.

    Args:
        a, b: the runs to compare.

    Returns:
        One line per difference, naming it and what it does to the shifts; empty when they match.

    Example:
        >>> diff_warnings(run, run)
        []
    """
    out = []
    da, db = describe(a), describe(b)
    if da["model"] != db["model"]:
        out.append(f"the runs come from different models ({da['model']} vs {db['model']})")
    if da["dtype"] != db["dtype"]:
        out.append(f"the runs differ in dtype ({', '.join(da['dtype']) or '?'} vs {', '.join(db['dtype']) or '?'})")
    if da["mask_policy"] != db["mask_policy"]:
        out.append(f"the runs treat padding differently ({da['mask_policy']!r} vs {db['mask_policy']!r})")
    if da["skip_first"] != db["skip_first"]:
        same = da["real_tokens"] is not None and da["real_tokens"] == db["real_tokens"]
        out.append(f"the runs differ in skip_first ({da['skip_first']} vs {db['skip_first']}): their statistics "
                   f"cover different tokens ({da['kept_tokens']} vs {db['kept_tokens']} kept"
                   + (f" of the same {da['real_tokens']} real tokens" if same else "") + "), so the shifts mix the "
                   "first tokens' effect with the model's; capture both with the same --skip-first")
    elif da["kept_tokens"] != db["kept_tokens"]:
        out.append(f"the runs saw different numbers of tokens ({da['kept_tokens']} vs {db['kept_tokens']}): "
                   "the shifts mix data and model")
    if da["sites"] != db["sites"]:
        only_a = [n for n in da["sites"] if n not in set(db["sites"])]
        only_b = [n for n in db["sites"] if n not in set(da["sites"])]
        shared = len(da["sites"]) - len(only_a)
        out.append(f"the runs captured different sites ({len(only_a)} only in a, {len(only_b)} only in b"
                   + (", the same ones in another order" if not only_a and not only_b else "")
                   + f"); compared on the {shared} they share")
    if da["stats"] != db["stats"]:
        sa, sb = set(da["stats"]), set(db["stats"])
        out.append("the runs captured different statistics (only in a: " + (", ".join(sorted(sa - sb)) or "none")
                   + "; only in b: " + (", ".join(sorted(sb - sa)) or "none") + "); what needs them is left out")
    for r, tag in ((a, "a"), (b, "b")):
        if r.meta.get("partial"):
            out.append(f"run {tag} ({r.path}) is partial: {r.meta['partial'].get('reason', 'interrupted')}")
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "–"
        return f"{v:.3g}"
    return str(v)


def _where(at: dict, wide: bool) -> str:
    where = f"p{at['position']} c{at['channel']}"
    if not wide:
        return where
    where = f"r{at['row']} " + where
    if "text" in at:
        where += f" {at['text']!r}"
    elif at["token"] is not None and at["token"] >= 0:
        where += f" #{at['token']}"
    return where


def _compact(names: list[str]) -> str:
    """``["1", "2", "3", "7"]`` -> ``"1–3, 7"``; other names joined with commas (at most 8)."""
    if not all(n.isdigit() for n in names):
        return ", ".join(names[:8]) + (" …" if len(names) > 8 else "")
    nums, parts = sorted(int(n) for n in names), []
    start = prev = nums[0]
    for k in nums[1:] + [None]:
        if k is not None and k == prev + 1:
            prev = k
            continue
        parts.append(f"{start}" if start == prev else f"{start}–{prev}")
        if k is not None:
            start = prev = k
    return ", ".join(parts)


def _cut(text: str, width: int) -> str:
    """``text`` cut at a word boundary to at most ``width`` characters, with ``…`` when cut."""
    if len(text) <= width:
        return text
    head = text[: width - 1]
    return (head.rsplit(" ", 1)[0] if " " in head else head) + "…"


def _partial_line(partial: dict[str, Any]) -> str:
    done = partial.get("batches")
    return (f"[bold yellow]partial run[/]: {partial.get('reason', 'interrupted')}"
            + (f" after {done} complete batch(es)" if done is not None else "")
            + "; the numbers cover only what ran")


def _print_massive(console: Any, data: dict[str, Any], site: str | None, prefix: str) -> None:
    """The one massive-activation block of ``probe show``: the attention sink, the other tokens and
    the top-k entries, under the one rule (:func:`probe.present.research.is_massive`). ``prefix``
    is cut from site names (``"hidden_states."`` when every site is a layer)."""
    short = bool(prefix)
    found = [m for m in data["massive"] if site is None or m["site"] == site]
    in_topk = [h for h in data["research"]["massive_topk"] if site is None or h["site"] == site]
    if found or in_topk:
        console.print(f"[bold red]massive activations[/] (|x| > {MASSIVE_VALUE:g} and > {MASSIVE_RATIO:g}× the "
                      "site's median |x|, Sun et al. 2024; over every real token):")
        for kind, label in (("sink", f"attention sink (first {max(int(data['skip_first'] or 0), 1)} position(s))"),
                            ("token", "other tokens")):
            hits = [m for m in found if m["kind"] == kind]
            if not hits:
                continue
            big = max(hits, key=lambda m: m["absmax"])
            names = _compact([m["site"][len(prefix):] if short else m["site"] for m in hits])
            where = f"p{big['position']}" + (f" c{big['channel']}" if big["channel"] is not None else "")
            console.print(f"  {label}: {len(hits)} {'layer' if short else 'site'}(s) {names}; largest "
                          f"{big['absmax']:.4g} = ×{big['ratio']:.3g} the median |x| "
                          f"({'layer ' + big['site'][len(prefix):] if short else big['site']}, {where})")
        if in_topk:
            console.print(f"  in the top-k: {len(in_topk)}, e.g. "
                          + ", ".join(f"{'layer ' + h['site'][len(prefix):] if short else h['site']} "
                                      f"{h['value']:.4g} at p{h['position']} c{h['channel']}"
                                      + (f" {h['text']!r}" if "text" in h else "") for h in in_topk[:4])
                          + (" …" if len(in_topk) > 4 else ""))


def print_summary(run: Run, console=None, site: str | None = None) -> None:
    """The ``probe show`` table: one row per site (or only ``site``), then the flags.

    Columns shown depend on the console width (``min``/``max`` and the row and token of the
    absmax need 120 columns); the caption describes the columns actually shown. The massive
    activations of :func:`massive` and :func:`probe.present.research.massive_topk` print as one
    block under one rule.

    Args:
        run: the run.
        console: a ``rich.console.Console`` (default: a new one on stdout).
        site: print only this site's row, and its quantiles, largest channels and top-k.

    Example:
        >>> from rich.console import Console
        >>> console = Console(width=160, record=True, file=open(os.devnull, "w"))
        >>> print_summary(run, console)
        >>> "hidden-state geometry" in console.export_text()
        True
    """
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    data = summary(run, sites=None if site is None else [site])
    title = f"{data['file'] or 'run'} · {data['model']} · {data['windows']} window(s) · skip_first={data['skip_first']}"
    if data["partial"]:
        title += " · PARTIAL"
    wide = console.width >= 120
    at_doc = ("row, position, channel and token of the largest |x|" if wide
              else "position and channel of the largest |x| (row and token: 120+ columns or --json)")
    table = Table(title=title, header_style="bold", caption=f"at: {at_doc}", pad_edge=False)
    prefix = "hidden_states."
    short = all(e["site"].startswith(prefix) for e in data["sites"])
    cols = ["layer" if short else "site", "tokens", "mean", "std", "skew", "kurt"]
    cols += ["min", "max", "absmax", "at"] if wide else ["absmax", "at"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("site", "at") else "right", no_wrap=col != "at")
    table.columns[0].justify = "left"
    # sites with only their own statistic (attention, mixture of experts) have their own tables
    general = [e for e in data["sites"] if site is None or e["site"] == site]
    flagged = {m["site"] for m in data["massive"]}
    for e in data["sites"]:
        if site is not None and e["site"] != site:
            continue
        name = e["site"][len(prefix):] if short else e["site"]
        name = f"[bold red]{name}[/]" if e["site"] in flagged else name
        cells = [name, _fmt(e["tokens"]), _fmt(e["mean"]), _fmt(e["std"]), _fmt(e["skew"]), _fmt(e["kurtosis"])]
        cells += [_fmt(e["min"]), _fmt(e["max"])] if wide else []
        table.add_row(*cells, _fmt(e["absmax"]), _where(e["absmax_at"], wide))
    if general:
        console.print(table)
        research.print_research(run, console, site)
    else:
        console.print(f"[bold]{title}[/]")
    if data["partial"]:
        console.print(_partial_line(data["partial"]))
    if data["disabled"]:
        from rich.markup import escape

        items = [escape(f"{n} ({_cut(why.splitlines()[0], 100) if why else 'disabled'})")
                 for n, why in data["disabled"].items()]
        console.print(f"[bold yellow]{len(items)} site(s) recorded nothing or were disabled:[/] "
                      + "; ".join(items[:8]) + (" …" if len(items) > 8 else ""), soft_wrap=True)
    if site is not None and general:
        e = general[0]
        if "quantiles" in e:
            console.print("quantiles: " + ", ".join(f"q{q}={_fmt(v)}" for q, v in e["quantiles"].items()))
        s = run[site]
        if s.has("moments"):
            top = np.argsort(-np.nan_to_num(s.channel.absmax, nan=-1))[:8]
            console.print("largest channels: " + ", ".join(f"{c} ({s.channel.absmax[c]:.4g})" for c in top))
        if s.nan or s.posinf or s.neginf:
            console.print(f"[yellow]non-finite: nan={s.nan} +inf={s.posinf} -inf={s.neginf}[/]")
    _print_massive(console, data, site, prefix if short else "")
    if data["outlier_channels"]:
        console.print(f"[bold yellow]outlier channels[/] (|x| ≥ {OUTLIER_VALUE:g} in ≥ {OUTLIER_TOKENS:.0%} of tokens "
                      f"at ≥ {OUTLIER_SITES:.0%} of sites, RMS ≥ {OUTLIER_RMS:g}× the median channel's): "
                      + ", ".join(f"{o['channel']} ({o['sites']}/{o['of']})" for o in data["outlier_channels"][:12])
                      + (f" … {len(data['outlier_channels'])} in all" if len(data["outlier_channels"]) > 12 else ""))


def print_diff(rows: list[dict[str, Any]], console=None) -> None:
    """The ``probe diff`` table: one row per common site; quantile shifts of :data:`DIFF_QUANTILES`.

    Args:
        rows: :func:`diff`'s rows.
        console: a ``rich.console.Console`` (default: a new one on stdout).

    Example:
        >>> from rich.console import Console
        >>> console = Console(width=120, record=True, file=open(os.devnull, "w"))
        >>> print_diff(diff(run, run), console)
        >>> "distribution shift" in console.export_text()
        True
    """
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="distribution shift (A → B)", header_style="bold",
                  caption="Δq: quantile of B minus quantile of A, as the interval the histogram buckets bound "
                          "the exact shift to (dim: it holds 0, the sign is not resolved; one number: exact; below 2⁻²³ × the "
                          "larger std: 0); "
                          "JS: Jensen–Shannon divergence of the histograms")
    qcols = [f"Δq{q:g}" for q in DIFF_QUANTILES]
    for col in ("site", "mean A", "mean B", "std B/A", "JS (bits)", *qcols):
        table.add_column(col, justify="left" if col == "site" else "right")
    for r in rows:
        bounds = r.get("quantile_shift_bounds") or {}
        res = resolution(r)
        table.add_row(r["site"], _fmt(shown(r["mean_a"], res)), _fmt(shown(r["mean_b"], res)), _fmt(r["std_ratio"]),
                      _fmt(r.get("js")), *(_interval(bounds.get(str(q)), res) for q in DIFF_QUANTILES))
    console.print(table)


#: the relative resolution of a printed shift: float32's machine epsilon (2**-23, about 1.2e-7)
RESOLUTION = 2.0 ** -23


def resolution(row: dict[str, Any]) -> float:
    """The smallest shift :func:`print_diff` and the report print as other than 0, for one
    :func:`diff` row: :data:`RESOLUTION` × the larger of the two stds. A float32 activation of
    the site's scale cannot resolve a difference below it, so a shift such as ±9e-41 (two
    near-zero quantiles a denormal apart) is no shift at all. The JSON keeps the raw numbers.

    Args:
        row: one row of :func:`diff`.

    Returns:
        The resolution in activation units (0 when neither std is finite).

    Example:
        >>> resolution({"std_a": 2.0, "std_b": 4.0}) == 4.0 * 2.0 ** -23
        True
    """
    stds = [abs(v) for v in (row.get("std_a"), row.get("std_b")) if v is not None and math.isfinite(v)]
    return RESOLUTION * max(stds, default=0.0)


def shown(value: float | None, res: float) -> float | None:
    """``value`` as printed: 0.0 when its magnitude is below ``res`` (:func:`resolution`).

    Example:
        >>> shown(9e-41, 1e-7), shown(-3e-3, 1e-7), shown(None, 1e-7)
        (0.0, -0.003, None)
    """
    if value is None or not math.isfinite(value) or abs(value) >= res:
        return value
    return 0.0


def _interval(pair: list[float] | None, res: float = 0.0) -> str:
    """A shift interval as the table prints it: ``a … b`` (dim when it holds 0), or one number
    when both ends agree to the digits shown; an end below ``res`` (:func:`resolution`) prints as 0."""
    if pair is None or pair[0] is None or pair[1] is None:
        return "–"
    lo, hi = (0.0 if abs(v) < res else v for v in pair)
    if f"{lo:+.3g}" == f"{hi:+.3g}":
        return f"{lo:+.3g}"
    text = f"{lo:+.3g} … {hi:+.3g}"
    return f"[dim]{text}[/]" if lo <= 0 <= hi else text


def _pct(pair: list[float] | None, exact: bool | None) -> str:
    if pair is None:
        return "–"
    lo, hi = pair
    if exact or lo == hi:
        return f"{100 * lo:.3g}%"
    return f"{100 * lo:.3g}–{100 * hi:.3g}%"


def print_quant(rows: list[dict[str, Any]], console=None) -> None:
    """The table of :func:`probe.present.quant.report`: per site, the share of values that would clip and
    flush to zero at the given per-tensor scale, and of ``|x| >= 6``; a range ``a–b`` is a bound
    (the threshold fell inside one histogram bucket), a single number is exact.

    Args:
        rows: :func:`probe.present.quant.report`'s rows.
        console: a ``rich.console.Console`` (default: a new one on stdout).

    Example:
        >>> from rich.console import Console
        >>> from probe.present.quant import report
        >>> console = Console(width=120, record=True, file=open(os.devnull, "w"))
        >>> print_quant(report(run, "fp8"), console)
        >>> "per-tensor" in console.export_text()
        True
    """
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    fmt = rows[0]["format"] if rows else ""
    table = Table(title=f"per-tensor {fmt} quantization", header_style="bold", pad_edge=False,
                  caption="a–b: bound (threshold inside one histogram bucket); single value: exact; "
                          "max at p0: the first token holds the largest |x| (× its lead over later tokens)")
    for col in ("site", "values", "amax", "scale", "clip", "flush", "|x|≥6", "max at"):
        table.add_column(col, justify="left" if col in ("site", "max at") else "right", no_wrap=col != "site")
    first = []
    for r in rows:
        ft = r.get("first_token")
        where = "–"
        if ft is not None:
            where = f"p0 c{ft['channel']}" + (f" {ft['ratio']:.3g}×" if ft.get("ratio") else "")
            first.append(r["site"])
        table.add_row(r["site"], _fmt(r["count"]), _fmt(r["amax"]), _fmt(r["scale"]),
                      _pct(r["clip"], r["clip_exact"]), _pct(r["flush"], r["flush_exact"]),
                      _pct(r["large"], r["large_exact"]), where)
    console.print(table)
    if first:
        console.print(f"[bold yellow]first token holds the largest |x|[/] at {len(first)} of {len(rows)} sites "
                      "(its channel sets the per-tensor amax; consider skip_first or per-channel scales): "
                      + ", ".join(first[:6]) + (" …" if len(first) > 6 else ""))
