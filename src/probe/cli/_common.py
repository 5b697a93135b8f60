"""What several commands share: opening a run, checking ``-o``, the console tables print to."""

from __future__ import annotations

__all__ = ["load", "check_out", "stdout", "writer_gone"]


def load(path: str):
    """The run file at ``path`` (:func:`probe.store.read`: one-line errors for bad files).

    Raises:
        ProbeError: the file is missing or not a run; ``FileFormatError`` also for any other
            error opening it (a file the reader's checks let through, found out one step later),
            naming the error, so that the command says the file is at fault.
    """
    from ..errors import FileFormatError, ProbeError
    from ..store import read

    _refuse_html(path)
    try:
        return read(path)
    except (ProbeError, OSError):
        raise
    except Exception as err:  # e.g. RecursionError from deeply nested JSON, TypeError from odd types
        raise FileFormatError(f"{path!r} is not a readable probe run ({type(err).__name__}: {err}); "
                              "the file is damaged or was not written by probe") from err


def _refuse_html(path: str) -> None:
    """One line for a ``probe report`` page given where a run is expected."""
    from ..errors import ProbeError

    try:
        with open(path, "rb") as f:
            head = f.read(64).lstrip().lower()
    except OSError:
        return  # the reader says what is wrong with the path
    if head.startswith((b"<!doctype html", b"<html")):
        raise ProbeError(f"{path!r} is an HTML report (probe report), not an HDF5 run; open it in a browser, "
                         "or pass the .h5 run it was made from")


def check_out(out: str, overwrite: bool) -> None:
    """Refuse an ``-o`` that cannot be written, in the flag's words, before any work starts."""
    from ..store import check_writable

    check_writable(out, overwrite, flag="-o")


def stdout():
    """A rich console on stdout; for a pipe or a file, wide enough for every column (no terminal
    width to respect there, and a script should not get fewer columns than a person)."""
    from rich.console import Console

    class PipeConsole(Console):
        def on_broken_pipe(self) -> None:
            # rich exits with status 1 here; a reader that stops early (`probe show run.h5 | head -1`)
            # is no error: raise what probe.cli.main turns into a quiet exit 0
            self.quiet = True
            raise BrokenPipeError

    console = PipeConsole()
    return console if console.is_terminal else PipeConsole(width=max(console.width, 160))


def writer_gone(path: str) -> str | None:
    """One line when the writer of ``path`` died with it open (:func:`probe.store.lock.orphaned`):
    the file holds what that writer committed, nothing more will come, and ``probe repair`` clears
    what it left; None otherwise."""
    from ..store.lock import orphaned

    owner = orphaned(path)
    if owner is None:
        return None
    return (f"the writer of {path!r} ({owner}) is gone without closing the file: it holds the windows that "
            f"writer committed and will not grow; run `probe repair {path}` to clear what it left")
