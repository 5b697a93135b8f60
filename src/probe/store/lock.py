"""One writer per run file: ``<path>.lock`` beside it, ``flock``-ed for the writer's life.

The kernel drops an ``flock`` when its process dies, so a lock file a killed writer left behind
is stale, never a refusal. The file holds ``pid <pid>@<host>`` for the messages. On filesystems
without ``flock`` (some NFS setups answer ``ENOLCK``/``EOPNOTSUPP``) the file's entry decides
instead: a live pid on this host, or any entry written on another host, refuses (a dead writer
on another host cannot be told from a live one: delete the lock file once that job is gone).
"""

from __future__ import annotations

import errno
import os
import socket

from ..errors import ProbeError

__all__ = ["Lock", "lock_path", "held", "orphaned"]


def lock_path(path: str) -> str:
    """The lock file of the run file ``path``."""
    return f"{path}.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lock:
    """The lock of the run file ``path``, taken at construction (module docstring).

    Raises:
        ProbeError: another live process holds it; the message names its ``pid@host``.
    """

    def __init__(self, path: str) -> None:
        self.path = lock_path(path)
        self._fd: int | None = None
        try:
            # held read-only: a file open for writing would keep its filesystem from a read-only remount
            fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError:
            return  # an unwritable folder: check_writable and the file's own open say so
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (ImportError, AttributeError):
            self._by_pid(fd, path)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise ProbeError(f"out={path!r} is being written by another process ({self._owner()}); expected "
                                 "one writer per file; choose another path, or wait for it to finish") from None
            self._by_pid(fd, path)  # no flock here (ENOLCK, EOPNOTSUPP): the pid decides
        self._fd = fd
        try:  # who holds it, for the messages (a full disk leaves it empty: the flock still holds)
            with open(self.path, "w", encoding="utf-8") as f:
                f.write(f"pid {os.getpid()}@{socket.gethostname()}\n")
        except OSError:
            pass

    def _owner(self) -> str:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                text = f.read(200).strip()
        except OSError:
            text = ""
        return text or "pid unknown"

    def _by_pid(self, fd: int, path: str) -> None:
        owner = self._owner()
        pid, _, host = owner.removeprefix("pid ").partition("@")
        if pid.isdigit() and int(pid) != os.getpid() and (host != socket.gethostname() or _alive(int(pid))):
            os.close(fd)
            raise ProbeError(f"out={path!r} is being written by another process ({owner}; this filesystem has no "
                             f"file locks, so probe trusts the lock file); expected one writer per file; choose "
                             f"another path, or delete {self.path!r} if that process is gone")

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None




def _holder(fd: int) -> bool | None:
    """Whether another process holds the ``flock`` of the open lock file ``fd``: ``True``,
    ``False`` (taken and released at once), or ``None`` where this filesystem has no ``flock``."""
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (ImportError, AttributeError):
        return None
    except OSError as err:
        return True if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else None
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def held(path: str) -> bool:
    """Whether a live writer (another open lock) holds the run file ``path``."""
    try:
        fd = os.open(lock_path(path), os.O_RDONLY)
    except OSError:
        return False  # no lock file: no probe writer
    try:
        return _holder(fd) is True  # no flock on this filesystem: nothing to tell by
    finally:
        os.close(fd)


def orphaned(path: str) -> str | None:
    """The ``pid <pid>@<host>`` of a writer that died with the run file ``path`` open, else None.

    A lock file that no process holds was left by a writer that never closed the file (killed,
    out of memory, its machine lost): the file keeps every window that writer committed, and
    ``probe repair`` clears what it left. None when there is no lock file, a live writer holds it,
    or this filesystem has no ``flock`` and the entry cannot be told dead (another host's pid)."""
    try:
        fd = os.open(lock_path(path), os.O_RDONLY)
    except OSError:
        return None
    try:
        with os.fdopen(os.dup(fd), encoding="utf-8", errors="replace") as f:
            owner = f.read(200).strip() or "pid unknown"
        holder = _holder(fd)
        if holder is None:  # no flock: the entry decides
            pid, _, host = owner.removeprefix("pid ").partition("@")
            dead = pid.isdigit() and host == socket.gethostname() and not _alive(int(pid))
            return owner if dead else None
        return None if holder else owner
    finally:
        os.close(fd)
