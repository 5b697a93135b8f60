"""Tables of the attention sites (``"<module>:attention"``): MaxLogit per layer, its head and token.

Recipe::

    rows = attention_table(run)     # one dict per attention site
    print_attention(rows)           # the table ``probe show`` prints after the summary
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..results.attention import SUFFIX

__all__ = ["has_attention", "attention_table", "print_attention"]


def has_attention(run) -> bool:
    """Whether ``run`` holds attention sites."""
    return any(name.endswith(SUFFIX) and run[name].has("attention") for name in run.sites)


def _finite(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def attention_table(run) -> list[dict[str, Any]]:
    """Per attention site, in site order: ``site, heads, tokens, maxlogit`` (the largest over
    heads), ``head`` (which), ``row, query, key, token`` (where: query and key positions),
    ``maxlogit_heads`` (per head), ``entropy`` (mean over heads of the mean entropy, nats),
    ``entropy_min`` (the head with the lowest mean entropy: its value), ``sink`` (mean over heads
    of the mean probability on the first allowed key) and ``nonfinite``."""
    rows = []
    for name in run.sites:
        if not name.endswith(SUFFIX) or not run[name].has("attention"):
            continue
        a = run[name].attention
        h = a.argmax_head
        at = a.maxlogit_at[h] if a.heads else np.full(4, -1)
        seen = np.isfinite(a.entropy_mean)
        rows.append({
            "site": name, "heads": a.heads, "tokens": a.tokens, "maxlogit": _finite(a.max), "head": h,
            "row": int(at[0]), "query": int(at[1]), "key": int(at[2]), "token": int(at[3]),
            "maxlogit_heads": [_finite(v) for v in a.maxlogit.tolist()],
            "entropy": float(np.mean(a.entropy_mean[seen])) if seen.any() else None,
            "entropy_min": float(np.min(a.entropy_mean[seen])) if seen.any() else None,
            "sink": float(np.mean(a.sink_mass[seen, 0])) if seen.any() else None,
            "nonfinite": int(a.nonfinite.sum()),
        })
    return rows


def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def print_attention(rows: list[dict[str, Any]], console=None) -> None:
    """The table of :func:`attention_table` (``rich``)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="attention: MaxLogit per layer", header_style="bold", pad_edge=False,
                  caption="MaxLogit: largest q·k·scaling over real queries and allowed keys (QK-Clip) · at: "
                          "row, query position -> key position, query token · entropy: mean over heads, nats "
                          "(lowest head) · sink: mean probability on the first allowed key")
    for col in ("site", "H", "tokens", "MaxLogit", "head", "at", "entropy", "sink", "non-finite"):
        table.add_column(col, justify="left" if col in ("site", "at") else "right", no_wrap=True)
    for r in rows:
        at = "–" if r["row"] < 0 else f"{r['row']}, {r['query']} -> {r['key']}, tok {r['token']}"
        ent = "–" if r["entropy"] is None else f"{r['entropy']:.3g} ({r['entropy_min']:.3g})"
        table.add_row(r["site"], str(r["heads"]), str(r["tokens"]), _num(r["maxlogit"]), str(r["head"]), at, ent,
                      _num(r["sink"], 3), str(r["nonfinite"]))
    console.print(table)
