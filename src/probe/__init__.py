"""probe: streaming statistics of a transformer's activations, captured while it runs.

    import probe
    with probe.capture(model, out="run.h5", skip_first=1) as run:
        for batch in loader:
            model(**batch)
    r = probe.load("run.h5")
    r["hidden_states.5"].kurtosis, r["hidden_states.5"].quantile(0.999), r.cross.r2
"""

from ._version import __version__
from .errors import ProbeError


def __getattr__(name: str):
    # capture (and with it torch) loads on first use, so reading a file (probe show) needs neither
    if name == "capture":
        from .capture import capture

        globals()["capture"] = capture  # replaces the submodule the import bound under this name
        return capture
    raise AttributeError(f"module 'probe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"capture"})


def load(path):
    """Open a run file written by :func:`capture`; returns a :class:`probe.run.Run`.

    Raises:
        ProbeError: missing, damaged, non-probe or newer-schema files (one line each).
    """
    from .store import read

    return read(path)


def merge(paths, out, *, overwrite: bool = False):
    """Merge run files (ranks, shards) exactly into one file at ``out``; returns the merged Run."""
    from .merging import merge_files

    return merge_files(paths, out, overwrite=overwrite)


__all__ = ["capture", "load", "merge", "ProbeError", "__version__"]
