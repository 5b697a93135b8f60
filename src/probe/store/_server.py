"""probe's writer process: where every commit is written, so the host process never holds an
HDF5 handle on a run file.

Why: once an HDF5 write fails (an I/O error the free-space check could not foresee), any later
flush or close of that file crashes the process (SIGSEGV), and HDF5 closes every open file at
interpreter exit. A commit written here that fails breaks HDF5 in this process only: it reports
the error and ends with ``os._exit`` (no HDF5 teardown), and the next commit starts a new one.

One writer process per host process, shared by its writers, started with the first
:class:`probe.store.Writer` (a fresh interpreter that imports numpy, h5py and :mod:`probe.store`,
never torch, so its start costs ~0.4 s once, overlapped with the host's forwards; no ``fork`` of
the host). It ignores SIGINT and SIGTERM (the host decides when to stop) and dies with the host
(Linux ``PR_SET_PDEATHSIG``), so a killed host leaves no writer behind. It holds no file open
between commits.

The pipe carries a job as a JSON header and raw array bytes (:func:`encode`): nothing is
unpickled, here as in the readers. Each job is one :meth:`probe.store.Writer._append` on a shell
writer holding the host writer's state; the answer is one JSON line.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

from ..stats._state import WindowState

__all__ = ["Server", "encode", "decode"]

_LEN = struct.Struct("<Q")


# ------------------------------------------------------------------------------ the wire format
def encode(obj: Any) -> tuple[bytes, list[memoryview]]:
    """A JSON header for ``obj`` (dicts, lists, scalars, numpy arrays, :class:`WindowState`) and
    the raw bytes of its arrays, in order; :func:`decode` inverts it exactly (dtype, shape, bytes)."""
    buffers: list[memoryview] = []

    def walk(x: Any) -> Any:
        if isinstance(x, WindowState):
            return {"__ws": [int(x.step), walk(x.sites), walk(x.cross)]}
        if isinstance(x, dict):
            return {"__d": [[str(k), walk(v)] for k, v in x.items()]}
        if isinstance(x, (list, tuple)):
            return [walk(v) for v in x]
        if isinstance(x, (np.ndarray, np.generic)):
            a = np.asarray(x)
            if not a.flags.c_contiguous:
                a = a.copy(order="C")
            if a.size >= 4096 and a.dtype.kind in "iu":  # bucket counts: mostly zeros, sent sparse
                flat = a.reshape(-1)
                where = np.flatnonzero(flat)
                if 4 * where.size < flat.size:
                    buffers.append(where.astype(np.int64).view(np.uint8).data)
                    buffers.append(np.ascontiguousarray(flat[where]).view(np.uint8).data)
                    return {"__s": [len(buffers) - 2, a.dtype.str, list(a.shape)]}
            buffers.append(a.reshape(-1).view(np.uint8).data if a.size else memoryview(b""))
            return {"__a": [len(buffers) - 1, a.dtype.str, list(a.shape), isinstance(x, np.generic)]}
        if isinstance(x, (str, int, float, bool)) or x is None:
            return x
        raise TypeError(f"cannot send a {type(x).__name__} to the writer process")

    return json.dumps(walk(obj)).encode(), buffers


def decode(header: bytes | bytearray, buffers: list) -> Any:
    """The object :func:`encode` described."""

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            if "__ws" in x:
                step, sites, cross = x["__ws"]
                return WindowState(int(step), walk(sites), walk(cross))
            if "__d" in x:
                return {k: walk(v) for k, v in x["__d"]}
            if "__s" in x:
                i, dtype, shape = x["__s"]
                a = np.zeros(shape, np.dtype(dtype))
                a.reshape(-1)[np.frombuffer(buffers[i], np.int64)] = np.frombuffer(buffers[i + 1], np.dtype(dtype))
                return a
            i, dtype, shape, scalar = x["__a"]
            a = np.frombuffer(buffers[i], dtype=np.dtype(dtype)).reshape(shape)
            if not a.flags.writeable:
                a = a.copy()
            return a[()] if scalar else a
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(json.loads(header))


def _send(stream, header: bytes, buffers: list) -> None:
    stream.write(_LEN.pack(len(header)) + _LEN.pack(len(buffers)))
    stream.write(header)
    for b in buffers:
        stream.write(_LEN.pack(len(b)))
        stream.write(b)
    stream.flush()


def _exactly(stream, n: int) -> bytearray:
    """``n`` bytes of ``stream``, in a writable buffer (arrays decoded from it need no copy)."""
    data = bytearray(n)
    view, got = memoryview(data), 0
    while got < n:
        k = stream.readinto(view[got:])
        if not k:
            raise EOFError
        got += k
    return data


def _widen(fd: int) -> None:
    """A 1 MiB pipe buffer (Linux ``F_SETPIPE_SZ``): a window crosses in a few writes, not hundreds."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except (OSError, ImportError, ValueError):
        pass


