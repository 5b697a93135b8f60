"""The HDF5 run file (schema version 2, see ``docs/format.md``); the only module importing h5py.

Each committed window is one row along the leading axis of the per-window datasets. Rows are
written first, then the cumulative state under ``/total`` (all windows merged, rewritten in
place), and the ``/steps`` entry last, so ``/steps`` is the commit marker: a reader trusts only
the first ``len(/steps)`` rows, and a process killed mid-write leaves the earlier rows intact.
Opening a file reads its description; ``run[site]`` reads that site's ``/total`` (constant time
in the number of windows); ``run.at(step)`` reads one row. Histogram buckets are stored sparsely
and a window's sample coordinates once for all sites that share them. Version-1 files are still
read (eagerly). Structured attributes are JSON strings; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np

from ..errors import FileFormatError, ProbeError
from ..stats._buckets import Buckets
from ..stats._state import SPECS, WindowState, key_groups, merge_rows

__all__ = ["SCHEMA", "VERSION", "Writer", "read", "check_writable", "write_run"]

SCHEMA = "probe"
VERSION = 2
#: refuse to read a single dataset larger than this (a hostile file cannot exhaust memory)
MAX_DATASET_BYTES = 8 << 30


def _h5py():
    import h5py

    return h5py


def check_writable(path: str | os.PathLike, overwrite: bool, *, name: str = "out", flag: str | None = None,
                   file: str = "run.h5") -> None:
    """Raise a one-line :class:`ProbeError` if ``path`` cannot be (re)written: a folder, an
    existing file without ``overwrite``, a missing or read-only folder. The error names the
    argument ``name`` (``out='run.h5' ...``), or the command-line ``flag`` (``-o run.h5: ...``);
    a folder is answered with ``file`` inside it as the example."""
    path = os.fspath(path)
    if flag:
        who, example = f"{flag} {path}:", f"{flag} {os.path.join(path, file)}"
        folder, exists = "is a folder", "the file already exists"
        replace = f"pass --overwrite to replace it, or another {flag}"
    else:
        who, example = f"{name}={path!r}", f"{name}='{path.rstrip('/')}/{file}'"
        folder, exists = "is a directory", "already exists"
        replace = "pass overwrite=True (--overwrite) to replace it"
    if os.path.isdir(path):
        raise ProbeError(f"{who} {folder}; expected a file path; pass e.g. {example}")
    if os.path.exists(path) and not overwrite:
        raise ProbeError(f"{who} {exists}; expected a new path; {replace}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ProbeError(f"{who.rstrip(':')}: the folder {parent!r} does not exist; expected an existing folder; "
                         "create it first")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ProbeError(f"{who} is not writable; expected a path you can write; choose another path")


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



#: chunk of the flat (non-row) datasets: sparse histogram buckets
_CHUNK_1D = 8192
#: per-window records of the per-position statistic, and the sample coordinates but the keys, go
#: through h5py's LZF filter (fast): positions past the longest sequence are zeros and coordinates
#: are small integers; moments, keys and values are dense floats, which LZF barely shrinks


def _site_key(i: int, count: int) -> str:
    return f"{i:0{max(2, len(str(count - 1)))}d}"


#: statistics whose bucket ``counts`` are stored sparsely: per window the rows ``start:end`` of the
#: group's ``index``/``count`` datasets, in ``/total`` the group's own ``index``/``count``
SPARSE = ("histogram", "norm")


def _sparse(sg, counts) -> tuple[np.ndarray, np.ndarray]:
    """Dense bucket ``counts`` as (int32 bucket index, int64 count) of the non-empty buckets; the
    group's ``buckets`` attribute records the dense length the first time."""
    counts = np.asarray(counts)
    nz = np.flatnonzero(counts)
    if "index" not in sg:
        sg.attrs["buckets"] = counts.shape[0]
    return nz.astype(np.int32), counts[nz].astype(np.int64)


