"""The run file's layout (schema version 2, ``docs/format.md``) and one codec per statistic.

A codec says how a statistic's state becomes the fields of its record and the datasets beside
it, and how it comes back: the writer calls ``put_window``/``put_total``, the reader
``get_window``/``get_total``, and the two halves of each encoding sit next to each other::

    codec = codec_for("histogram")
    fields = codec.put_window(group, state, samples)   # writes index/count, returns start/end/lossless
    state = codec.get_window(group, record, row, root)  # the dense counts again

Three encodings exist: :class:`Plain` (every declared field in the record), :class:`Sparse`
(bucket ``counts`` as the non-empty ``index``/``count`` pairs, for the kinds in :data:`SPARSE`)
and :class:`Sample` (the values in the record, the coordinates in a ``samples`` group shared by
the sites that drew the same keys). Decoding checks what it reads against the declarations:
nothing read is trusted.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np

from ..errors import FileFormatError
from ..stats._buckets import Buckets
from ..stats._state import SPECS, StatState, key_groups

__all__ = ["SCHEMA", "VERSION", "LIBVER", "STEPS", "SITES", "SAMPLES", "CROSS", "TOTAL", "WINDOW",
           "SITE_ATTRS", "SAMPLE_COORDS", "SPARSE", "LZF", "MAX_DATASET_BYTES", "Fields", "site_key", "open_file",
           "pack", "unpack", "extend", "put", "check", "Plain", "Sparse", "Sample", "codec_for",
           "WindowSamples", "TotalSamples", "COMMITTED", "DIGEST", "MAX_META_BYTES", "MAX_NAME_CHARS",
           "MAX_JSON_DEPTH", "digest", "validate", "json_depth"]

SCHEMA = "probe"
VERSION = 2
#: HDF5 1.10 objects: older HDF5 tools read the files, SWMR stays possible, and chunked datasets
#: with one growing axis index their chunks in an extensible array, whose appends never move the
#: entries of earlier chunks (what keeps committed rows reachable after a kill mid-commit)
LIBVER = ("v110", "v110")
#: the root's groups and datasets: commit marker, per-site windows, shared sample coordinates,
#: cross-layer windows, cumulative state
STEPS, SITES, SAMPLES, CROSS, TOTAL = "steps", "sites", "samples", "cross", "total"
#: a statistic group's per-window records ``[R]``; its cumulative record under ``/total`` is ``TOTAL``
WINDOW = "window"
#: string attributes of a ``sites/NN`` group (besides the integer ``hf_index``)
SITE_ATTRS = ("name", "module", "read", "dtype")
#: the sample fields stored once per distinct set of keys, in ``samples`` (the values stay per site)
SAMPLE_COORDS = ("key", "row", "position", "channel", "token")
#: statistics whose bucket ``counts`` are stored sparsely: per window the rows ``start:end`` of the
#: group's ``index``/``count`` datasets, in ``/total`` the group's own ``index``/``count``
SPARSE = ("histogram", "norm")
#: refuse to read a single dataset larger than this (a hostile file cannot exhaust memory)
MAX_DATASET_BYTES = 8 << 30
#: root attribute: the number of committed windows, written last by each commit (the commit point)
COMMITTED = "committed"
#: attribute of each ``/total`` site group (and ``/total/cross``): the digest of its cumulative
#: state together with the number of windows it merges (:func:`digest`)
DIGEST = "digest"
#: bounds on what a reader accepts before parsing it: the ``meta`` attribute, a site name, JSON nesting
MAX_META_BYTES = 16 << 20
MAX_NAME_CHARS = 1024
MAX_JSON_DEPTH = 64
#: chunk of the flat (non-row) datasets: sparse histogram buckets
CHUNK_1D = 8192
#: per-window records of the per-position statistics, and the sample coordinates but the keys, go
#: through h5py's LZF filter (fast): positions past the longest sequence are zeros and coordinates
#: are small integers; moments, keys and values are dense floats, which LZF barely shrinks
LZF = ("position", "norm")

#: one record's fields, by name (numpy scalars or arrays)
Fields = dict[str, Any]


def site_key(i: int, count: int) -> str:
    """The group name of site ``i`` of ``count``: zero-padded so the names sort in capture order."""
    return f"{i:0{max(2, len(str(count - 1)))}d}"


def _h5py():
    import h5py

    return h5py


def open_file(path: str, mode: str, wait: float = 10.0, writer: bool = False):
    """``h5py.File`` with our libver and HDF5's file lock, so a reader never sees a half-appended
    window: while another process holds the file we retry for up to ``wait`` seconds (appends
    take milliseconds). On filesystems without locking we open without it.

    A file whose writer died keeps HDF5's "open for write" flag, which makes HDF5 refuse it: when
    no live writer holds its lock (``writer``: the caller is that writer) the flag is cleared
    (:func:`probe.store.repair.clear_flag`) and the open retried; what the dead writer began
    past the commit marker is ignored by the readers and overwritten by the next writer."""
    h5py = _h5py()
    deadline = time.monotonic() + wait
    cleared = False
    while True:
        try:
            return h5py.File(path, mode, libver=LIBVER, locking=True)
        except OSError as err:
            text = str(err)
            if "open for write" in text and not cleared:
                from .lock import held
                from .repair import clear_flag

                if writer or not held(path):
                    try:
                        cleared = clear_flag(path)
                    except OSError:
                        raise err from None
                    if cleared:
                        continue
                elif time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
            busy = "errno = 11" in text or "temporarily unavailable" in text
            if busy and time.monotonic() < deadline:
                time.sleep(0.02)
                continue
            if "lock" in text.lower() and not busy:  # no locking on this filesystem
                return h5py.File(path, mode, libver=LIBVER, locking=False)
            raise


# ------------------------------------------------------------------------------- records
def pack(fields: Fields, present: bool, dtype: np.dtype | None = None) -> np.ndarray:
    """One record (a numpy structured scalar) holding ``_present`` and every field; an absent
    record (``present`` false) is zeros."""
    if dtype is None:
        dtype = np.dtype([("_present", np.bool_)] + [(k, np.asarray(v).dtype, np.shape(v))
                                                      for k, v in fields.items()])
    rec = np.zeros((), dtype=dtype)
    if present:
        rec["_present"] = True
        for k, v in fields.items():
            rec[k] = v
    return rec


def unpack(rec: np.void, names, where: str) -> StatState:
    """The fields ``names`` of a record read back; a missing one is a damaged file."""
    missing = [n for n in names if n not in (rec.dtype.names or ())]
    if missing:
        raise FileFormatError(f"{where} lacks fields {missing}; the file is damaged or not a probe run")
    return {n: np.asarray(rec[n]) for n in names}


# ------------------------------------------------------------------------------ datasets
def extend(group, name: str, value: np.ndarray) -> int:
    """Append ``value`` to the 1-D ``group/name``; returns its new length."""
    if name not in group:
        group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=value.dtype, chunks=(CHUNK_1D,),
                             fletcher32=True)
    ds = group[name]
    start = ds.shape[0]
    if value.size:
        ds.resize(start + value.size, axis=0)
        ds[start:] = value
    return start + value.size


def put(group, name: str, value: np.ndarray) -> None:
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
        chunk = min(CHUNK_1D, max(256, value.shape[0]))
        group.create_dataset(name, data=value, maxshape=(None,), chunks=(chunk,), fletcher32=True)
    else:
        group.create_dataset(name, data=value)


def check(ds) -> None:
    """Refuse datasets that are not numbers (or records of numbers) or declare over 8 GiB."""
    kinds = [ds.dtype[n].base.kind for n in ds.dtype.names] if ds.dtype.names else [ds.dtype.kind]
    if any(k not in "biuf" for k in kinds):
        raise FileFormatError(f"{ds.name} has dtype {ds.dtype}; expected numbers; the file is not a probe run")
    nbytes = int(np.prod(ds.shape, dtype=np.float64)) * ds.dtype.itemsize
    if nbytes > MAX_DATASET_BYTES:
        raise FileFormatError(f"{ds.name} declares {nbytes} bytes; expected under {MAX_DATASET_BYTES}; "
                              "the file is damaged or hostile")


# ------------------------------------------------------------------ shared sample coordinates
class SampleRows(Protocol):
    """Where a sample state's coordinates are stored: the row of the ``samples`` group."""

    def row(self, state: StatState) -> int: ...


