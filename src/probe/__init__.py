"""probe: streaming statistics of a transformer's activations, captured while it runs.

    import probe
    with probe.capture(model, out="run.h5", skip_first=1) as run:
        for batch in loader:
            model(**batch)
    r = probe.load("run.h5")
    r["hidden_states.5"].kurtosis, r["hidden_states.5"].quantile(0.999), r.cross.r2
"""

import os
import sys
import types

from ._version import __version__
from .errors import ProbeError
# the function shadows its subpackage's name on ``probe``; import the writers themselves with
# ``from probe.export import imatrix``
from .export import export


class _Probe(types.ModuleType):
    """``probe.capture`` is the function, loaded (with torch) on first use, so that reading a file
    (``probe show``) needs neither. Importing the submodule ``probe.capture`` binds the module
    under that name: the setter keeps the function instead (any other value replaces it)."""

    @property
    def capture(self):
        if "_capture" not in self.__dict__:
            from .capture import capture

            self.__dict__["_capture"] = capture
        return self.__dict__["_capture"]

    @capture.setter
    def capture(self, value) -> None:
        if not isinstance(value, types.ModuleType):
            self.__dict__["_capture"] = value

    def __getattr__(self, name: str):
        # ``import probe`` then ``probe.models.load_model(...)``: the public submodules load on first use
        if name in _SUBMODULES:
            import importlib

            return importlib.import_module(f"{__name__}.{name}")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | {"capture"} | _SUBMODULES)


#: submodules reachable as attributes of ``probe`` without importing them first
_SUBMODULES = {"integrations", "models", "present", "results", "stats", "store"}


sys.modules[__name__].__class__ = _Probe


def load(path):
    """Open a run file written by :func:`capture` (or ``probe run``, ``probe merge``).

    Args:
        path: the HDF5 run file.

    Returns:
        A lazy :class:`probe.results.run.Run`: the description is read now, a site's cumulative
        state when ``run[site]`` is first read, a window on ``run.at(step)``.

    Raises:
        ProbeError: missing, damaged, non-probe or newer-schema files (one line each).

    Example:
        >>> from probe.store import write_run
        >>> write_run(run, os.path.join(tmp, "run.h5"))
        >>> r = probe.load(os.path.join(tmp, "run.h5"))
        >>> r.sites == run.sites, r[1].std == run[1].std
        (True, True)
    """
    from .store import read

    return read(path)


def merge(paths, out, *, overwrite: bool = False):
    """Merge run files (ranks, shards) exactly into one file at ``out``.

    Args:
        paths: two or more run files of the same model, sites, statistics and options.
        out: the file to write.
        overwrite: replace an existing ``out``.

    Returns:
        The merged :class:`probe.results.run.Run`, read back from ``out``: equal to one run over
        all the data (see :func:`probe.results.merge.merge_runs`).

    Raises:
        ProbeError: unreadable files, an existing ``out`` without ``overwrite``, or runs that
            differ in model, sites, statistics or options (the message lists the keys).

    Example:
        >>> import warnings
        >>> from probe.store import write_run
        >>> paths = [os.path.join(tmp, f"rank{i}.h5") for i in (0, 1)]
        >>> for p in paths: write_run(run, p)
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")  # the same run twice: the same sample seed
        ...     merged = probe.merge(paths, os.path.join(tmp, "all.h5"))
        >>> merged["hidden_states.1"].tokens == 2 * run["hidden_states.1"].tokens
        True
    """
    # the file-level glue lives here, above both sides: the store reads and writes, results merges
    from .results.merge import merge_runs
    from .store import check_writable, read, write_run

    check_writable(out, overwrite)
    runs = [read(p) for p in paths]
    write_run(merge_runs(runs, [os.fspath(p) for p in paths]), out, overwrite)
    return read(out)


__all__ = ["capture", "load", "merge", "export", "ProbeError", "__version__"]
