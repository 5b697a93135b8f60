"""The write side of the run file: :class:`Writer` appends windows, :func:`write_run` writes a
whole run, :func:`annotate` adds entries to a closed file's description.

A commit writes the window's rows first, then the cumulative state under ``/total`` (all
windows merged, rewritten in place; ``/total.rows`` is ``-1`` while it is), and the ``/steps``
entry last: ``/steps`` is the commit marker, so a process killed mid-write leaves the earlier
rows intact and readers trust only the first ``len(/steps)`` rows.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from ..errors import ProbeError
from ..stats._state import WindowState, merge_rows
from .schema import (CROSS, SCHEMA, SITE_ATTRS, SITES, STEPS, TOTAL, VERSION, WINDOW, Fields, TotalSamples,
                     WindowSamples, codec_for, open_file, pack, site_key)

__all__ = ["Writer", "write_run", "check_writable", "annotate"]


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
            with open_file(path, "w") as f:
                f.attrs["schema"] = SCHEMA
                f.attrs["schema_version"] = VERSION
                f.create_dataset(STEPS, shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(1024,))
        except OSError as err:
            raise ProbeError(f"cannot create out={path!r}: {err}; choose a writable path") from err
        self.rows = 0
        self.total: WindowState | None = None
        self._meta_json: str | None = None
        self._site_attrs: dict[str, dict[str, str | int]] = {}

    # ------------------------------------------------------------------ per-window records
    def _record(self, sg, fields: Fields, present: bool, compression: str | None) -> None:
        """Row ``self.rows`` of the compound dataset ``sg/window`` (rows never written, and rows
        of windows where the statistic saw nothing, are zeros: ``_present`` false)."""
        ds = sg.get(WINDOW)
        if ds is None:
            if not present:
                return  # created zero-filled (absent) for earlier rows when first present
            rec = pack(fields, True)
            ds = sg.create_dataset(WINDOW, shape=(self.rows + 1,), maxshape=(None,), dtype=rec.dtype,
                                   chunks=(1,), compression=compression)
        else:
            if ds.shape[0] < self.rows + 1:
                ds.resize(self.rows + 1, axis=0)
            if not present:
                return
            rec = pack(fields, True, ds.dtype)
        ds[self.rows] = rec

    def _window(self, sg, kind: str, state: dict, samples: WindowSamples) -> None:
        codec = codec_for(kind)
        self._record(sg, codec.put_window(sg, state, samples) if state else {}, bool(state), codec.compression)

    # ------------------------------------------------------------------ the cumulative state
    @staticmethod
    def _put_total(sg, fields: Fields, present: bool) -> None:
        """The compound scalar ``sg/total``, overwritten in place (its shape and dtype are fixed)."""
        ds = sg.get(TOTAL)
        if ds is None:
            if not present:
                return
            sg.create_dataset(TOTAL, data=pack(fields, True))
            return
        ds[()] = pack(fields, present, ds.dtype)

    def _total(self, f, meta: dict, total: WindowState) -> None:
        t = f.require_group(TOTAL)
        t.attrs["rows"] = -1  # invalid while rewritten: a reader falls back to the windows
        names = [s["name"] for s in meta["sites"]]
        samples = TotalSamples(t, [st for name in names if (st := total.state(name, "sample"))])
        for i, name in enumerate(names):
            key = f"{SITES}/{site_key(i, len(names))}"
            if key not in t:
                t.require_group(key).attrs["name"] = name
            tg = t[key]
            for kind, state in total.sites.get(name, {}).items():
                sg = tg.require_group(kind)
                self._put_total(sg, codec_for(kind).put_total(sg, state, samples) if state else {}, bool(state))
        if total.cross or CROSS in t:
            sg = t.require_group(CROSS)
            state = total.cross
            self._put_total(sg, codec_for(CROSS).put_total(sg, state, samples) if state else {}, bool(state))
        t.attrs["rows"] = self.rows + 1

    # ------------------------------------------------------------------------------ a window
    def append(self, meta: dict[str, Any], row: WindowState) -> None:
        """Commit one window."""
        cross_sites = meta.get("cross_sites", [])
        total = merge_rows([row] if self.total is None else [self.total, row], cross_sites)
        with open_file(self.path, "r+") as f:
            self._append(f, meta, row, total)
        self.total = total

    def _append(self, f, meta: dict[str, Any], row: WindowState, total: WindowState) -> None:
        text = json.dumps(_jsonable(meta))
        if text != self._meta_json:
            f.attrs["meta"] = text
            self._meta_json = text
        sites = f.require_group(SITES)
        samples = WindowSamples(f)
        for i, info in enumerate(meta["sites"]):
            g = sites.require_group(site_key(i, len(meta["sites"])))
            attrs: dict[str, str | int] = {key: str(info.get(key, "")) for key in SITE_ATTRS}
            attrs["hf_index"] = -1 if info.get("hf_index") is None else int(info["hf_index"])
            if self._site_attrs.get(g.name) != attrs:
                g.attrs.update(attrs)
                self._site_attrs[g.name] = attrs
            for kind, state in row.sites.get(info["name"], {}).items():
                self._window(g.require_group(kind), kind, state or {}, samples)
        if row.cross or CROSS in f:
            cg = f.require_group(CROSS)
            cg.attrs["sites"] = json.dumps(meta.get("cross_sites", []))
            self._window(cg, CROSS, row.cross, samples)
        self._total(f, meta, total)
        steps = f[STEPS]
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


def annotate(path: str, **entries: Any) -> None:
    """Add JSON entries to a closed run file's ``meta`` (e.g. decoded token texts)."""
    with open_file(path, "r+") as f:
        meta = json.loads(f.attrs.get("meta", "{}"))
        meta.update(_jsonable(entries))
        f.attrs["meta"] = json.dumps(meta)