class WindowSamples:
    """``/samples`` while one window is written: a set of coordinates already stored in this
    window is pointed at again, a new one is appended as the next row."""

    def __init__(self, root) -> None:
        self._root = root
        self._known: list[tuple[int, np.ndarray]] = []

    def row(self, state: StatState) -> int:
        key = np.asarray(state["key"])
        for c, known in self._known:
            if known.shape == key.shape and np.array_equal(known, key):
                return c
        samples = self._root.require_group(SAMPLES)
        index = samples["key"].shape[0] if "key" in samples else 0
        for name in SAMPLE_COORDS:
            v = np.asarray(state[name])
            if name not in samples:
                samples.create_dataset(name, shape=(0, *v.shape), maxshape=(None, *v.shape),
                                       dtype=v.dtype, chunks=(1, *v.shape), fletcher32=True,
                                       compression=None if name == "key" else "lzf")
            ds = samples[name]
            ds.resize(index + 1, axis=0)
            ds[index] = v
        self._known.append((index, key))
        return index


class TotalSamples:
    """``/total/samples``, rewritten whole: one row per distinct set of keys among ``states``
    (the cumulative sample states of every site, in site order)."""

    def __init__(self, total, states: list[StatState]) -> None:
        groups = key_groups([st["key"] for st in states])
        reps = sorted(set(groups))
        self._keys = [states[r]["key"] for r in reps]
        #: the coordinates as stored, in :data:`SAMPLE_COORDS` order (what :func:`digest` covers)
        self.parts: list[np.ndarray] = []
        if reps:
            ts = total.require_group(SAMPLES)
            for field in SAMPLE_COORDS:
                value = np.stack([states[r][field] for r in reps])
                put(ts, field, value)
                self.parts.append(value)

    def row(self, state: StatState) -> int:
        # the stored set whose keys equal this state's, found as key_groups found it
        return key_groups([*self._keys, state["key"]])[-1]


