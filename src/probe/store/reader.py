"""The read side of the run file: :func:`read` checks a file and opens it lazily.

Opening a file reads its description and steps; ``run[site]`` reads that site's ``/total``
(constant time in the number of windows); ``run.at(step)`` reads one row. ``/total`` is trusted
only when ``/total.rows`` equals the committed rows, otherwise the windows are merged (a writer
was killed mid-commit). Version-1 files are read eagerly. Nothing read is trusted: every record
is checked against its declaration, every dataset's size is bounded, and structured attributes
are JSON strings; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..errors import FileFormatError, ProbeError
from ..stats._state import SPECS, StatState, WindowState, merge_rows
from .schema import (CROSS, MAX_DATASET_BYTES, SCHEMA, SITES, STEPS, TOTAL, VERSION, WINDOW, check, codec_for,
                     open_file)

__all__ = ["read", "FileSource"]


def _damaged_rows(ds, rows: int) -> FileFormatError:
    return FileFormatError(f"{ds.name} holds {ds.shape[0]} rows but /steps commits {rows}; "
                           "the file is damaged; rerun or recover the committed rows with an older copy")


def _read_ds(ds, rows: int) -> np.ndarray:
    """The first ``rows`` rows of a numeric dataset, refused when shorter, not numbers or too large."""
    if ds.shape[0] < rows:
        raise _damaged_rows(ds, rows)
    if ds.dtype.kind not in "biuf":
        raise FileFormatError(f"{ds.name} has dtype {ds.dtype}; expected numbers; the file is not a probe run")
    nbytes = int(np.prod(ds.shape[1:], dtype=np.float64)) * max(rows, 1) * ds.dtype.itemsize
    if nbytes > MAX_DATASET_BYTES:
        raise FileFormatError(f"{ds.name} declares {nbytes} bytes; expected under {MAX_DATASET_BYTES}; "
                              "the file is damaged or hostile")
    return ds[:rows]


def _read_v1(f, path: str, meta: dict):
    """A schema-1 file, read eagerly into memory (every window)."""
    from ..results.run import Run

    steps = _read_ds(f[STEPS], f[STEPS].shape[0])
    rows = len(steps)
    data = [WindowState(int(s)) for s in steps]
    for key in sorted(f.get(SITES, {})):
        g = f[SITES][key]
        name = str(g.attrs.get("name", key))
        for kind in g:
            sg = g[kind]
            present = _read_ds(sg["_present"], rows) if "_present" in sg else np.ones(rows, bool)
            fields = {fn: _read_ds(sg[fn], rows) for fn in sg if fn != "_present"}
            for r in range(rows):
                data[r].sites.setdefault(name, {})[kind] = (
                    {fn: v[r] for fn, v in fields.items()} if present[r] else {})
    if CROSS in f:
        cg = f[CROSS]
        present = _read_ds(cg["_present"], rows) if "_present" in cg else np.ones(rows, bool)
        fields = {fn: _read_ds(cg[fn], rows) for fn in cg if fn != "_present"}
        for r in range(rows):
            if r < len(present) and present[r]:
                data[r].cross = {fn: v[r] for fn, v in fields.items()}
    return Run(meta, data, path)


class FileSource:
    """The windows and cumulative state of a schema-2 file, read on demand (one short open per
    read, so a live writer is never blocked for long)."""

    def __init__(self, path: str, steps: list[int], keys: dict[str, str], total_ok: bool,
                 cross: bool) -> None:
        self.path = path
        self.steps = steps
        self._keys = keys  # site name -> group name under /sites
        self._total_ok = total_ok
        self._cross = cross
        self._fallback: WindowState | None = None

    def __len__(self) -> int:
        return len(self.steps)

    def _file(self):
        try:
            return open_file(self.path, "r")
        except OSError as err:
            raise FileFormatError(f"{self.path!r} could not be reopened ({str(err).splitlines()[0]}); "
                                  "the file was moved or is damaged") from err

    def _damaged(self, err: Exception) -> FileFormatError:
        return FileFormatError(f"{self.path!r} could not be read ({err}); the file is damaged")

    # -------------------------------------------------------------------------- one window
    @staticmethod
    def _kind_at(f, sg, kind: str, r: int, rows: int) -> StatState:
        ds = sg.get(WINDOW)
        if ds is None or r >= ds.shape[0]:
            if ds is not None and ds.shape[0] < rows:
                raise _damaged_rows(ds, rows)
            return {}
        check(ds)
        rec = ds[r]
        if not bool(rec["_present"]):
            return {}
        return codec_for(kind).get_window(sg, rec, r, f)

    def window(self, r: int) -> WindowState:
        rows = len(self.steps)
        try:
            with self._file() as f:
                sites = {}
                for name, key in self._keys.items():
                    g = f[SITES][key]
                    sites[name] = {kind: self._kind_at(f, g[kind], kind, r, rows) for kind in g if kind in SPECS}
                cross = self._kind_at(f, f[CROSS], CROSS, r, rows) if CROSS in f else {}
        except (OSError, KeyError, ValueError) as err:
            raise self._damaged(err) from err
        return WindowState(self.steps[r], sites, cross)

    # ------------------------------------------------------------------- cumulative state
    def _all_windows(self) -> WindowState:
        if self._fallback is None:  # /total is stale (a writer was killed mid-commit): merge the windows
            self._fallback = merge_rows([self.window(r) for r in range(len(self.steps))])
        return self._fallback

    @staticmethod
    def _total_of(t, sg, kind: str) -> StatState:
        ds = sg.get(TOTAL)
        if ds is None:
            return {}
        check(ds)
        rec = ds[()]
        if not bool(rec["_present"]):
            return {}
        return codec_for(kind).get_total(sg, rec, t)

    def site_total(self, name: str) -> dict[str, StatState]:
        if not self._total_ok:
            return self._all_windows().sites.get(name, {})
        try:
            with self._file() as f:
                t = f[TOTAL]
                key = self._keys[name]
                if f"{SITES}/{key}" not in t:
                    return {}
                g = t[SITES][key]
                return {kind: self._total_of(t, g[kind], kind) for kind in g if kind in SPECS}
        except (OSError, KeyError, ValueError) as err:
            raise self._damaged(err) from err

    def cross_total(self) -> StatState:
        if not self._cross:
            return {}
        if not self._total_ok:
            return self._all_windows().cross
        try:
            with self._file() as f:
                where = f"{TOTAL}/{CROSS}"
                return self._total_of(f[TOTAL], f[where], CROSS) if where in f else {}
        except (OSError, KeyError, ValueError) as err:
            raise self._damaged(err) from err


def _open_run(path: str):
    """The file at ``path`` open for reading, or a one-line error saying why it cannot be."""
    if not os.path.exists(path):
        raise ProbeError(f"no such file: {path!r}; expected a run written by probe; check the path")
    if os.path.isdir(path):
        raise ProbeError(f"{path!r} is a folder; expected a run file written by probe; pass the .h5 file inside it")
    try:
        return open_file(path, "r")
    except OSError as err:
        if "open for write" in str(err):
            raise FileFormatError(f"{path!r} is marked open for writing: a writer is appending now, or was "
                                  "killed mid-append; if none is running, clear the mark with "
                                  f"`h5clear -s {path}` (hdf5-tools) and retry") from err
        raise FileFormatError(f"{path!r} is not a readable HDF5 file ({str(err).splitlines()[0]}); "
                              "expected a probe run; the file is truncated or of another kind") from err


def _header(f, path: str) -> tuple[int, dict]:
    """The schema version and the description of an open file, refused unless a probe run."""
    if f.attrs.get("schema") != SCHEMA:
        raise FileFormatError(f"{path!r} is HDF5 but not a probe run (no schema='probe' attribute); "
                              "expected a file written by probe.capture")
    version = int(f.attrs.get("schema_version", -1))
    if version > VERSION:
        raise FileFormatError(f"{path!r} uses schema version {version}; this probe reads up to {VERSION}; "
                              "upgrade probe (pip install -U probe)")
    if STEPS not in f:
        raise FileFormatError(f"{path!r} has no /steps; expected a probe run; the file is damaged")
    try:
        meta = json.loads(f.attrs.get("meta", "{}"))
    except (TypeError, ValueError) as err:
        raise FileFormatError(f"{path!r}: the meta attribute is not JSON; the file is damaged") from err
    return version, meta


def _source(f, path: str) -> FileSource:
    """A schema-2 file's steps and site groups, with every window dataset checked."""
    steps = [int(s) for s in _read_ds(f[STEPS], f[STEPS].shape[0])]
    keys = {}
    for key in sorted(f.get(SITES, {})):
        g = f[SITES][key]
        keys[str(g.attrs.get("name", key))] = key
        for kind in g:
            if WINDOW in g[kind]:
                check(g[kind][WINDOW])
    total_ok = int(f[TOTAL].attrs.get("rows", -1)) == len(steps) if TOTAL in f else not steps
    return FileSource(path, steps, keys, total_ok, CROSS in f)


def read(path: str | os.PathLike):
    """Open a run file: reads its description and steps; site states are read on demand.

    Args:
        path: a file written by :func:`probe.capture`, ``probe run`` or ``probe merge``.

    Returns:
        A :class:`probe.results.Run` reading the file lazily.

    Raises:
        ProbeError: a missing path; FileFormatError (one line) for anything unreadable, not a
            probe run, damaged, hostile, or of a newer schema version.
    """
    from ..results.run import Run

    path = os.fspath(path)
    f = _open_run(path)
    try:
        with f:
            version, meta = _header(f, path)
            if version < 2:
                return _read_v1(f, path, meta)
            source = _source(f, path)
    except (OSError, KeyError) as err:
        raise FileFormatError(f"{path!r} could not be read ({err}); the file is damaged") from err
    return Run(meta, path=path, source=source)
