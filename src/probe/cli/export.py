"""``probe export FORMAT RUN [RUN ...] -o PATH``: calibration files other tools read
(SmoothQuant act scales, a llama.cpp imatrix, an amax JSON) or TensorBoard events."""

from __future__ import annotations

__all__ = ["add_parser", "command"]


def add_parser(sub) -> None:
    from ..export import FORMATS

    p = sub.add_parser("export", help="write calibration files (smoothquant, imatrix, amax) or TensorBoard events",
                       description="Write SmoothQuant act scales, a llama.cpp imatrix or an amax JSON from runs "
                                   "captured with --sites linear_inputs (several runs are merged exactly), "
                                   "or TensorBoard events (every window at its step) into the folder -o.")
    p.add_argument("format", choices=FORMATS)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run files (merged exactly)")
    p.add_argument("-o", "--out", required=True, help="output file (.pt, .gguf, .json), or a log folder for tensorboard")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--arch", default=None, help="imatrix: llama.cpp architecture (default: from model_type)")
    p.add_argument("--dataset", action="append", default=None, help="imatrix: imatrix.datasets entry (repeatable)")
    p.add_argument("--chunk-size", type=int, default=512, help="imatrix: imatrix.chunk_size (default 512)")
    p.add_argument("--min-tokens", type=int, default=16,
                   help="mixture-of-experts coverage: name the experts with fewer tokens (default 16)")
    p.set_defaults(func=command)


def command(args) -> int:
    from ..export import FILES, export
    from ..store import check_writable

    if args.format != "tensorboard":  # a log folder there; a file here, checked in -o's words
        check_writable(args.out, args.overwrite, flag="-o", file=FILES[args.format])
    done = export(args.format, args.runs, args.out, overwrite=args.overwrite, arch=args.arch,
                  datasets=args.dataset, chunk_size=args.chunk_size, min_tokens=args.min_tokens)
    if args.format == "tensorboard":
        print(f"wrote TensorBoard events to {done['logdir']}: tensorboard --logdir {done['logdir']}")
        return 0
    count = len(done["modules"]) if args.format == "amax" else len(done)
    print(f"wrote {args.out}: {args.format}, {count} modules from {len(args.runs)} run(s)")
    from ..export import expert_coverage

    for row in expert_coverage(args.runs, args.min_tokens):  # mixture-of-experts layers: data per expert
        print(f"  {row['module']}: {row['experts']} experts, tokens {row['least']}..{row['most']}; "
              f"no token: {row['zero'] or 'none'}; < {row['min_tokens']}: {row['below'] or 'none'}")
    return 0