# ---------------------------------------------------------------------------------- codecs
class Plain:
    """Every declared field of ``kind`` in the record (the cross-layer statistic, moments, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.names = SPECS[kind].names
        #: the filter of the ``window`` records
        self.compression = "lzf" if kind in LZF else None
        #: the datasets beside the record that the last ``put_total``/``get_total`` wrote or read,
        #: as stored (what :func:`digest` covers besides the record)
        self.parts: list[np.ndarray] = []

    def put_window(self, sg, state: StatState, samples: SampleRows) -> Fields:
        return {n: np.asarray(state[n]) for n in self.names}

    def get_window(self, sg, rec: np.void, r: int, root) -> StatState:
        return unpack(rec, self.names, f"{sg.name}/{WINDOW}")

    def put_total(self, sg, state: StatState, samples: SampleRows) -> Fields:
        return {n: np.asarray(state[n]) for n in self.names}

    def get_total(self, sg, rec: np.void, root) -> StatState:
        return unpack(rec, self.names, f"{sg.name}/{TOTAL}")


def _sparse(sg, counts) -> tuple[np.ndarray, np.ndarray]:
    """Dense bucket ``counts`` as (int32 bucket index, int64 count) of the non-empty buckets; the
    group's ``buckets`` attribute records the dense length the first time."""
    counts = np.asarray(counts)
    nz = np.flatnonzero(counts)
    if "index" not in sg:
        sg.attrs["buckets"] = counts.shape[0]
    return nz.astype(np.int32), counts[nz].astype(np.int64)


def _dense_counts(index: np.ndarray, count: np.ndarray, buckets: int, where: str) -> np.ndarray:
    if not Buckets.is_count(buckets) or index.shape != count.shape or index.ndim != 1 or (
            index.size and (index.min() < 0 or index.max() >= buckets)):
        raise FileFormatError(f"{where}: sparse histogram does not fit {buckets} buckets; the file is damaged")
    if index.dtype.kind not in "iu" or count.dtype.kind not in "iu" or (
            index.size and ((count <= 0).any() or (np.diff(index) <= 0).any())):
        raise FileFormatError(f"{where}: sparse histogram holds a count <= 0 or bucket indices that do not "
                              "increase; expected positive counts in increasing buckets; the file is damaged")
    counts = np.zeros(buckets, dtype=np.int64)
    counts[index] = count
    return counts


