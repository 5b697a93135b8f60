"""``probe run · show · plot · diff · merge · export · cache · report · timeline · watch``: one module per subcommand.

Each command module holds a parser and its command: ``add_parser(sub)`` (ending in
``set_defaults(func=command)``) and ``command(args) -> int``. To add a subcommand, write such a
module and list its ``add_parser`` in :data:`COMMANDS`.

Whatever goes wrong prints one line on stderr, ``probe <command>: error: ...``: a user error
(``ProbeError``: its message; an unreadable path: ``OSError``) exits with status 2, anything else
(``<type>: <message>``) with status 1, and Ctrl-C with 130. ``--debug`` (before or after the
command) or ``PROBE_DEBUG=1`` raises instead, showing the traceback. Control characters in a
message are escaped, and a very long message is cut. Every value of ``probe run`` is checked
before the model loads.
Nothing here imports torch, matplotlib or h5py at import time: ``probe show`` stays quick.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from ..errors import ProbeError
from . import cache, diff, export, merge, plot, repair, report, run, show, timeline, watch

__all__ = ["main", "build_parser", "COMMANDS", "one_line"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``probe run: error: ...; see probe run -h``."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} -h\n")


#: every subcommand, in ``probe -h`` order: each adds its parser (and its command via set_defaults)
COMMANDS = (run.add_parser, show.add_parser, plot.add_parser, diff.add_parser, merge.add_parser,
            export.add_parser, cache.add_parser, report.add_parser, repair.add_parser,
            timeline.add_parser, watch.add_parser)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(prog="probe", description="See inside transformers while they run.")
    parser.add_argument("--version", action="version", version=f"probe {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors (default: off; also PROBE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in COMMANDS:
        add(sub)
    for command in sub.choices.values():  # also after the command; absent there, the global value stands
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks instead of one-line errors (default: off; also PROBE_DEBUG=1)")
    return parser


#: the longest message printed (a hostile file's names can be megabytes)
MAX_MESSAGE = 1000
#: C0 and C1 control characters and DEL: printed escaped, never sent raw to the terminal
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}


def one_line(text: str) -> str:
    """``text`` as one printable line: the first non-blank line, control characters escaped
    (``\\x1b``), cut to :data:`MAX_MESSAGE` characters."""
    lines = [line for line in str(text).splitlines() if line.strip()]
    first = (lines[0] if lines else "").strip().translate(_CONTROL)
    return first if len(first) <= MAX_MESSAGE else first[:MAX_MESSAGE - 1] + "…"


def _message(err: BaseException) -> str:
    """What ``probe <command>: error:`` says of ``err``: a ProbeError's own message, otherwise its
    type and message (the type alone when it has none)."""
    text = one_line(str(err))
    if isinstance(err, ProbeError) and text:
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    text = one_line(str(message))
    return (text if text.startswith("probe") else f"probe: {category.__name__}: {text}") + "\n"


def _debug(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("PROBE_DEBUG", "").strip() not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    """Run one ``probe`` command; the exit status (0 done, 2 user error, 1 unexpected error, 130
    interrupted). With ``--debug`` or ``PROBE_DEBUG=1`` an error is raised instead."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = _debug(args)
    formatwarning = warnings.formatwarning
    if not debug:  # probe's warnings as one line each, not a source path and line
        warnings.formatwarning = _one_line_warning
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"probe {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`probe show run.h5 | head`): not an error
        # Python's recipe (docs: signal, "Note on SIGPIPE"): send what is left nowhere, exit quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as err:  # nothing a command raises reaches the terminal as a traceback
        if debug:
            raise
        print(f"probe {args.command}: error: {_message(err)}", file=sys.stderr)
        return 2 if isinstance(err, (ProbeError, OSError)) else 1
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
