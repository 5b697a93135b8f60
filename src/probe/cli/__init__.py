"""``probe run · show · plot · diff · merge · export · cache``: one module per subcommand.

Each command module holds a parser and its command: ``add_parser(sub)`` (ending in
``set_defaults(func=command)``) and ``command(args) -> int``. To add a subcommand, write such a
module and list its ``add_parser`` in :data:`COMMANDS`.

User errors print one line on stderr, ``probe <command>: error: ...``, and exit with status 2;
``--debug`` shows the traceback. Every value of ``probe run`` is checked before the model loads.
Nothing here imports torch, matplotlib or h5py at import time: ``probe show`` stays quick.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from ..errors import ProbeError
from . import cache, diff, export, merge, plot, report, run, show

__all__ = ["main", "build_parser", "COMMANDS"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``probe run: error: ...; see probe run -h``."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} -h\n")


#: every subcommand, in ``probe -h`` order: each adds its parser (and its command via set_defaults)
COMMANDS = (run.add_parser, show.add_parser, plot.add_parser, diff.add_parser, merge.add_parser,
            export.add_parser, cache.add_parser, report.add_parser)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(prog="probe", description="See inside transformers while they run.")
    parser.add_argument("--version", action="version", version=f"probe {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in COMMANDS:
        add(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    text = str(message)
    return (text if text.startswith("probe") else f"probe: {category.__name__}: {text}") + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    formatwarning = warnings.formatwarning
    if not args.debug:  # probe's warnings as one line each, not a source path and line
        warnings.formatwarning = _one_line_warning
    try:
        return args.func(args)
    except (ProbeError, OSError) as err:
        if args.debug:
            raise
        print(f"probe {args.command}: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"probe {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
