"""probe: streaming statistics of a transformer's activations, captured while it runs.

    import probe
    with probe.capture(model, out="run.h5", skip_first=1) as run:
        for batch in loader:
            model(**batch)
    r = probe.load("run.h5")
    r["hidden_states.5"].kurtosis, r["hidden_states.5"].quantile(0.999), r.cross.r2
"""

from ._version import __version__
from .capture import capture
from .errors import ProbeError
# the function shadows its subpackage's name on ``probe``; import the writers themselves with
# ``from probe.export import imatrix``
from .export import export


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


__all__ = ["capture", "load", "merge", "export", "ProbeError", "__version__"]