class Sparse(Plain):
    """Bucket ``counts`` as the non-empty buckets: ``index`` (int32) and ``count`` (int64) beside
    the record, which holds the other fields (and, per window, the rows ``start:end`` they
    fill). Records that hold ``counts`` themselves (files written before the norm buckets went
    sparse) read as :class:`Plain`."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.rest = [n for n in self.names if n != "counts"]

    def put_window(self, sg, state: StatState, samples: SampleRows) -> Fields:
        start = sg["count"].shape[0] if "count" in sg else 0
        index, count = _sparse(sg, state["counts"])
        extend(sg, "index", index)
        end = extend(sg, "count", count)
        fields: Fields = {"start": np.int64(start), "end": np.int64(end)}
        if self.kind == "histogram":
            fields["lossless"] = np.bool_(bool(state["lossless"]))
        else:
            fields.update({n: np.asarray(state[n]) for n in self.rest})
        return fields

    def get_window(self, sg, rec: np.void, r: int, root) -> StatState:
        if "start" not in (rec.dtype.names or ()):
            return super().get_window(sg, rec, r, root)
        start, stop = int(rec["start"]), int(rec["end"])
        if not 0 <= start <= stop <= sg["count"].shape[0]:
            raise FileFormatError(f"{sg.name}: row {r} spans buckets [{start}, {stop}) outside the "
                                  "stored ones; the file is damaged")
        counts = _dense_counts(sg["index"][start:stop], sg["count"][start:stop],
                               int(sg.attrs.get("buckets", 0)), sg.name)
        return {"counts": counts, **unpack(rec, self.rest, f"{sg.name}/{WINDOW}")}

    def put_total(self, sg, state: StatState, samples: SampleRows) -> Fields:
        index, count = _sparse(sg, state["counts"])
        put(sg, "index", index)
        put(sg, "count", count)
        self.parts = [index, count]
        return {n: np.asarray(state[n]) for n in self.rest}

    def get_total(self, sg, rec: np.void, root) -> StatState:
        if "index" not in sg or "counts" in (rec.dtype.names or ()):
            return super().get_total(sg, rec, root)
        for name in ("index", "count"):
            check(sg[name])
        index, count = sg["index"][()], sg["count"][()]
        self.parts = [index, count]
        return {"counts": _dense_counts(index, count, int(sg.attrs.get("buckets", 0)), sg.name),
                **unpack(rec, self.rest, f"{sg.name}/{TOTAL}")}


class Sample(Plain):
    """The sampled ``value`` in the record, and ``coords``: the row of the ``samples`` group (of
    the root, or of ``/total``) holding the keys and coordinates the site shares with others."""

    def put_window(self, sg, state: StatState, samples: SampleRows) -> Fields:
        return {"coords": np.int64(samples.row(state)), "value": np.asarray(state["value"])}

    def get_window(self, sg, rec: np.void, r: int, root) -> StatState:
        return _sample_state(root[SAMPLES], rec, sg.name)

    put_total = put_window  # the row of /total/samples instead of /samples

    def get_total(self, sg, rec: np.void, root) -> StatState:
        return _sample_state(root[SAMPLES], rec, sg.name)


def _sample_state(samples, rec: np.void, where: str) -> StatState:
    """A sample's state: its record's values and the shared coordinates row it points to."""
    c = int(rec["coords"])
    if not 0 <= c < samples["key"].shape[0]:
        raise FileFormatError(f"{where}: sample coordinates {c} not stored; the file is damaged")
    out = {n: samples[n][c] for n in SAMPLE_COORDS}
    out["value"] = np.asarray(rec["value"])
    return out


def codec_for(kind: str) -> Plain:
    """The encoding of statistic ``kind`` (one of :data:`probe.stats._state.SPECS`)."""
    if kind in SPARSE:
        return Sparse(kind)
    if kind == "sample":
        return Sample(kind)
    return Plain(kind)


# ------------------------------------------------------------------------------ integrity
def digest(rows: int, parts: Iterable[Any]) -> str:
    """The digest of cumulative state as stored (records' bytes, sparse buckets, sample
    coordinates, in a fixed order) together with the number of windows ``rows`` it merges. The
    writer stores it beside ``/total``'s data in the same commit; a reader trusts that data only
    when it recomputes the same digest for the committed rows, so a ``/total`` half rewritten by
    a killed writer (any mix of old and new bytes, in whatever order HDF5 wrote them) is never
    believed. CRC-32, chained: it tells generations apart; it is no defence against a forger, who
    could as well write wrong windows (those are what :func:`validate` checks)."""
    crc = zlib.crc32(np.int64(rows).tobytes())
    for part in parts:
        data = part.encode() if isinstance(part, str) else np.ascontiguousarray(part).tobytes()
        crc = zlib.crc32(data, crc)
    return f"{crc:08x}"


def json_depth(obj: Any) -> int:
    """How deeply ``obj`` (parsed JSON) nests lists and dicts (iteratively: no recursion to exhaust)."""
    depth, level = 0, [(obj, 1)]
    while level:
        node, d = level.pop()
        if isinstance(node, (dict, list)):
            depth = max(depth, d)
            level.extend((v, d + 1) for v in (node.values() if isinstance(node, dict) else node))
    return depth


#: fields holding counts (>= 0) besides the integer ``sum`` fields: the moment and co-moment counts
_COUNTS = {"n", "pos_n", "keep_n", "all_n", "keep_cos_n", "all_cos_n", "unit_n"}
#: fields holding locations: ``-1`` (empty slot) or an index; besides these, every integer field
#: that follows an argmax or a top-k (``absmax_at``, ``maxlogit_at``, ...)
_INDICES = {"row", "position", "channel", "token", "absmax_at"}
_LOCATED = {"argmax", "topk", "bottomk"}


def validate(kind: str, state: StatState, where: str) -> StatState:
    """Check one decoded state against its declaration in :data:`probe.stats._state.SPECS`: every
    declared field it holds has the declared dtype kind and rank, the symbolic dims agree across
    fields (``D``, ``P``, ``k``, ...), counts are finite and ``>= 0``, locations are ``>= -1``,
    sample keys lie in ``[0, 1)`` or are ``inf``, and the sparse bucket counts are positive.

    Returns:
        ``state`` unchanged.

    Raises:
        FileFormatError: one line naming ``where``, the field and the check that failed.
    """
    spec = SPECS[kind]
    dims: dict[str, int] = {}
    for f in spec.fields:
        if f.name not in state:
            continue
        a = np.asarray(state[f.name])
        want = np.dtype(f.dtype).kind
        if a.dtype.kind != want and not (want == "i" and a.dtype.kind == "u"):
            raise FileFormatError(f"{where}: field {f.name!r} has dtype {a.dtype}; expected {f.dtype} as declared; "
                                  "the file is damaged or not a probe run")
        if a.ndim != len(f.shape):
            raise FileFormatError(f"{where}: field {f.name!r} has shape {a.shape}; expected {len(f.shape)} "
                                  f"dimension(s) {f.shape}; the file is damaged or not a probe run")
        for d, size in zip(f.shape, a.shape):
            expect = int(d) if d.isdigit() else dims.setdefault(d, int(size))
            if size != expect:
                raise FileFormatError(f"{where}: field {f.name!r} has shape {a.shape}; expected {d}={expect} as in "
                                      "the other fields; the file is damaged or not a probe run")
        if not a.size:
            continue
        if f.name in _COUNTS or (a.dtype.kind in "iu" and f.reduce == "sum"):
            if not (np.isfinite(a).all() and (a >= 0).all()):
                raise FileFormatError(f"{where}: field {f.name!r} holds a negative or non-finite count; "
                                      "expected counts >= 0; the file is damaged or hostile")
        elif (f.name in _INDICES or (a.dtype.kind in "iu" and f.reduce in _LOCATED)) and (a < -1).any():
            raise FileFormatError(f"{where}: field {f.name!r} holds an index below -1; expected -1 (empty) or an "
                                  "index; the file is damaged or hostile")
        elif kind == "sample" and f.name == "key" and not (((a >= 0) & (a < 1)) | np.isposinf(a)).all():
            raise FileFormatError(f"{where}: sample keys outside [0, 1) and not inf; expected uniform keys; "
                                  "the file is damaged or hostile")
    return state
