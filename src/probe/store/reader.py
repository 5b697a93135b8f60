"""The read side of the run file: :func:`read` checks a file and opens it lazily.

Opening a file reads its description and steps; ``run[site]`` reads that site's ``/total``
(constant time in the number of windows); ``run.at(step)`` reads one row. A file has exactly
the windows its root attribute ``committed`` counts (``len(/steps)`` in files written before
it); a site's ``/total`` is trusted only when its digest is that of the committed windows,
otherwise the windows are merged (a writer was killed mid-commit). Version-1 files are read
eagerly. Nothing read is trusted: every record is checked against its declaration
(:func:`probe.store.schema.validate`), chunked data against its Fletcher-32 checksum, every
dataset's size, attribute and name is bounded, and structured attributes are JSON strings of
bounded depth; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..errors import FileFormatError, ProbeError
from ..stats._state import SPECS, StatState, WindowState, merge_rows
from .schema import (COMMITTED, CROSS, DIGEST, MAX_DATASET_BYTES, MAX_JSON_DEPTH, MAX_META_BYTES, MAX_NAME_CHARS,
                     SAMPLE_COORDS, SAMPLES, SCHEMA, SITES, STEPS, TOTAL, VERSION, WINDOW, check, codec_for, digest,
                     json_depth, open_file, validate)

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


def _consistent(states: dict[str, StatState], where: str) -> dict[str, StatState]:
    """Checks across one site's statistics: the histogram counts every finite kept value the
    moments count, and the top-k channels lie inside the site's width."""
    moments, hist, topk = states.get("moments"), states.get("histogram"), states.get("topk")
    if moments and hist and "counts" in hist and "n" in moments:
        counted, n = int(np.asarray(hist["counts"]).sum()), float(np.asarray(moments["n"]).sum())
        if counted != n:
            raise FileFormatError(f"{where}: the histogram counts {counted} values and the moments {n:.0f}; "
                                  "expected equal counts; the file is damaged or hostile")
    if moments and topk and "channel" in topk and "n" in moments:
        width = np.shape(moments["n"])[0]
        if (np.asarray(topk["channel"]) >= width).any():
            raise FileFormatError(f"{where}: a top-k channel is >= the site's width {width}; expected a channel "
                                  "index; the file is damaged or hostile")
    return states


class FileSource:
    """The windows and cumulative state of a schema-2 file, read on demand (one short open per
    read, so a live writer is never blocked for long)."""

    def __init__(self, path: str, steps: list[int], keys: dict[str, str], total_ok: bool,
                 cross: bool, digests: bool = False) -> None:
        self.path = path
        self.steps = steps
        self._keys = keys  # site name -> group name under /sites
        self._total_ok = total_ok
        self._cross = cross
        #: each /total group carries the digest of its state and of the windows it merges
        self._digests = digests
        self._samples_ok: bool | None = None
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
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        return FileFormatError(f"{self.path!r} could not be read ({text}); the file is damaged")

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
        return validate(kind, codec_for(kind).get_window(sg, rec, r, f), f"{sg.name}/{WINDOW}[{r}]")

    def window(self, r: int) -> WindowState:
        rows = len(self.steps)
        try:
            with self._file() as f:
                sites = {}
                for name, key in self._keys.items():
                    g = f[SITES][key]
                    sites[name] = _consistent({kind: self._kind_at(f, g[kind], kind, r, rows)
                                               for kind in g if kind in SPECS}, g.name)
                cross = self._kind_at(f, f[CROSS], CROSS, r, rows) if CROSS in f else {}
        except FileFormatError:
            raise
        except (OSError, KeyError, ValueError, TypeError, IndexError, RuntimeError) as err:
            raise self._damaged(err) from err
        return WindowState(self.steps[r], sites, cross)

    # ------------------------------------------------------------------- cumulative state
    def _all_windows(self) -> WindowState:
        if self._fallback is None:  # /total is stale (a writer was killed mid-commit): merge the windows
            self._fallback = merge_rows([self.window(r) for r in range(len(self.steps))])
        return self._fallback

    @staticmethod
    def _total_of(t, sg, kind: str, parts: list) -> StatState:
        """Statistic ``kind``'s cumulative state in the /total group ``sg``; appends to ``parts``
        what the digest covers (as :meth:`probe.store.writer.Writer._put_total` stored it)."""
        parts.append(kind)
        ds = sg.get(TOTAL)
        if ds is None:
            return {}
        check(ds)
        if ds.shape != () or not ds.dtype.names or "_present" not in ds.dtype.names:
            raise FileFormatError(f"{ds.name} has shape {ds.shape} and dtype {ds.dtype}; expected one record; "
                                  "the file is damaged or not a probe run")
        rec = ds[()]
        parts.append(rec)
        if not bool(rec["_present"]):
            return {}
        codec = codec_for(kind)
        state = codec.get_total(sg, rec, t)
        parts.extend(codec.parts)
        return validate(kind, state, f"{sg.name}/{TOTAL}")

    def _samples_proven(self, t) -> bool:
        """Whether /total/samples (shared by the sites' cumulative samples) is the committed one."""
        if self._samples_ok is None:
            ts = t[SAMPLES]
            parts = []
            for name in SAMPLE_COORDS:
                check(ts[name])
                parts.append(ts[name][()])
            self._samples_ok = str(ts.attrs.get(DIGEST, "")) == digest(len(self.steps), parts)
        return self._samples_ok

    def _proven(self, t, g, parts: list, sample: bool) -> bool:
        """Whether what was read from the /total group ``g`` is the merge of the committed windows:
        its digest, recomputed for their number, equals the one written with it."""
        if not self._digests:
            return True
        if str(g.attrs.get(DIGEST, "")) != digest(len(self.steps), parts):
            return False
        return not sample or self._samples_proven(t)

    def site_total(self, name: str) -> dict[str, StatState]:
        if not self._total_ok:
            return self._all_windows().sites.get(name, {})
        key = self._keys[name]
        try:
            with self._file() as f:
                t = f[TOTAL]
                if f"{SITES}/{key}" not in t:
                    return {} if not self._digests else self._all_windows().sites.get(name, {})
                g = t[SITES][key]
                parts: list = []
                states = {kind: self._total_of(t, g[kind], kind, parts) for kind in sorted(g) if kind in SPECS}
                proven = self._proven(t, g, parts, bool(states.get("sample")))
        except FileFormatError:
            raise
        except (OSError, KeyError, ValueError, TypeError, IndexError, RuntimeError) as err:
            raise self._damaged(err) from err
        if not proven:  # half rewritten by a writer killed mid-commit: merge the windows
            return self._all_windows().sites.get(name, {})
        return _consistent(states, f"/{TOTAL}/{SITES}/{key}")

    def cross_total(self) -> StatState:
        if not self._cross:
            return {}
        if not self._total_ok:
            return self._all_windows().cross
        try:
            with self._file() as f:
                where = f"{TOTAL}/{CROSS}"
                if where not in f:
                    return {} if not self._digests else self._all_windows().cross
                parts: list = []
                state = self._total_of(f[TOTAL], f[where], CROSS, parts)
                proven = self._proven(f[TOTAL], f[where], parts, False)
        except FileFormatError:
            raise
        except (OSError, KeyError, ValueError, TypeError, IndexError, RuntimeError) as err:
            raise self._damaged(err) from err
        return state if proven else self._all_windows().cross


