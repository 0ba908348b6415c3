"""File I/O that works where the appliance and the agent run: Linux and Windows.

Positional reads and writes use `os.preadv`/`os.pwrite`/`os.pread` where they exist; Windows
has none of them, so there a seek is followed by a plain read or write. That is only safe on a
descriptor no other thread moves at the same time, which holds for every caller here: each
opens its own descriptor or uses it from one thread (the journal's under its lock; the group
commit's fsync uses a descriptor of its own, opened read-only, and fsync moves no position).

Descriptors are opened in binary mode: on Windows `os.open` otherwise translates line ends,
which would corrupt disk blocks, journal records and keys. A directory's entries are made
durable with an fsync of the directory where the platform has it; NTFS journals its metadata
and cannot open a directory as a file, so on Windows that step is skipped.

POSIX lets a file be renamed or deleted while a descriptor of it is open; Windows refuses
(`os.open` does not ask for FILE_SHARE_DELETE), so code that renames a file another thread
may still hold open must take another path there (`RENAME_OPEN`)."""
from __future__ import annotations

import errno
import os
from pathlib import Path

# Module-level switches rather than checks at each call site, so tests can run the portable
# paths on Linux.
POSITIONAL = all(hasattr(os, name) for name in ("preadv", "pread", "pwrite"))
DIRECTORY_FSYNC = os.name != "nt"
BINARY = getattr(os, "O_BINARY", 0)
SPARSE = hasattr(os, "SEEK_DATA") and hasattr(os, "SEEK_HOLE")
RENAME_OPEN = os.name != "nt"


def open_fd(path: str | Path, flags: int, mode: int = 0o777) -> int:
    """`os.open` in binary mode."""
    return os.open(path, flags | BINARY, mode)


def read_into(fd: int, out: memoryview, offset: int) -> int:
    """Read up to len(out) bytes at `offset` into `out`; the count read (0 at end of file)."""
    if POSITIONAL:
        return os.preadv(fd, [out], offset)
    os.lseek(fd, offset, os.SEEK_SET)
    data = os.read(fd, len(out))
    out[:len(data)] = data
    return len(data)


def pread(fd: int, length: int, offset: int) -> bytes:
    """Up to `length` bytes at `offset`."""
    if POSITIONAL:
        return os.pread(fd, length, offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.read(fd, length)


def pwrite(fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
    """Write `data` at `offset`; the count written (may be short, as with os.write)."""
    if POSITIONAL:
        return os.pwrite(fd, data, offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.write(fd, data)


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of `data` at `offset`."""
    mv = memoryview(data)
    done = 0
    while done < len(mv):
        n = pwrite(fd, mv[done:], offset + done)
        if n <= 0:
            raise OSError(f"short write at offset {offset + done}: nothing written")
        done += n


def data_ranges(fd: int, end: int, start: int = 0) -> list[tuple[int, int]]:
    """The (start, end) ranges of bytes [start, end) of a file that hold data; holes (which
    read as zeros) are left out. Where the platform or file system cannot tell: all of it."""
    everything = [(start, end)] if end > start else []
    if not SPARSE:
        return everything
    ranges: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data from `pos` to the end of the file
                break
            return everything
        if data >= end:
            break
        pos = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        ranges.append((data, pos))
    return ranges


def fsync_dir(path: str | Path) -> None:
    """Make the directory's entries (files created, renamed, deleted) durable."""
    if not DIRECTORY_FSYNC:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: str | Path, data: bytes) -> None:
    """Replace `path` so that a failed write or a crash leaves the old file or the new one,
    never a truncated mix: write a temp file beside it, fsync, rename, fsync the folder."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = open_fd(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            pwrite_all(fd, data, 0)
            os.fsync(fd)  # else the rename may reach the disk before the data
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # else power loss can bring the old file back


def try_lock(fd: int) -> bool:
    """Take an exclusive lock on the open file `fd` without waiting; False if another process
    holds it. The lock goes with the descriptor (closing it, or the process ending, frees it)."""
    try:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN, errno.EDEADLK):
            return False
        raise
    return True