class Writer:
    """Appends windows to a run file and keeps its cumulative state (``/total``) up to date.

    The file is open only while a window is appended (milliseconds), then flushed and closed, so
    between windows it is always a complete, closed HDF5 file: another process can read it (a
    live ``probe show``), and a process killed between windows loses nothing committed. The
    cumulative state is merged here in numpy from the statistics' declared reductions.
    """

    def __init__(self, path: str, overwrite: bool = False) -> None:
        check_writable(path, overwrite)
        self.path = path
        try:
            with _open(path, "w") as f:
                f.attrs["schema"] = SCHEMA
                f.attrs["schema_version"] = VERSION
                f.create_dataset("steps", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(1024,))
        except OSError as err:
            raise ProbeError(f"cannot create out={path!r}: {err}; choose a writable path") from err
        self.rows = 0
        self.total: dict | None = None
        self._meta_json: str | None = None
        self._site_attrs: dict[str, dict] = {}

    # ------------------------------------------------------------------ per-window datasets
    @staticmethod
    def _extend(group, name: str, value: np.ndarray) -> int:
        """Append ``value`` to the 1-D ``group/name``; returns its new length."""
        if name not in group:
            group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=value.dtype, chunks=(_CHUNK_1D,))
        ds = group[name]
        start = ds.shape[0]
        if value.size:
            ds.resize(start + value.size, axis=0)
            ds[start:] = value
        return start + value.size

    @staticmethod
    def _pack(fields: dict[str, np.ndarray], present: bool, dtype: np.dtype | None = None) -> np.ndarray:
        """One record (a numpy structured scalar) holding ``_present`` and every field."""
        if dtype is None:
            dtype = np.dtype([("_present", np.bool_)] + [(k, np.asarray(v).dtype, np.shape(v))
                                                          for k, v in fields.items()])
        rec = np.zeros((), dtype=dtype)
        if present:
            rec["_present"] = True
            for k, v in fields.items():
                rec[k] = v
        return rec

    def _record(self, sg, fields: dict[str, np.ndarray], present: bool) -> None:
        """Row ``self.rows`` of the compound dataset ``sg/window`` (rows never written, and rows
        of windows where the statistic saw nothing, are zeros: ``_present`` false)."""
        ds = sg.get("window")
        if ds is None:
            if not present:
                return  # created zero-filled (absent) for earlier rows when first present
            rec = self._pack(fields, True)
            # per-position fields are mostly zeros past the longest sequence seen: LZF takes them out
            filt = "lzf" if sg.name.endswith(("/position", "/norm")) else None
            ds = sg.create_dataset("window", shape=(self.rows + 1,), maxshape=(None,), dtype=rec.dtype,
                                   chunks=(1,), compression=filt)
        else:
            if ds.shape[0] < self.rows + 1:
                ds.resize(self.rows + 1, axis=0)
            if not present:
                return
            rec = self._pack(fields, True, ds.dtype)
        ds[self.rows] = rec

    def _window(self, f, sg, kind: str, state: dict, coords: list) -> None:
        if kind in SPARSE:
            start = sg["count"].shape[0] if "count" in sg else 0
            end = start
            if state:
                index, count = _sparse(sg, state["counts"])
                self._extend(sg, "index", index)
                end = self._extend(sg, "count", count)
            fields = {"start": np.int64(start), "end": np.int64(end)}
            if kind == "histogram":
                fields["lossless"] = np.bool_(bool(state["lossless"])) if state else np.bool_(True)
            elif state:
                fields.update({n: np.asarray(state[n]) for n in SPECS[kind].names if n != "counts"})
        elif kind == "sample":
            index = -1
            if state:
                key = np.asarray(state["key"])
                for c, known in coords:
                    if known.shape == key.shape and np.array_equal(known, key):
                        index = c
                        break
                else:
                    samples = f.require_group("samples")
                    index = samples["key"].shape[0] if "key" in samples else 0
                    for name in ("key", "row", "position", "channel", "token"):
                        v = np.asarray(state[name])
                        if name not in samples:
                            samples.create_dataset(name, shape=(0, *v.shape), maxshape=(None, *v.shape),
                                                   dtype=v.dtype, chunks=(1, *v.shape),
                                                   compression=None if name == "key" else "lzf")
                        ds = samples[name]
                        ds.resize(index + 1, axis=0)
                        ds[index] = v
                    coords.append((index, key))
            fields = {"coords": np.int64(index), "value": np.asarray(state["value"])} if state else {}
        else:
            fields = {name: np.asarray(state[name]) for name in SPECS[kind].names} if state else {}
        self._record(sg, fields, bool(state))

    # ------------------------------------------------------------------ the cumulative state
    @staticmethod
    def _set(group, name: str, value: np.ndarray) -> None:
        """Overwrite ``group/name`` in place (fixed shape), or resize the 1-D ``group/name``."""
        value = np.asarray(value)
        ds = group.get(name)
        if ds is not None:
            shape = ds.shape
            if shape == value.shape and ds.dtype == value.dtype:
                ds[...] = value
                return
            if ds.maxshape == (None,) and value.ndim == 1:
                ds.resize(value.shape[0], axis=0)
                ds[...] = value
                return
            del group[name]
        if value.ndim == 1 and name in ("index", "count"):  # grows with the run: resizable, chunks to fit
            chunk = min(_CHUNK_1D, max(256, value.shape[0]))
            group.create_dataset(name, data=value, maxshape=(None,), chunks=(chunk,))
        else:
            group.create_dataset(name, data=value)

    def _put_total(self, sg, fields: dict[str, np.ndarray], present: bool) -> None:
        """The compound scalar ``sg/total``, overwritten in place (its shape and dtype are fixed)."""
        ds = sg.get("total")
        if ds is None:
            if not present:
                return
            sg.create_dataset("total", data=self._pack(fields, True))
            return
        ds[()] = self._pack(fields, present, ds.dtype)

    def _total(self, f, meta: dict, total: WindowState) -> None:
        t = f.require_group("total")
        t.attrs["rows"] = -1  # invalid while rewritten: a reader falls back to the windows
        names = [s["name"] for s in meta["sites"]]
        samples = [(name, st) for name in names
                   if (st := total.state(name, "sample"))]
        groups = key_groups([st["key"] for _, st in samples])
        reps = sorted(set(groups))
        where = {name: reps.index(g) for (name, _), g in zip(samples, groups)}
        if reps:
            ts = t.require_group("samples")
            for field in ("key", "row", "position", "channel", "token"):
                self._set(ts, field, np.stack([samples[r][1][field] for r in reps]))
        for i, name in enumerate(names):
            key = f"sites/{_site_key(i, len(names))}"
            if key not in t:
                t.require_group(key).attrs["name"] = name
            tg = t[key]
            for kind, state in total.sites.get(name, {}).items():
                sg = tg.require_group(kind)
                if kind in SPARSE:
                    fields = {}
                    if state:
                        index, count = _sparse(sg, state["counts"])
                        self._set(sg, "index", index)
                        self._set(sg, "count", count)
                        fields = {n: np.asarray(state[n]) for n in SPECS[kind].names if n != "counts"}
                elif kind == "sample":
                    fields = {"coords": np.int64(where[name]), "value": np.asarray(state["value"])} if state else {}
                else:
                    fields = {n: np.asarray(state[n]) for n in SPECS[kind].names} if state else {}
                self._put_total(sg, fields, bool(state))
        if total.cross or "cross" in t:
            state = total.cross
            self._put_total(t.require_group("cross"), {n: np.asarray(state[n]) for n in SPECS["cross"].names}
                            if state else {}, bool(state))
        t.attrs["rows"] = self.rows + 1

    # ------------------------------------------------------------------------------ a window
    def append(self, meta: dict[str, Any], row: WindowState) -> None:
        """Commit one window."""
        cross_sites = meta.get("cross_sites", [])
        total = merge_rows([row] if self.total is None else [self.total, row], cross_sites)
        with _open(self.path, "r+") as f:
            self._append(f, meta, row, total)
        self.total = total

    def _append(self, f, meta: dict[str, Any], row: WindowState, total: WindowState) -> None:
        text = json.dumps(_jsonable(meta))
        if text != self._meta_json:
            f.attrs["meta"] = text
            self._meta_json = text
        sites = f.require_group("sites")
        coords: list = []
        for i, info in enumerate(meta["sites"]):
            g = sites.require_group(_site_key(i, len(meta["sites"])))
            attrs = {key: str(info.get(key, "")) for key in ("name", "module", "read", "dtype")}
            attrs["hf_index"] = -1 if info.get("hf_index") is None else int(info["hf_index"])
            if self._site_attrs.get(g.name) != attrs:
                g.attrs.update(attrs)
                self._site_attrs[g.name] = attrs
            for kind, state in row.sites.get(info["name"], {}).items():
                self._window(f, g.require_group(kind), kind, state or {}, coords)
        if row.cross or "cross" in f:
            cg = f.require_group("cross")
            cg.attrs["sites"] = json.dumps(meta.get("cross_sites", []))
            self._window(f, cg, "cross", row.cross, coords)
        self._total(f, meta, total)
        steps = f["steps"]
        steps.resize(self.rows + 1, axis=0)
        steps[self.rows] = int(row.step)  # written last: the commit marker
        self.rows += 1
        f.flush()

    def abort(self) -> None:
        """Remove the file if no window was committed (nothing stays open between windows)."""
        if self.rows == 0 and os.path.exists(self.path):
            os.remove(self.path)


