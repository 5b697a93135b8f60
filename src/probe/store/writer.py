"""The write side of the run file: :class:`Writer` appends windows, :func:`write_run` writes a
whole run, :func:`annotate` adds entries to a closed file's description.

A commit has three phases, each ended by a flush (``docs/format.md``, crash model):

1. *rows*: the window's records, its shared sample coordinates and its ``/steps`` label, all
   past the committed rows, where no reader looks;
2. *total*: the cumulative state under ``/total`` rewritten in place, each site's records with
   the digest of what they hold (:func:`probe.store.schema.digest`);
3. *marker*: the root attribute ``committed`` (and ``/total.rows``) set to the new number of
   windows. This single small write is the commit point.

A process killed at any instant leaves the committed windows intact and readable; a reader sees
exactly ``committed`` windows and a cumulative state it can prove is theirs, or merges them.

One writer per file: a lock file beside it (``<path>.lock``, holding ``pid@host``) is locked
with ``flock`` for the writer's life (:mod:`.lock`), so a second writer (``overwrite=True``
included) is refused before it touches the file.

A failed commit never crashes the process. HDF5 cannot tear down a file whose write failed: any
later flush or close of it, the one HDF5 itself runs at interpreter exit included, crashes the
process (SIGSEGV). So the host process never holds the file open for writing: each commit is
written by probe's writer process (:mod:`._server`, one per host process), which reports success
or the error and, after a failure, ends with ``os._exit`` (the next commit starts a new one). A
commit is also refused before it starts when the file was deleted or replaced, or the disk lacks
room for it. Where no writer process can start (no Python executable), or with
``PROBE_COMMIT=inline``, commits are written in this process, and a handle whose write failed is
detached and never closed (:func:`_abandon`): the crash at exit is then still possible.

Durability (``fsync``, on by default; ``PROBE_FSYNC=0`` turns it off): the file's data reach the
disk (``fsync``) after phase 2 and again after the marker, so a power loss keeps every window
whose commit returned, and the marker can never reach the disk before the rows and ``/total`` it
counts. The folder is synced once when the file is created.

``PROBE_FAULT=<fault>[:<commit>[:<file name>]]`` (tests only): at a phase of a commit (``begin``,
``rows``, ``rows-flushed``, ``total``, ``total-flushed``, ``marker``, ``closed``) the writing
process ends with ``os._exit``; ``ioerror-<phase>`` (``rows``, ``total`` or ``marker``) instead
makes every later write of that commit fail in HDF5 (``EBADF``: its descriptor is swapped for a
read-only one), as a failing disk would. ``PROBE_COMMIT=inline`` writes commits in this process
(benchmarks).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from ..errors import ProbeError
from ..stats._state import SPECS, WindowState, merge_rows
from .lock import Lock, lock_path
from .schema import (COMMITTED, CROSS, DIGEST, SAMPLES, SCHEMA, SITE_ATTRS, SITES, SPARSE, STEPS, TOTAL, VERSION,
                     WINDOW, Fields, TotalSamples, WindowSamples, codec_for, digest, open_file, pack, site_key)

__all__ = ["Writer", "StoreError", "write_run", "check_writable", "annotate", "lock_path", "PHASES", "FAULT_ENV"]

#: the named instants of a commit, in order (fault injection in tests: :data:`FAULT_ENV`)
PHASES = ("begin", "rows", "rows-flushed", "total", "total-flushed", "marker", "closed")
#: the phases where ``ioerror-<phase>`` makes HDF5's writes fail (:data:`FAULT_ENV`)
IO_PHASES = ("rows", "total", "marker")
FAULT_ENV = "PROBE_FAULT"
#: exit status of a process ended by :data:`FAULT_ENV`
FAULT_EXIT = 86
#: ``inline``: commits are written in this process instead of probe's writer process (module docstring)
COMMIT_ENV = "PROBE_COMMIT"
#: ``0``: no ``fsync`` at the commit point (module docstring)
FSYNC_ENV = "PROBE_FSYNC"


class StoreError(ProbeError):
    """A window could not be written to the run file (disk full, read-only, the file deleted or
    replaced, another writer); the file holds the windows committed before it."""


def _fault(phase: str, commit: int, path: str = "", f=None) -> None:
    """The fault :data:`FAULT_ENV` asks for at ``phase`` of commit number ``commit`` of ``path``
    (tests): end the process (the instant after ``phase``), or, called with the open file ``f``
    as ``phase`` begins, make every HDF5 write to it fail from there on (``ioerror-<phase>``)."""
    want = os.environ.get(FAULT_ENV)
    if not want:
        return
    name, _, rest = want.partition(":")
    at, _, file = rest.partition(":")
    if (at and int(at) != commit) or (file and os.path.basename(path) != file):
        return
    if name == phase and f is None:
        os._exit(FAULT_EXIT)
    if name == f"ioerror-{phase}" and f is not None:
        fd = f.id.get_vfd_handle()
        read_only = os.open(path, os.O_RDONLY)
        os.dup2(read_only, fd)  # reads still work; every write now fails with EBADF
        os.close(read_only)


def _fsync_default() -> bool:
    return os.environ.get(FSYNC_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _sync(f) -> None:
    """``fsync`` the open file ``f`` (after its flush): its data are on the disk."""
    fd = f.id.get_vfd_handle()
    if isinstance(fd, int) and fd >= 0:
        os.fsync(fd)


def _sync_folder(path: str) -> None:
    """``fsync`` the folder of ``path``, so the file's name survives a power loss (best effort:
    some filesystems refuse to sync a folder)."""
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


#: handles of failed commits, never closed (see :func:`_abandon`)
_ABANDONED: list = []


def _abandon(f) -> None:
    """Let go of an h5py file whose write failed without letting HDF5 touch the file again.

    After a failed write (``ENOSPC``, ``EIO``) HDF5's metadata cache is in a state its close
    cannot tear down: ``File.close()`` then crashes the process (SIGSEGV), whatever the close
    writes. So the handle is never closed: its file descriptor is pointed at an unlinked scratch
    file (nothing more reaches the run file, which stays as the last flush left it) and the
    handle is kept alive for the life of the process. Commits near a full disk do not come here:
    they run in a child process (:meth:`Writer._send_apart`)."""
    fd = None
    try:
        fd = f.id.get_vfd_handle()
    except Exception:  # noqa: BLE001 - no descriptor to move: the handle is kept all the same
        pass
    if isinstance(fd, int) and fd >= 0:
        try:
            scratch = tempfile.TemporaryFile(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        except OSError:
            scratch = open(os.devnull, "r+b")
        with scratch:
            os.dup2(scratch.fileno(), fd)
    _ABANDONED.append(f)
    try:  # one reference more than Python will ever drop: not closed at interpreter exit either
        import ctypes

        ctypes.pythonapi.Py_IncRef(ctypes.py_object(f.id))
    except Exception:  # noqa: BLE001 - best effort
        pass


def _stored_bytes(states) -> int:
    """About what ``states`` take in the file: bucket ``counts`` are stored sparse (12 bytes a
    non-empty bucket), everything else as is."""
    size = 0
    for st in states:
        for name, v in st.items():
            a = np.asarray(v)
            size += 12 * int(np.count_nonzero(a)) if name == "counts" else a.nbytes
    return size


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


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
    live ``probe show``), and a process killed at any instant loses nothing committed (module
    docstring). The cumulative state is merged here in numpy from the statistics' declared
    reductions.

    Args:
        path: the run file, created (and its folder synced, with ``fsync``).
        overwrite: replace an existing file (never one another live process writes).
        fsync: ``fsync`` the file at each commit (default: on, unless ``PROBE_FSYNC=0``): a
            power loss then keeps every acknowledged window (``docs/format.md``, Durability).
        isolate: write each commit in probe's writer process (:mod:`._server`; default: on,
            unless ``PROBE_COMMIT=inline``), so a failed HDF5 write cannot crash this process.

    Raises (``__init__``):
        ProbeError: ``path`` cannot be created, or another live process writes it.
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False, *, fsync: bool | None = None,
                 isolate: bool | None = None) -> None:
        path = os.fspath(path)
        check_writable(path, overwrite)
        self.path = path
        #: the file's absolute path: every later open, here or in the writer process, is of this file
        self._where = os.path.abspath(path)
        self._settings(fsync, isolate)
        self._lock = Lock(self._where)
        try:
            with open_file(path, "w") as f:
                f.attrs["schema"] = SCHEMA
                f.attrs["schema_version"] = VERSION
                f.attrs[COMMITTED] = 0
                f.create_dataset(STEPS, shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(1024,),
                                 fletcher32=True)
            self._id = _identity(path)
            if self.fsync:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                _sync_folder(path)
        except OSError as err:
            self._lock.release()
            raise ProbeError(f"cannot create out={path!r}: {err}; choose a writable path") from err
        self.rows = 0
        self.total: WindowState | None = None
        #: why this process may no longer write the file (a failed write), or ``None``
        self._broken: str | None = None
        self._unsent()
        self._forget()

    def _settings(self, fsync: bool | None, isolate: bool | None) -> None:
        #: whether each commit is synced to the disk (:data:`FSYNC_ENV`)
        self.fsync = _fsync_default() if fsync is None else bool(fsync)
        #: whether each commit is written by probe's writer process (:data:`COMMIT_ENV`)
        self.isolate = os.environ.get(COMMIT_ENV, "").strip().lower() != "inline" if isolate is None else bool(isolate)
        if self.isolate:
            from ._server import Server

            Server.get()  # started now, ready by the first commit

    def _unsent(self) -> None:
        """No commit in flight (:meth:`append` with ``wait=False``)."""
        #: the commit in flight: its number, the cumulative state it writes, its meta
        self._flight: tuple[int, WindowState, dict[str, Any]] | None = None
        self._token: object | None = None
        self._inflight_row: WindowState | None = None

    def _forget(self) -> None:
        """Drop what this writer believes the file already holds (after a failed commit)."""
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
                                   chunks=(1,), compression=compression, fletcher32=True)
        else:
            stale = ds.shape[0] > self.rows  # a commit that failed wrote this row already
            if ds.shape[0] != self.rows + 1:
                ds.resize(self.rows + 1, axis=0)
            if not present:
                if stale:
                    ds[self.rows] = np.zeros((), ds.dtype)
                return
            rec = pack(fields, True, ds.dtype)
        ds[self.rows] = rec

    def _window(self, sg, kind: str, state: dict, samples: WindowSamples) -> None:
        codec = codec_for(kind)
        self._record(sg, codec.put_window(sg, state, samples) if state else {}, bool(state), codec.compression)

    # ------------------------------------------------------------------ the cumulative state
    @staticmethod
    def _put_total(sg, kind: str, state: dict, samples: TotalSamples) -> list:
        """The compound scalar ``sg/total``, overwritten in place (its shape and dtype are fixed),
        and what was stored: the digest's parts of this statistic."""
        codec = codec_for(kind)
        fields = codec.put_total(sg, state, samples) if state else {}
        ds = sg.get(TOTAL)
        if ds is None:
            if not state:
                return [kind]
            rec = pack(fields, True)
            sg.create_dataset(TOTAL, data=rec)
        else:
            rec = pack(fields, bool(state), ds.dtype)
            ds[()] = rec
        return [kind, rec, *codec.parts]

    def _total(self, f, meta: dict, total: WindowState) -> None:
        t = f.require_group(TOTAL)
        t.attrs["rows"] = -1  # for readers before the digests: fall back to the windows
        rows = self.rows + 1
        names = [s["name"] for s in meta["sites"]]
        samples = TotalSamples(t, [st for name in names if (st := total.state(name, "sample"))])
        if samples.parts:
            t[SAMPLES].attrs[DIGEST] = digest(rows, samples.parts)
        for i, name in enumerate(names):
            key = f"{SITES}/{site_key(i, len(names))}"
            if key not in t:
                t.require_group(key).attrs["name"] = name
            tg = t[key]
            states = total.sites.get(name, {})
            parts: list = []
            for kind in sorted(k for k in states if k in SPECS):
                parts += self._put_total(tg.require_group(kind), kind, states[kind] or {}, samples)
            tg.attrs[DIGEST] = digest(rows, parts)
        if total.cross or CROSS in t:
            sg = t.require_group(CROSS)
            sg.attrs[DIGEST] = digest(rows, self._put_total(sg, CROSS, total.cross or {}, samples))

    # ------------------------------------------------------------------------------ a window
    def _check(self, row: WindowState, total: WindowState) -> None:
        """Refuse a commit before touching the file: the file deleted or replaced since this
        writer created it, or less free space than the commit could need (a write that fails
        half-way leaves the most to clean up)."""
        try:
            same = _identity(self._where) == self._id
        except OSError:
            same = False
        if not same:
            raise StoreError(f"out={self.path!r} was deleted or replaced by another file since the capture began; "
                             "expected the file probe created; the windows stay in memory")
        window = _stored_bytes([st for kinds in row.sites.values() for st in kinds.values() if st] + [row.cross])
        buckets = _stored_bytes([total.state(n, k) for n in total.sites for k in SPARSE])
        need = 2 * window + buckets + (256 << 10)  # twice the window, for HDF5's chunks and metadata
        try:
            st = os.statvfs(os.path.dirname(self._where))
            free = st.f_bavail * st.f_frsize
        except (OSError, AttributeError):
            return
        if free < need:
            raise StoreError(f"out={self.path!r}: {free} bytes free on its filesystem; expected at least {need} for "
                             "the next window; free some space (the windows stay in memory)")
        self._reserve(need)

    def _reserve(self, need: int) -> None:
        """Allocate ``need`` bytes past the file's end before HDF5 writes: HDF5 places new data at
        its end of allocation, inside that space, so a full disk or a quota refuses the commit here,
        before anything is written, instead of failing a write half-way (HDF5 trims the file back
        to what it uses when it closes it)."""
        fallocate = getattr(os, "posix_fallocate", None)
        if fallocate is None:
            return
        try:
            fd = os.open(self._where, os.O_WRONLY)
            try:
                fallocate(fd, os.fstat(fd).st_size, need)
            finally:
                os.close(fd)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise StoreError(f"out={self.path!r}: no room for the next window ({need} bytes: "
                                 f"{os.strerror(err.errno)}); expected free space; free some (the windows stay in "
                                 "memory)") from None
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise StoreError(f"cannot write out={self.path!r} ({os.strerror(err.errno or 0)}); expected a "
                                 "writable file; check the disk and permissions (the windows stay in memory)") from None

    def append(self, meta: dict[str, Any], row: WindowState, wait: bool = True) -> None:
        """Commit one window: when this returns, the file holds it (and, with ``fsync``, so does
        the disk). With ``wait=False`` the commit is handed to probe's writer process and this
        returns at once: it is acknowledged by :meth:`settle`, which the next ``append`` (and
        :meth:`close`) calls first; until then :attr:`in_flight` is 1 and :attr:`rows` does not
        count it.

        Raises:
            StoreError: nothing was committed (see the message): this window, or the one still in
                flight from an earlier ``append(wait=False)`` (then this one was not begun). The
                file holds the windows committed before, and this writer can be retried with the
                same or a later window.
        """
        self.settle()
        cross_sites = meta.get("cross_sites", [])
        total = merge_rows([row] if self.total is None else [self.total, row], cross_sites)
        commit = self.rows + 1
        self._check(row, total)
        _fault("begin", commit, self.path)
        if self.isolate and self._broken is None and self._send_apart(meta, row, total, commit):
            self._flight = (commit, total, meta)
            if wait:
                self.settle()
            return
        self._append_here(meta, row, total, commit)
        self._acknowledge(commit, total)

    @property
    def in_flight(self) -> int:
        """Windows handed to the writer process and not yet acknowledged (0 or 1)."""
        return 0 if self._flight is None else 1

    def answered(self) -> bool:
        """Whether :meth:`settle` would return without waiting."""
        if self._flight is None:
            return True
        from ._server import Server

        server = Server._current
        return server is None or server.ready_answer()

    def settle(self) -> None:
        """Wait for the commit in flight, if any (:meth:`append` with ``wait=False``).

        Raises:
            StoreError: the writer process did not commit it (:attr:`rows` stays the windows
                committed before; the window can be appended again).
        """
        if self._flight is None:
            return
        from . import _server

        commit, total, meta = self._flight
        token, self._token = self._token, None
        self._flight = None
        server = _server.Server._current
        try:
            error = server.answer(token) if server is not None else "probe's writer process is gone"
        except _server.Unavailable:
            # e.g. a statistic registered at run time: this writer writes here from now on
            self.isolate = False
            assert self._inflight_row is not None
            self._append_here(meta, self._inflight_row, total, commit)
            error = None
        finally:
            self._inflight_row = None
        if error is not None:
            self._forget()
            raise StoreError(error)
        self._remember(meta)  # what the writer process wrote once need not be written again
        self._acknowledge(commit, total)

    def _acknowledge(self, commit: int, total: WindowState) -> None:
        self.rows = commit  # committed: the marker's flush returned
        self.total = total
        _fault("closed", commit, self.path)

    def _open(self):
        try:
            return open_file(self._where, "r+", writer=True)
        except (OSError, ProbeError) as err:
            raise StoreError(f"cannot write out={self.path!r} ({str(err).splitlines()[0]}); expected a writable "
                             "file; check the disk and permissions (the windows stay in memory)") from err

    def _failed(self, err: BaseException) -> StoreError:
        return self._failed_at(self.path, err)

    @staticmethod
    def _failed_at(path: str, err: BaseException) -> StoreError:
        text = str(err).splitlines()[0] if str(err) else ""
        return StoreError(f"cannot write out={path!r} ({type(err).__name__}: {text}); expected a writable "
                          "file with free space; the file holds the windows committed before (the rest stay in "
                          "memory)")

    def _append_here(self, meta: dict[str, Any], row: WindowState, total: WindowState, commit: int) -> None:
        if self._broken is not None:
            raise StoreError(f"out={self.path!r} cannot take more windows in this process (an earlier write failed: "
                             f"{self._broken}); expected a file HDF5 can still write; the windows stay in memory")
        f = self._open()
        try:
            self._append(f, meta, row, total, commit)
        except BaseException as err:
            # HDF5 crashes on any later call on a file whose write failed, and an open of the same
            # path in this process would share that file: this process never touches it again
            _abandon(f)
            self._forget()
            self._broken = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            if not isinstance(err, Exception):
                raise
            raise self._failed(err) from err
        try:
            f.close()  # nothing is left to write
        except Exception:  # noqa: BLE001 - committed already; the handle only goes
            _abandon(f)

    def _send_apart(self, meta: dict[str, Any], row: WindowState, total: WindowState, commit: int) -> bool:
        """Hand the commit to probe's writer process (:mod:`._server`): a write that fails there
        breaks HDF5 in that process only, and this one never holds the file open. Returns
        ``False`` when no writer process can run here (the caller then writes it in this
        process); :meth:`settle` reads the outcome."""
        from . import _server

        server = _server.Server.get()
        if server is None:
            return False
        text, site_attrs = self._describe(meta)
        job = {"path": self._where, "id": list(self._id), "rows": self.rows, "fsync": self.fsync,
               "meta": json.loads(text),
               "known": [self._meta_json == text, [k for k, v in site_attrs.items() if self._site_attrs.get(k) == v]],
               "row": row, "total": total, "commit": commit, "specs": _registered(row, total)}
        token = object()
        try:
            server.send(token, job)
        except _server.Unavailable:
            self.isolate = False
            return False
        self._token, self._inflight_row = token, row
        return True

    def _same_file(self, ident: list | None) -> None:
        """In the writer process: refuse a file deleted or replaced since the host's writer
        created it (``ident``: its device and inode), before the commit and after it."""
        try:
            same = ident is None or list(_identity(self._where)) == list(ident)
        except OSError:
            same = False
        if not same:
            raise StoreError(f"out={self.path!r} was deleted or replaced by another file since the capture began; "
                             "expected the file probe created; the windows stay in memory")

    @classmethod
    def _shell(cls, job: dict) -> Writer:
        """In the writer process: a writer holding the host writer's state for one commit."""
        self = cls.__new__(cls)
        self.path = self._where = job["path"]
        self.rows = int(job["rows"])
        self.fsync = bool(job["fsync"])
        self.isolate = False
        self._broken = None
        text, site_attrs = self._describe(job["meta"])
        same_meta, same_sites = job["known"]
        self._meta_json = text if same_meta else None
        self._site_attrs = {k: site_attrs[k] for k in same_sites if k in site_attrs}
        return self

    @staticmethod
    def _describe(meta: dict[str, Any]) -> tuple[str, dict[str, dict[str, str | int]]]:
        """The root ``meta`` attribute's text and each site group's attributes, by group path."""
        sites = meta["sites"]
        attrs: dict[str, dict[str, str | int]] = {}
        for i, info in enumerate(sites):
            a: dict[str, str | int] = {key: str(info.get(key, "")) for key in SITE_ATTRS}
            a["hf_index"] = -1 if info.get("hf_index") is None else int(info["hf_index"])
            attrs[f"/{SITES}/{site_key(i, len(sites))}"] = a
        return json.dumps(_jsonable(meta)), attrs

    def _remember(self, meta: dict[str, Any]) -> None:
        """The file holds ``meta``'s description (a child committed it)."""
        self._meta_json, self._site_attrs = self._describe(meta)

    def _append(self, f, meta: dict[str, Any], row: WindowState, total: WindowState, commit: int) -> None:
        committed = int(f.attrs.get(COMMITTED, -1))
        if committed == commit and f[STEPS].shape[0] > self.rows and int(f[STEPS][self.rows]) == int(row.step):
            return  # an earlier try reached the commit point before its close failed: done
        if committed != self.rows:
            raise StoreError(f"out={self.path!r} commits {f.attrs.get(COMMITTED)} windows, this writer "
                             f"{self.rows}; expected its own file; another process changed it")
        # 1. rows: the window's records and its label, past the committed rows
        _fault("rows", commit, self.path, f)
        text, site_attrs = self._describe(meta)
        if text != self._meta_json:
            f.attrs["meta"] = text
            self._meta_json = text
        sites = f.require_group(SITES)
        samples = WindowSamples(f)
        for i, info in enumerate(meta["sites"]):
            g = sites.require_group(site_key(i, len(meta["sites"])))
            attrs = site_attrs[g.name]
            if self._site_attrs.get(g.name) != attrs:
                g.attrs.update(attrs)
                self._site_attrs[g.name] = attrs
            for kind, state in row.sites.get(info["name"], {}).items():
                self._window(g.require_group(kind), kind, state or {}, samples)
        if row.cross or CROSS in f:
            cg = f.require_group(CROSS)
            cg.attrs["sites"] = json.dumps(meta.get("cross_sites", []))
            self._window(cg, CROSS, row.cross, samples)
        steps = f[STEPS]
        steps.resize(self.rows + 1, axis=0)
        steps[self.rows] = int(row.step)
        _fault("rows", commit, self.path)
        f.flush()
        _fault("rows-flushed", commit, self.path)
        # 2. total: rewritten in place, each site with its digest
        _fault("total", commit, self.path, f)
        self._total(f, meta, total)
        _fault("total", commit, self.path)
        f.flush()
        if self.fsync:  # rows and /total on the disk before the marker can be
            _sync(f)
        _fault("total-flushed", commit, self.path)
        # 3. marker: the commit point
        _fault("marker", commit, self.path, f)
        f[TOTAL].attrs["rows"] = commit
        f.attrs[COMMITTED] = commit
        _fault("marker", commit, self.path)
        f.flush()
        if self.fsync:  # the commit on the disk before append returns
            _sync(f)

    def close(self) -> None:
        """Wait for the commit in flight, then release the file to other writers (its lock file
        goes).

        Raises:
            StoreError: the commit in flight failed (the file is released all the same).
        """
        try:
            self.settle()
        finally:
            self._lock.release()

    def abort(self) -> None:
        """Remove the file if no window was committed (nothing stays open between windows)."""
        try:
            self.settle()
        except StoreError:
            pass  # nothing more to keep: the capture failed to start
        if self.rows == 0 and os.path.exists(self._where):
            try:
                if _identity(self._where) == self._id:
                    os.remove(self._where)
            except OSError:
                pass
        self.close()

    # --------------------------------------------------------------------------- recovery
    def rescue(self, meta: dict[str, Any], rows: list[WindowState]) -> tuple[str, str]:
        """Write ``rows``, which this file could not take, to a recovery file: a copy of the
        committed file with ``rows`` appended, beside it or else in the temp folder, or (the file
        being gone or unreadable) a new file holding ``rows`` alone.

        Returns:
            The recovery file's path and a phrase saying what it holds.

        Raises:
            StoreError: no recovery file could be written anywhere (the message lists the tries).
        """
        stem = os.path.splitext(os.path.basename(self.path))[0]
        tried = []
        for folder in (os.path.dirname(self._where), tempfile.gettempdir()):
            target, n = os.path.join(folder, f"{stem}.recovered-{os.getpid()}.h5"), 1
            while os.path.exists(target):  # never replace an earlier recovery
                target, n = os.path.join(folder, f"{stem}.recovered-{os.getpid()}-{n}.h5"), n + 1
            for keep in (True, False):
                try:
                    if keep:
                        if self.rows == 0 or _identity(self._where) != self._id:
                            continue  # nothing committed, or the file is gone or another one
                        shutil.copyfile(self._where, target)
                        w = Writer._resume(target, self.rows, self.total, self.fsync, self.isolate)
                    else:
                        w = Writer(target, overwrite=True, fsync=self.fsync, isolate=self.isolate)
                    try:
                        for row in rows:
                            w.append(meta, row)
                    finally:
                        w.close()
                except (OSError, ProbeError) as err:
                    tried.append(f"{target}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
                    try:
                        os.remove(target)
                    except OSError:
                        pass
                    continue
                what = (f"all {self.rows + len(rows)} windows" if keep else
                        f"the last {len(rows)} window(s) only ({self.path!r} holds the first {self.rows})")
                return target, what
        raise StoreError(f"could not write {len(rows)} window(s) anywhere ({'; '.join(tried)}); expected a writable "
                         "folder; they are lost")

    @classmethod
    def _resume(cls, path: str, rows: int, total: WindowState | None, fsync: bool | None = None,
                isolate: bool | None = None) -> Writer:
        """A writer appending to ``path``, a copy of a run file that commits ``rows`` windows."""
        self = cls.__new__(cls)
        self.path = path
        #: the file's absolute path: every later open, here or in the writer process, is of this file
        self._where = os.path.abspath(path)
        self._settings(fsync, isolate)
        self._lock = Lock(self._where)
        self._id = _identity(path)
        self.rows = rows
        self.total = total
        self._broken = None
        self._unsent()
        self._forget()
        return self


def write_run(run, path: str, overwrite: bool = False) -> None:
    """Write a :class:`probe.results.run.Run` (all its windows, read one at a time) to ``path``."""
    w = Writer(path, overwrite)
    try:
        for row in run.rows:
            w.append(run.meta, row)
    finally:
        w.close()


def annotate(path: str, **entries: Any) -> None:
    """Add JSON entries to a closed run file's ``meta`` (e.g. decoded token texts)."""
    with open_file(path, "r+") as f:
        meta = json.loads(f.attrs.get("meta", "{}"))
        meta.update(_jsonable(entries))
        f.attrs["meta"] = json.dumps(meta)


def _registered(*rows: WindowState) -> list[dict[str, Any]]:
    """The declarations of the statistics in ``rows`` that were registered at run time (see
    :func:`probe.stats.register`), for the writer process, which knows the built-in ones only."""
    from ..stats._state import BUILTIN, SPECS, spec_json

    kinds = sorted({k for row in rows for states in row.sites.values() for k in states if k not in BUILTIN})
    return [spec_json(SPECS[k]) for k in kinds if k in SPECS]
