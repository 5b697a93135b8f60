"""``probe show RUN [--site S] [--json] [--quant fp8|int8 [--scale X]]``: a run's statistics as a table."""

from __future__ import annotations

import json
import sys

from ..errors import ProbeError
from ._common import load, stdout, writer_gone

__all__ = ["add_parser", "command"]


def add_parser(sub) -> None:
    p = sub.add_parser("show", help="print a run's statistics as a table")
    p.add_argument("file")
    p.add_argument("--site", default=None,
                   help="one site in detail: its name, or the layer number the table shows (e.g. 5)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts (honours --site)")
    p.add_argument("--quant", choices=("fp8", "int8"), default=None,
                   help="per site: share of values that would clip / flush to zero at per-tensor scale")
    p.add_argument("--scale", type=float, default=None,
                   help="with --quant: one scale for every site (default: each site's amax / qmax)")
    p.add_argument("--min-tokens", type=int, default=16,
                   help="with --quant: name the mixture-of-experts experts with fewer tokens (default 16)")
    p.set_defaults(func=command)


def command(args) -> int:
    if getattr(args, "scale", None) is not None and not getattr(args, "quant", None):
        raise ProbeError(f"--scale: only used with --quant, got --scale {args.scale} alone; "
                         "pass --quant fp8 or --quant int8 with it")
    if getattr(args, "quant", None):
        return _quant(args)
    from ..present.report import print_summary, resolve_site, summary

    run = load(args.file)
    gone = writer_gone(args.file)
    if gone is not None:  # on stderr: --json stays parseable
        print(f"probe show: note: {gone}", file=sys.stderr)
    site = resolve_site(run, args.site) if args.site is not None else None
    if args.json:
        data = summary(run, sites=None if site is None else [site])
        from ..present.experts import has_moe, moe_table

        if has_moe(run):  # the mixture-of-experts layers' routing, as the table shows it
            data["moe"] = moe_table(run)
        from ..present.attention import attention_table, has_attention

        if has_attention(run):  # the attention sites' MaxLogit, as the table shows it
            data["attention"] = [r for r in attention_table(run) if site is None or r["site"] == site]
        print(json.dumps(data, indent=1))
        return 0
    print_summary(run, console=stdout(), site=site)
    from ..present.experts import has_moe, moe_table, print_moe

    if has_moe(run) and (site is None or site.endswith((":router", ":experts", ":down_proj"))):
        rows = [r for r in moe_table(run) if site is None or site in (r["router"], r["experts"], r.get("down"))]
        print_moe(rows, console=stdout())
    from ..present.attention import attention_table, has_attention, print_attention

    if has_attention(run) and (site is None or site.endswith(":attention")):
        print_attention([r for r in attention_table(run) if site is None or r["site"] == site], console=stdout())
    return 0


def _quant(args) -> int:
    """``--quant``: per site, the share of values a per-tensor fp8/int8 scale clips or flushes."""
    from ..present.quant import report
    from ..present.report import print_quant, resolve_site

    run = load(args.file)
    sites = [resolve_site(run, args.site)] if getattr(args, "site", None) is not None else None
    rows = report(run, args.quant, scale=args.scale, sites=sites)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print_quant(rows, console=stdout())  # piped: wide enough for the site names
        from ..present.experts import coverage_table, print_coverage

        print_coverage(coverage_table(run, getattr(args, "min_tokens", 16)), console=stdout())
    return 0