def write_run(run, path: str, overwrite: bool = False) -> None:
    """Write a :class:`probe.results.run.Run` (all its windows, read one at a time) to ``path``."""
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



def _read_v1(f, path: str, meta: dict):
    """A schema-1 file, read eagerly into memory (every window)."""
    from ..results.run import Run

    steps = _read_ds(f["steps"], f["steps"].shape[0])
    rows = len(steps)
    data = [WindowState(int(s)) for s in steps]
    for key in sorted(f.get("sites", {})):
        g = f["sites"][key]
        name = str(g.attrs.get("name", key))
        for kind in g:
            sg = g[kind]
            present = _read_ds(sg["_present"], rows) if "_present" in sg else np.ones(rows, bool)
            fields = {fn: _read_ds(sg[fn], rows) for fn in sg if fn != "_present"}
            for r in range(rows):
                data[r].sites.setdefault(name, {})[kind] = (
                    {fn: v[r] for fn, v in fields.items()} if present[r] else {})
    if "cross" in f:
        cg = f["cross"]
        present = _read_ds(cg["_present"], rows) if "_present" in cg else np.ones(rows, bool)
        fields = {fn: _read_ds(cg[fn], rows) for fn in cg if fn != "_present"}
        for r in range(rows):
            if r < len(present) and present[r]:
                data[r].cross = {fn: v[r] for fn, v in fields.items()}
    return Run(meta, data, path)

