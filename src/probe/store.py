"""The HDF5 run file (schema version 1, see ``docs/format.md``); the only module importing h5py.

Each committed window is one row along the leading axis of every dataset. Rows are written
first and the ``/steps`` entry last, so ``/steps`` is the commit marker: a reader trusts only
the first ``len(/steps)`` rows, and a process killed mid-write leaves the earlier rows intact.
Structured attributes are JSON strings; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np

from .errors import FileFormatError, ProbeError

__all__ = ["SCHEMA", "VERSION", "Writer", "read", "check_writable", "write_run"]

SCHEMA = "probe"
VERSION = 1
#: refuse to read a single dataset larger than this (a hostile file cannot exhaust memory)
MAX_DATASET_BYTES = 8 << 30


def _h5py():
    import h5py

    return h5py


def check_writable(path: str, overwrite: bool) -> None:
    """Raise a one-line :class:`ProbeError` if ``path`` cannot be (re)written."""
    if os.path.isdir(path):
        raise ProbeError(f"out={path!r} is a directory; expected a file path; pass e.g. out='{path.rstrip('/')}/run.h5'")
    if os.path.exists(path) and not overwrite:
        raise ProbeError(f"out={path!r} already exists; expected a new path; pass overwrite=True "
                         "(--overwrite) to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ProbeError(f"out={path!r}: folder {parent!r} does not exist; expected an existing folder; "
                         "create it first")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ProbeError(f"out={path!r} is not writable; expected a path you can write; choose another path")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


def _open(path: str, mode: str, wait: float = 10.0):
    """``h5py.File`` with our libver and HDF5's file lock, so a reader never sees a half-appended
    window: while another process holds the file we retry for up to ``wait`` seconds (appends
    take milliseconds). On filesystems without locking we open without it."""
    h5py = _h5py()
    deadline = time.monotonic() + wait
    while True:
        try:
            return h5py.File(path, mode, libver=("v110", "v110"), locking=True)
        except OSError as err:
            text = str(err)
            busy = "errno = 11" in text or "temporarily unavailable" in text or "open for write" in text
            if busy and time.monotonic() < deadline:
                time.sleep(0.02)
                continue
            if "lock" in text.lower() and not busy:  # no locking on this filesystem
                return h5py.File(path, mode, libver=("v110", "v110"), locking=False)
            raise


class Writer:
    """Appends windows to a run file.

    The file is open only while a window is appended (milliseconds), then flushed and closed, so
    between windows it is always a complete, closed HDF5 file: another process can read it (a
    live ``probe show``), and a process killed between windows loses nothing committed.
    """

    def __init__(self, path: str, overwrite: bool = False) -> None:
        check_writable(path, overwrite)
        self.path = path
        try:
            with _open(path, "w") as f:
                f.attrs["schema"] = SCHEMA
                f.attrs["schema_version"] = VERSION
                f.create_dataset("steps", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(64,))
        except OSError as err:
            raise ProbeError(f"cannot create out={path!r}: {err}; choose a writable path") from err
        self.rows = 0

    def _put(self, group, name: str, value: np.ndarray) -> None:
        value = np.asarray(value)
        if name not in group:
            chunks = (1, *value.shape) if value.ndim else (64,)
            big = value.size >= 4096
            group.create_dataset(name, shape=(self.rows + 1, *value.shape), maxshape=(None, *value.shape),
                                 dtype=value.dtype, chunks=chunks,
                                 compression="gzip" if big else None, compression_opts=4 if big else None)
        ds = group[name]
        if ds.shape[1:] != value.shape:
            raise ProbeError(f"dataset {group.name}/{name} changed shape from {ds.shape[1:]} to {value.shape}; "
                             "expected fixed shapes within one run; start a new file")
        ds.resize(self.rows + 1, axis=0)
        ds[self.rows] = value

    def _fill(self, group, state: dict[str, np.ndarray]) -> None:
        for field, value in state.items():
            self._put(group, field, value)
        for field in group:  # a window where the stat stayed empty: pad, marked absent by _present
            if group[field].shape[0] < self.rows + 1:
                group[field].resize(self.rows + 1, axis=0)

    def append(self, meta: dict[str, Any], row: dict[str, Any]) -> None:
        with _open(self.path, "r+") as f:
            self._append(f, meta, row)

    def _append(self, f, meta: dict[str, Any], row: dict[str, Any]) -> None:
        f.attrs["meta"] = json.dumps(_jsonable(meta))
        sites = f.require_group("sites")
        width = max(2, len(str(len(meta["sites"]) - 1)))
        for i, info in enumerate(meta["sites"]):
            g = sites.require_group(f"{i:0{width}d}")
            for key in ("name", "module", "read", "dtype"):
                g.attrs[key] = str(info.get(key, ""))
            g.attrs["hf_index"] = -1 if info.get("hf_index") is None else int(info["hf_index"])
            for kind, state in row["sites"].get(info["name"], {}).items():
                sg = g.require_group(kind)
                present = bool(state)
                self._put(sg, "_present", np.asarray(present))
                self._fill(sg, state)
        if row.get("cross") or "cross" in f:
            cg = f.require_group("cross")
            cg.attrs["sites"] = json.dumps(meta.get("cross_sites", []))
            self._put(cg, "_present", np.asarray(bool(row.get("cross"))))
            self._fill(cg, row.get("cross") or {})
        steps = f["steps"]
        steps.resize(self.rows + 1, axis=0)
        steps[self.rows] = int(row["step"])  # written last: the commit marker
        self.rows += 1
        f.flush()

    def abort(self) -> None:
        """Remove the file if no window was committed (nothing stays open between windows)."""
        if self.rows == 0 and os.path.exists(self.path):
            os.remove(self.path)


def write_run(run, path: str, overwrite: bool = False) -> None:
    """Write a :class:`probe.run.Run` (all its windows) to ``path``."""
    w = Writer(path, overwrite)
    for row in run.rows:
        w.append(run.meta, row)


def _read_ds(ds, rows: int) -> np.ndarray:
    if ds.shape[0] < rows:
        raise FileFormatError(f"{ds.name} holds {ds.shape[0]} rows but /steps commits {rows}; "
                              "the file is damaged; rerun or recover the committed rows with an older copy")
    if ds.dtype.kind not in "biuf":
        raise FileFormatError(f"{ds.name} has dtype {ds.dtype}; expected numbers; the file is not a probe run")
    nbytes = int(np.prod(ds.shape[1:], dtype=np.float64)) * max(rows, 1) * ds.dtype.itemsize
    if nbytes > MAX_DATASET_BYTES:
        raise FileFormatError(f"{ds.name} declares {nbytes} bytes; expected under {MAX_DATASET_BYTES}; "
                              "the file is damaged or hostile")
    return ds[:rows]


def read(path: str | os.PathLike):
    """Load a run file. Raises :class:`FileFormatError` with one line for anything unreadable."""
    from .run import Run

    path = os.fspath(path)
    if not os.path.exists(path):
        raise ProbeError(f"no such file: {path!r}; expected a run written by probe; check the path")
    try:
        f = _open(path, "r")
    except OSError as err:
        if "open for write" in str(err):
            raise FileFormatError(f"{path!r} is marked open for writing: a writer is appending now, or was "
                                  "killed mid-append; if none is running, clear the mark with "
                                  f"`h5clear -s {path}` (hdf5-tools) and retry") from err
        raise FileFormatError(f"{path!r} is not a readable HDF5 file ({str(err).splitlines()[0]}); "
                              "expected a probe run; the file is truncated or of another kind") from err
    try:
        with f:
            if f.attrs.get("schema") != SCHEMA:
                raise FileFormatError(f"{path!r} is HDF5 but not a probe run (no schema='probe' attribute); "
                                      "expected a file written by probe.capture")
            version = int(f.attrs.get("schema_version", -1))
            if version > VERSION:
                raise FileFormatError(f"{path!r} uses schema version {version}; this probe reads up to {VERSION}; "
                                      "upgrade probe (pip install -U probe)")
            if "steps" not in f:
                raise FileFormatError(f"{path!r} has no /steps; expected a probe run; the file is damaged")
            try:
                meta = json.loads(f.attrs.get("meta", "{}"))
            except (TypeError, ValueError) as err:
                raise FileFormatError(f"{path!r}: the meta attribute is not JSON; the file is damaged") from err
            steps = _read_ds(f["steps"], f["steps"].shape[0])
            rows = len(steps)
            data: list[dict] = [{"step": int(s), "sites": {}, "cross": {}} for s in steps]
            for key in sorted(f.get("sites", {})):
                g = f["sites"][key]
                name = str(g.attrs.get("name", key))
                for kind in g:
                    sg = g[kind]
                    present = _read_ds(sg["_present"], rows) if "_present" in sg else np.ones(rows, bool)
                    fields = {fn: _read_ds(sg[fn], rows) for fn in sg if fn != "_present"}
                    for r in range(rows):
                        data[r]["sites"].setdefault(name, {})[kind] = (
                            {fn: v[r] for fn, v in fields.items()} if present[r] else {})
            if "cross" in f:
                cg = f["cross"]
                present = _read_ds(cg["_present"], rows) if "_present" in cg else np.ones(rows, bool)
                fields = {fn: _read_ds(cg[fn], rows) for fn in cg if fn != "_present"}
                for r in range(rows):
                    if r < len(present) and present[r]:
                        data[r]["cross"] = {fn: v[r] for fn, v in fields.items()}
    except (OSError, KeyError) as err:
        raise FileFormatError(f"{path!r} could not be read ({err}); the file is damaged") from err
    return Run(meta, data, path)


def annotate(path: str, **entries: Any) -> None:
    """Add JSON entries to a closed run file's ``meta`` (e.g. decoded token texts)."""
    with _open(path, "r+") as f:
        meta = json.loads(f.attrs.get("meta", "{}"))
        meta.update(_jsonable(entries))
        f.attrs["meta"] = json.dumps(meta)
