"""``probe merge RUN [RUN ...] -o OUT``: join run files (ranks, shards) exactly into one."""

from __future__ import annotations

from ._common import check_out

__all__ = ["add_parser", "command"]


def add_parser(sub) -> None:
    p = sub.add_parser("merge", help="merge run files exactly (ranks, shards)")
    p.add_argument("files", nargs="+")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=command)


def command(args) -> int:
    from .. import merge

    check_out(args.out, args.overwrite)
    run = merge(args.files, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}: {len(args.files)} files, {len(run.rows)} window(s)")
    return 0