def _check(ds) -> None:
    """Refuse datasets that are not numbers (or records of numbers) or declare over 8 GiB."""
    kinds = [ds.dtype[n].base.kind for n in ds.dtype.names] if ds.dtype.names else [ds.dtype.kind]
    if any(k not in "biuf" for k in kinds):
        raise FileFormatError(f"{ds.name} has dtype {ds.dtype}; expected numbers; the file is not a probe run")
    nbytes = int(np.prod(ds.shape, dtype=np.float64)) * ds.dtype.itemsize
    if nbytes > MAX_DATASET_BYTES:
        raise FileFormatError(f"{ds.name} declares {nbytes} bytes; expected under {MAX_DATASET_BYTES}; "
                              "the file is damaged or hostile")


def _fields(rec, names, where: str) -> dict:
    missing = [n for n in names if n not in (rec.dtype.names or ())]
    if missing:
        raise FileFormatError(f"{where} lacks fields {missing}; the file is damaged or not a probe run")
    return {n: np.asarray(rec[n]) for n in names}


def _dense_counts(index: np.ndarray, count: np.ndarray, buckets: int, where: str) -> np.ndarray:
    if not Buckets.is_count(buckets) or index.shape != count.shape or (
            index.size and (index.min() < 0 or index.max() >= buckets)):
        raise FileFormatError(f"{where}: sparse histogram does not fit {buckets} buckets; the file is damaged")
    counts = np.zeros(buckets, dtype=np.int64)
    counts[index] = count
    return counts


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
        self._fallback: dict | None = None

    def __len__(self) -> int:
        return len(self.steps)

    def _file(self):
        try:
            return _open(self.path, "r")
        except OSError as err:
            raise FileFormatError(f"{self.path!r} could not be reopened ({str(err).splitlines()[0]}); "
                                  "the file was moved or is damaged") from err

    # -------------------------------------------------------------------------- one window
    @staticmethod
    def _kind_at(f, sg, kind: str, r: int, rows: int) -> dict:
        ds = sg.get("window")
        if ds is None or r >= ds.shape[0]:
            if ds is not None and ds.shape[0] < rows:
                raise FileFormatError(f"{ds.name} holds {ds.shape[0]} rows but /steps commits {rows}; "
                                      "the file is damaged; rerun or recover the committed rows with an older copy")
            return {}
        _check(ds)
        rec = ds[r]
        if not bool(rec["_present"]):
            return {}
        if kind in SPARSE and "start" in (rec.dtype.names or ()):  # earlier files hold norm counts dense
            start, stop = int(rec["start"]), int(rec["end"])
            if not 0 <= start <= stop <= sg["count"].shape[0]:
                raise FileFormatError(f"{sg.name}: row {r} spans buckets [{start}, {stop}) outside the "
                                      "stored ones; the file is damaged")
            counts = _dense_counts(sg["index"][start:stop], sg["count"][start:stop],
                                   int(sg.attrs.get("buckets", 0)), sg.name)
            rest = [n for n in SPECS[kind].names if n != "counts"]
            return {"counts": counts, **_fields(rec, rest, ds.name)}
        if kind == "sample":
            return _sample_state(f["samples"], rec, sg.name)
        return _fields(rec, SPECS[kind].names, ds.name)

    def window(self, r: int) -> WindowState:
        rows = len(self.steps)
        try:
            with self._file() as f:
                sites = {}
                for name, key in self._keys.items():
                    g = f["sites"][key]
                    sites[name] = {kind: self._kind_at(f, g[kind], kind, r, rows) for kind in g if kind in SPECS}
                cross = self._kind_at(f, f["cross"], "cross", r, rows) if "cross" in f else {}
        except (OSError, KeyError, ValueError) as err:
            raise FileFormatError(f"{self.path!r} could not be read ({err}); the file is damaged") from err
        return WindowState(self.steps[r], sites, cross)

    # ------------------------------------------------------------------- cumulative state
    def _all_windows(self) -> WindowState:
        if self._fallback is None:  # /total is stale (a writer was killed mid-commit): merge the windows
            self._fallback = merge_rows([self.window(r) for r in range(len(self.steps))])
        return self._fallback

    @staticmethod
    def _total_of(t, sg, kind: str) -> dict:
        ds = sg.get("total")
        if ds is None:
            return {}
        _check(ds)
        rec = ds[()]
        if not bool(rec["_present"]):
            return {}
        if kind in SPARSE and "index" in sg and "counts" not in (rec.dtype.names or ()):
            for name in ("index", "count"):
                _check(sg[name])
            rest = [n for n in SPECS[kind].names if n != "counts"]
            return {"counts": _dense_counts(sg["index"][()], sg["count"][()], int(sg.attrs.get("buckets", 0)),
                                            sg.name), **_fields(rec, rest, ds.name)}
        if kind == "sample":
            return _sample_state(t["samples"], rec, sg.name)
        return _fields(rec, SPECS[kind].names, ds.name)

    def site_total(self, name: str) -> dict:
        if not self._total_ok:
            return self._all_windows().sites.get(name, {})
        try:
            with self._file() as f:
                t = f["total"]
                key = self._keys[name]
                if f"sites/{key}" not in t:
                    return {}
                g = t["sites"][key]
                return {kind: self._total_of(t, g[kind], kind) for kind in g if kind in SPECS}
        except (OSError, KeyError, ValueError) as err:
            raise FileFormatError(f"{self.path!r} could not be read ({err}); the file is damaged") from err

    def cross_total(self) -> dict:
        if not self._cross:
            return {}
        if not self._total_ok:
            return self._all_windows().cross
        try:
            with self._file() as f:
                return self._total_of(f["total"], f["total/cross"], "cross") if "total/cross" in f else {}
        except (OSError, KeyError, ValueError) as err:
            raise FileFormatError(f"{self.path!r} could not be read ({err}); the file is damaged") from err