def _receive(stream) -> tuple[bytearray, list[bytearray]]:
    size, count = _LEN.unpack(_exactly(stream, 8))[0], _LEN.unpack(_exactly(stream, 8))[0]
    header = _exactly(stream, size)
    return header, [_exactly(stream, _LEN.unpack(_exactly(stream, 8))[0]) for _ in range(count)]


# ------------------------------------------------------------------------------ the host's side
class Server:
    """The host's handle on its writer process (one per host process: :meth:`get`)."""

    _current: Server | None = None
    _unavailable: str | None = None
    _exit_hook = False
    _guard = threading.Lock()

    def __init__(self) -> None:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.pid_of_host = os.getpid()
        self.proc = subprocess.Popen(
            [sys.executable, "-s", "-c", "from probe.store._server import main; main()", str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, close_fds=True)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                _widen(stream.fileno())
        self.ready = False
        self.lock = threading.Lock()
        #: the commit in flight: its sender's token and path; answers read early, by token id
        self._due: tuple[object, str] | None = None
        self._answers: dict[int, dict] = {}
        #: seconds the writer process spent on the last commit, from the decoded job to its answer
        self.last_s = 0.0
        if not Server._exit_hook:
            import atexit

            atexit.register(Server._at_exit)
            Server._exit_hook = True

    @classmethod
    def get(cls) -> Server | None:
        """This process's writer process, started if none runs; ``None`` where none can run
        (then commits are written in this process)."""
        with cls._guard:
            if cls._unavailable is not None:
                return None
            s = cls._current
            if s is None or s.pid_of_host != os.getpid() or s.proc.poll() is not None:
                if s is not None and s.pid_of_host == os.getpid():
                    s.retire()
                try:
                    s = cls._current = Server() if sys.executable else None
                except OSError as err:
                    s = cls._current = None
                    cls._unavailable = str(err)
                if s is None and cls._unavailable is None:
                    cls._unavailable = "no Python executable to start"
            return s

    def retire(self, wait: float = 5.0) -> None:
        """Close the pipes and wait for the process, which ends at the end of its input; after
        ``wait`` seconds (a forked child of the host may hold its input open) it is killed, which
        costs nothing between commits: it holds no file open then."""
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    @classmethod
    def _at_exit(cls) -> None:
        s = cls._current
        if s is not None and s.pid_of_host == os.getpid():
            cls._current = None
            got = s.lock.acquire(timeout=60)  # a commit still running on another thread ends first
            try:
                s.retire()
            finally:
                if got:
                    s.lock.release()

    def _wait_ready(self) -> bool:
        if not self.ready:
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()
            if line.strip() != b"ready":
                self.proc.wait()
                Server._unavailable = f"the writer process did not start (status {self.proc.returncode})"
                return False
            self.ready = True
        return True

    def send(self, token: object, job: dict) -> None:
        """Hand one commit to the writer process and return at once; :meth:`answer` with the same
        ``token`` waits for its outcome. Another commit's answer still due is read first and kept
        for its owner (one commit at a time in the writer process, in order).

        Raises:
            Unavailable: the writer process never started (the caller writes in this process).
        """
        with self.lock:
            if not self._wait_ready():
                raise Unavailable(Server._unavailable or "")
            if self._due is not None:
                self._answers[id(self._due[0])] = self._read(self._due[1])
                self._due = None
            header, buffers = encode(job)
            assert self.proc.stdin is not None
            try:
                _send(self.proc.stdin, header, buffers)
            except (BrokenPipeError, OSError):
                pass  # the process ended: its answer reads as empty
            self._due = (token, str(job["path"]))

    def answer(self, token: object) -> str | None:
        """The outcome of the commit :meth:`send` handed over under ``token``, waiting for it:
        ``None`` when it committed, else the error's one-line message.

        Raises:
            Unavailable: the writer process cannot write this job (the caller writes it here).
        """
        with self.lock:
            if id(token) in self._answers:
                reply = self._answers.pop(id(token))
            else:
                assert self._due is not None and self._due[0] is token, "no commit sent under this token"
                reply = self._read(self._due[1])
                self._due = None
        if "inline" in reply:
            raise Unavailable(str(reply["inline"]))
        return reply.get("error")

    def ready_answer(self) -> bool:
        """Whether the commit in flight has answered already (reading it costs no wait)."""
        import select

        with self.lock:
            if self._due is None or self.proc.stdout is None:
                return True
            try:
                return bool(select.select([self.proc.stdout], [], [], 0)[0])
            except (OSError, ValueError):
                return True

    def _read(self, path: str) -> dict:
        """The writer process's answer to the commit in flight (the lock held)."""
        assert self.proc.stdout is not None
        try:
            answer = self.proc.stdout.readline()
        except OSError:
            answer = b""
        if not answer:  # the process ended mid-commit
            code = self.proc.wait()
            from .writer import FAULT_EXIT

            if code == FAULT_EXIT:
                os._exit(FAULT_EXIT)  # a test's fault point ended it: end as the writer would have
            return {"error": f"cannot write out={path!r}: probe's writer process ended with status {code}; "
                             "expected a writable file; the file holds the windows committed before (the rest stay "
                             "in memory)"}
        reply = json.loads(answer)
        if reply.get("inline"):
            return {"inline": reply["inline"]}
        if reply.get("ok"):
            self.last_s = float(reply.get("s", 0.0))
            return {}
        self.proc.wait()  # it ends after a failed commit: its HDF5 may be broken
        return {"error": str(reply.get("error") or "the commit failed")}


class Unavailable(Exception):
    """No writer process can run here."""


# ------------------------------------------------------------------------------ the writer process
def _die_with(host: int) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:  # noqa: BLE001 - then EOF on stdin ends it
            pass
    if os.getppid() != host:
        os._exit(0)  # the host is gone already


def _unknown(job: dict) -> list[str]:
    """The statistics of ``job`` this process does not know, after adopting the declarations the
    host sent of those it registered at run time (``job["specs"]``)."""
    from ..stats._state import SPECS, spec_from_json

    for data in job.get("specs") or ():
        try:
            spec = spec_from_json(data)
        except (KeyError, TypeError, ValueError):
            continue  # not a declaration: the host writes this one itself
        SPECS.setdefault(spec.name, spec)

    kinds = {kind for row in (job["row"], job["total"]) for states in row.sites.values() for kind in states}
    return sorted(k for k in kinds if k not in SPECS)


def main() -> None:
    """The writer process's loop: a job in, a commit, one JSON line out; EOF ends it."""
    _die_with(int(sys.argv[1]))
    from .writer import StoreError, Writer

    inp, out = sys.stdin.buffer, sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    while True:
        try:
            message = _receive(inp)
        except EOFError:
            os._exit(0)
        start = time.perf_counter()
        job = decode(*message)
        unknown = _unknown(job)
        if unknown:  # registered in the host only: the host writes this one itself
            out.write(json.dumps({"ok": False, "inline": f"statistics unknown here: {unknown}"}).encode() + b"\n")
            out.flush()
            continue
        try:
            w = Writer._shell(job)
            w._same_file(job.get("id"))
            f = w._open()
            w._append(f, job["meta"], job["row"], job["total"], int(job["commit"]))
            f.close()
            w._same_file(job.get("id"))  # replaced while it was written: that window is not in the run's file
        except BaseException as err:  # noqa: BLE001 - every failure is the host's to report
            text = str(err) if isinstance(err, StoreError) else str(Writer._failed_at(job["path"], err))
            try:
                Writer._shell(job)._same_file(job.get("id"))
            except StoreError as gone:  # the cause: the file went (or was replaced) during the commit
                text = str(gone)
            except Exception:  # noqa: BLE001 - the first error stands
                pass
            out.write(json.dumps({"ok": False, "error": text[:4000]}).encode() + b"\n")
            out.flush()
            os._exit(1)  # HDF5 may be broken in this process now: never touch it again
        out.write(json.dumps({"ok": True, "s": time.perf_counter() - start}).encode() + b"\n")
        out.flush()
