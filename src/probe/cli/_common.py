"""What several commands share: opening a run, checking ``-o``, the console tables print to."""

from __future__ import annotations

__all__ = ["load", "check_out", "stdout"]


def load(path: str):
    """The run file at ``path`` (:func:`probe.store.read`: one-line errors for bad files)."""
    from ..store import read

    return read(path)


def check_out(out: str, overwrite: bool) -> None:
    """Refuse an ``-o`` that cannot be written, in the flag's words, before any work starts."""
    from ..store import check_writable

    check_writable(out, overwrite, flag="-o")


def stdout():
    """A rich console on stdout; for a pipe or a file, wide enough for every column (no terminal
    width to respect there, and a script should not get fewer columns than a person)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 160))