#: the 8 bytes an HDF5 file starts with, at offset 0 or (after a user block) 512, 1024, 2048, ...
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _has_hdf5_signature(path: str) -> bool:
    """Whether the HDF5 format signature is where the HDF5 specification puts it (section II.A:
    offset 0, 512, 1024, 2048, ...). Unreadable files pass: opening them says why."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            offset = 0
            while offset + 8 <= size:
                f.seek(offset)
                if f.read(8) == HDF5_SIGNATURE:
                    return True
                offset = 512 if offset == 0 else offset * 2
    except OSError:
        return True
    return False


def _open_run(path: str):
    """The file at ``path`` open for reading, or a one-line error saying why it cannot be."""
    if not os.path.exists(path):
        raise ProbeError(f"no such file: {path!r}; expected a run written by probe; check the path")
    if os.path.isdir(path):
        raise ProbeError(f"{path!r} is a folder; expected a run file written by probe; pass the .h5 file inside it")
    if not _has_hdf5_signature(path):
        raise FileFormatError(f"{path!r} is not an HDF5 file (no HDF5 signature); expected a probe run (.h5); "
                              "pass the run file probe wrote")
    try:
        return open_file(path, "r")
    except OSError as err:
        if "open for write" in str(err):
            raise FileFormatError(f"{path!r} is marked open for writing: a live writer kept it over 10 s, or its "
                                  "writer died and the mark cannot be cleared here (a read-only file); expected a "
                                  f"closed file; copy it somewhere writable and run probe.store.repair on the "
                                  "copy") from err
        raise FileFormatError(f"{path!r} is not a readable HDF5 file ({str(err).splitlines()[0]}); "
                              "expected a probe run; the file is truncated or of another kind") from err


def _header(f, path: str) -> tuple[int, dict]:
    """The schema version and the description of an open file, refused unless a probe run."""
    for name in ("schema", "schema_version", "meta"):
        if name in f.attrs and f.attrs.get_id(name).get_storage_size() > MAX_META_BYTES:
            raise FileFormatError(f"{path!r}: the {name} attribute is over {MAX_META_BYTES} bytes; expected a "
                                  "probe run's description; the file is damaged or hostile")
    if f.attrs.get("schema") != SCHEMA:
        raise FileFormatError(f"{path!r} is HDF5 but not a probe run (no schema='probe' attribute); "
                              "expected a file written by probe.capture")
    raw = f.attrs.get("schema_version", -1)
    if isinstance(raw, (bool, np.bool_)) or not isinstance(raw, (int, np.integer)):
        raise FileFormatError(f"{path!r}: schema_version is {type(raw).__name__} {str(raw)[:40]!r}; expected an "
                              "integer; the file is damaged or not a probe run")
    version = int(raw)
    if version > VERSION:
        raise FileFormatError(f"{path!r} uses schema version {version}; this probe reads up to {VERSION}; "
                              "upgrade probe (pip install -U probe)")
    if STEPS not in f:
        raise FileFormatError(f"{path!r} has no /steps; expected a probe run; the file is damaged")
    text = f.attrs.get("meta", "{}")
    if isinstance(text, (str, bytes)) and len(text) > MAX_META_BYTES:  # variable-length: known once read
        raise FileFormatError(f"{path!r}: the meta attribute is over {MAX_META_BYTES} bytes; expected a probe "
                              "run's description; the file is damaged or hostile")
    try:
        meta = json.loads(text)
    except (TypeError, ValueError, RecursionError) as err:
        raise FileFormatError(f"{path!r}: the meta attribute is not JSON; the file is damaged") from err
    if not isinstance(meta, dict) or json_depth(meta) > MAX_JSON_DEPTH:
        raise FileFormatError(f"{path!r}: the meta attribute is {type(meta).__name__} nested "
                              f"{json_depth(meta)} deep; expected a JSON object at most {MAX_JSON_DEPTH} deep; "
                              "the file is damaged or hostile")
    sites = meta.get("sites", [])
    if not isinstance(sites, list) or not all(isinstance(s, dict) and isinstance(s.get("name", ""), str)
                                              and len(s.get("name", "")) <= MAX_NAME_CHARS for s in sites):
        raise FileFormatError(f"{path!r}: meta.sites is not a list of sites with names under {MAX_NAME_CHARS} "
                              "characters; expected the description probe writes; the file is damaged or hostile")
    for key in ("stats", "cross_sites"):
        value = meta.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and len(v) <= MAX_NAME_CHARS for v in value):
            raise FileFormatError(f"{path!r}: meta.{key} is not a list of names; expected the description probe "
                                  "writes; the file is damaged or hostile")
    return version, meta


def _steps(f, path: str) -> list[int]:
    """The committed windows' labels: the first ``committed`` entries of ``/steps`` (all of them in
    files written before the marker), checked to be unique integers."""
    ds = f[STEPS]
    if not hasattr(ds, "shape") or len(ds.shape) != 1 or ds.dtype.kind not in "iu":
        raise FileFormatError(f"{path!r}: /steps has shape {getattr(ds, 'shape', None)} and dtype "
                              f"{getattr(ds, 'dtype', None)}; expected a 1-D integer dataset; the file is damaged")
    rows = ds.shape[0]
    if COMMITTED in f.attrs:
        raw = f.attrs[COMMITTED]
        if isinstance(raw, (bool, np.bool_)) or not isinstance(raw, (int, np.integer)) or not 0 <= raw <= rows:
            raise FileFormatError(f"{path!r}: the committed attribute is {str(raw)[:40]!r} with {rows} steps "
                                  "stored; expected an integer in [0, steps]; the file is damaged")
        rows = int(raw)
    steps = _read_ds(ds, rows)
    if len(np.unique(steps)) != len(steps):
        raise FileFormatError(f"{path!r}: /steps repeats a label; expected unique window labels; the file is "
                              "damaged or hostile")
    return [int(s) for s in steps]


def _source(f, path: str) -> FileSource:
    """A schema-2 file's steps and site groups, with every window dataset checked."""
    steps = _steps(f, path)
    keys: dict[str, str] = {}
    for key in sorted(f.get(SITES, {})):
        g = f[SITES][key]
        name = g.attrs.get("name", key)
        if not isinstance(name, str) or len(name) > MAX_NAME_CHARS or name in keys:
            raise FileFormatError(f"{path!r}: /sites/{key} is named {str(name)[:60]!r}; expected a unique name under "
                                  f"{MAX_NAME_CHARS} characters; the file is damaged or hostile")
        keys[name] = key
        for kind in g:
            if WINDOW in g[kind]:
                check(g[kind][WINDOW])
    digests = COMMITTED in f.attrs
    if digests:  # each site's /total is proven (or not) by its digest when read
        total_ok = TOTAL in f or not steps
    else:
        total_ok = int(f[TOTAL].attrs.get("rows", -1)) == len(steps) if TOTAL in f else not steps
    return FileSource(path, steps, keys, total_ok, CROSS in f, digests)


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
    except FileFormatError:
        raise
    except (OSError, KeyError, ValueError, TypeError, IndexError, AttributeError, RuntimeError) as err:
        raise FileFormatError(f"{path!r} could not be read ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                              "the file is damaged") from err
    return Run(meta, path=path, source=source)
