"""Clearing what a dead writer left: :func:`repair`.

A reader sees exactly the committed windows and proves or recomputes ``/total`` on its own
(``docs/format.md``, crash model). What HDF5 itself leaves is the version-3 superblock's "open
for write" flag: a killed writer never clears it, and HDF5 then refuses every open, read-only
included. :func:`clear_flag` clears it as ``h5clear -s`` does, without HDF5; :func:`probe.store.
schema.open_file` calls it when no live writer holds the file, and :func:`repair` is the same
for a file a reader may not write::

    from probe.store import repair
    repair("run.h5")   # 'cleared the open-for-write flag ...' / 'nothing to repair'

or, from the shell, ``probe repair run.h5`` (:mod:`probe.cli.repair`), which also reads every
record back to check it.
"""

from __future__ import annotations

import os

from ..errors import FileFormatError, ProbeError
from .lock import Lock, lock_path

__all__ = ["repair", "clear_flag", "lookup3"]

_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_M = 0xFFFFFFFF


def word_of(data: bytes, j: int) -> int:
    return int.from_bytes(data[j:j + 4], "little")


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle``, the checksum of HDF5's metadata (``H5_checksum_lookup3``)."""
    length = len(data)
    a = b = c = (0xDEADBEEF + length + initval) & _M
    i = 0

    while length > 12:
        a = (a + word_of(data, i)) & _M
        b = (b + word_of(data, i + 4)) & _M
        c = (c + word_of(data, i + 8)) & _M
        a = (a - c) & _M; a ^= _rot(c, 4); c = (c + b) & _M  # noqa: E702
        b = (b - a) & _M; b ^= _rot(a, 6); a = (a + c) & _M  # noqa: E702
        c = (c - b) & _M; c ^= _rot(b, 8); b = (b + a) & _M  # noqa: E702
        a = (a - c) & _M; a ^= _rot(c, 16); c = (c + b) & _M  # noqa: E702
        b = (b - a) & _M; b ^= _rot(a, 19); a = (a + c) & _M  # noqa: E702
        c = (c - b) & _M; c ^= _rot(b, 4); b = (b + a) & _M  # noqa: E702
        length -= 12
        i += 12
    if length == 0:
        return c
    tail = data[i:i + length] + bytes(12 - length)
    a = (a + word_of(tail, 0)) & _M
    b = (b + word_of(tail, 4)) & _M
    c = (c + word_of(tail, 8)) & _M
    c ^= b; c = (c - _rot(b, 14)) & _M  # noqa: E702
    a ^= c; a = (a - _rot(c, 11)) & _M  # noqa: E702
    b ^= a; b = (b - _rot(a, 25)) & _M  # noqa: E702
    c ^= b; c = (c - _rot(b, 16)) & _M  # noqa: E702
    a ^= c; a = (a - _rot(c, 4)) & _M  # noqa: E702
    b ^= a; b = (b - _rot(a, 14)) & _M  # noqa: E702
    c ^= b; c = (c - _rot(b, 24)) & _M  # noqa: E702
    return c


def clear_flag(path: str) -> bool:
    """Clear the "open for write" flag of ``path``'s version-3 superblock (``h5clear -s``),
    rewriting the superblock's lookup3 checksum; whether it was set. The caller knows no live
    writer has the file (:func:`probe.store.lock.held`).

    Raises:
        FileFormatError: not an HDF5 superblock probe can mend (no signature, odd offsets, a
            checksum that does not match).
        OSError: the file cannot be written.
    """
    with open(path, "r+b") as f:
        head = f.read(64)
        if head[:8] != _SIGNATURE or len(head) < 12:
            raise FileFormatError(f"{path!r} has no HDF5 superblock at its start; expected an HDF5 file; it "
                                  "cannot be repaired here")
        version, offsets = head[8], head[9]
        if version < 2 or head[11] == 0:
            return False  # versions 0 and 1 keep no such flag
        end = 12 + 4 * offsets
        if offsets not in (2, 4, 8) or len(head) < end + 4:
            raise FileFormatError(f"{path!r}: superblock with {offsets}-byte offsets; expected 2, 4 or 8; it "
                                  "cannot be repaired here")
        if int.from_bytes(head[end:end + 4], "little") != lookup3(head[:end]):
            raise FileFormatError(f"{path!r}: the superblock's checksum does not match; expected an intact "
                                  "superblock; the file is damaged beyond this repair")
        fixed = head[:11] + b"\x00" + head[12:end]
        f.seek(0)
        f.write(fixed + lookup3(fixed).to_bytes(4, "little"))
        f.flush()
        os.fsync(f.fileno())
    return True


def repair(path: str | os.PathLike) -> str:
    """Make a run file whose writer died open again without HDF5 tools: clear the superblock's
    "open for write" flag (HDF5's ``h5clear -s``) when no live process writes the file. Readers do
    this themselves when they can write the file; this is for the rest (and ``probe repair``).
    The windows and the cumulative state need no repair: a reader sees the committed windows and
    merges them when ``/total`` is not proven theirs.

    Args:
        path: the run file.

    Returns:
        What was done, one phrase: the flag cleared, a dead writer's lock file removed, or
        ``"nothing to repair"``.

    Raises:
        ProbeError: another live process writes the file, or it is not an HDF5 file probe can mend.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ProbeError(f"{path!r} is a folder; expected a run file written by probe; pass the .h5 file inside it")
    if not os.path.isfile(path):
        raise ProbeError(f"no such file: {path!r}; expected a run file; check the path")
    stale = os.path.exists(lock_path(path))
    lock = Lock(path)  # refuses while a live writer holds the file
    try:
        cleared = clear_flag(path)
    except OSError as err:
        raise ProbeError(f"cannot repair {path!r} ({err}); expected a file you can write; copy it somewhere "
                         "writable and repair the copy") from err
    finally:
        lock.release()  # a dead writer's lock file goes with it
    done = ["cleared the open-for-write flag left by a writer that died"] if cleared else []
    if stale:
        done.append("removed the lock file a dead writer left")
    return "; ".join(done) or "nothing to repair"