def _sample_state(samples, rec, where: str) -> dict:
    """A sample's state: its record's values and the shared coordinates row it points to."""
    c = int(rec["coords"])
    if not 0 <= c < samples["key"].shape[0]:
        raise FileFormatError(f"{where}: sample coordinates {c} not stored; the file is damaged")
    out = {n: samples[n][c] for n in ("key", "row", "position", "channel", "token")}
    out["value"] = np.asarray(rec["value"])
    return out


def read(path: str | os.PathLike):
    """Open a run file: reads its description and steps; site states are read on demand.

    Raises:
        ProbeError: a missing path; FileFormatError (one line) for anything unreadable, not a
            probe run, damaged, hostile, or of a newer schema version.
    """
    from ..results.run import Run

    path = os.fspath(path)
    if not os.path.exists(path):
        raise ProbeError(f"no such file: {path!r}; expected a run written by probe; check the path")
    if os.path.isdir(path):
        raise ProbeError(f"{path!r} is a folder; expected a run file written by probe; pass the .h5 file inside it")
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
            if version < 2:
                return _read_v1(f, path, meta)
            steps = [int(s) for s in _read_ds(f["steps"], f["steps"].shape[0])]
            keys = {}
            for key in sorted(f.get("sites", {})):
                g = f["sites"][key]
                keys[str(g.attrs.get("name", key))] = key
                for kind in g:
                    if "window" in g[kind]:
                        _check(g[kind]["window"])
            total_ok = int(f["total"].attrs.get("rows", -1)) == len(steps) if "total" in f else not steps
            source = FileSource(path, steps, keys, total_ok, "cross" in f)
    except (OSError, KeyError) as err:
        raise FileFormatError(f"{path!r} could not be read ({err}); the file is damaged") from err
    return Run(meta, path=path, source=source)


def annotate(path: str, **entries: Any) -> None:
    """Add JSON entries to a closed run file's ``meta`` (e.g. decoded token texts)."""
    with _open(path, "r+") as f:
        meta = json.loads(f.attrs.get("meta", "{}"))
        meta.update(_jsonable(entries))
        f.attrs["meta"] = json.dumps(meta)


def in_memory(meta: dict[str, Any], windows: list[WindowState]):
    """A run over windows held in memory (a capture without ``out=``, a merge before it is
    written): the same :class:`probe.results.Run` a file gives, so the write side hands its
    windows over here and never builds read-side objects itself."""
    from ..results.run import Run

    return Run(meta, windows)
