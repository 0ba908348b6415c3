"""Reading a source disk: a block device or an image file, in large chunks."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Self

from ..common.errors import ApplianceError

SECTOR = 512
_SEEK_DATA = getattr(os, "SEEK_DATA", 0)


class SourceError(ApplianceError):
    """A source disk cannot be read or has a size the replica cannot hold."""


def disk_size(path: Path) -> int:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SourceError(f"disk {path} does not exist: give a block device (/dev/sdX) or an image file") from None
    if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise SourceError(f"disk {path} is neither a block device nor a regular image file")
    try:
        fd = os.open(path, os.O_RDONLY)
    except PermissionError:
        raise SourceError(f"disk {path} is not readable by this account: run the agent as root/administrator") from None
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    if size <= 0 or size % SECTOR:
        raise SourceError(f"disk {path} is {size} bytes: a replicated disk must be a positive multiple of {SECTOR} bytes")
    return size


class DiskReader:
    def __init__(self, path: Path, chunk: int) -> None:
        self.path = Path(path)
        self.size = disk_size(self.path)
        self._fd = os.open(self.path, os.O_RDONLY)
        self._buf = bytearray(chunk)
        try:  # the scan is sequential: let the kernel read ahead
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except (AttributeError, OSError):
            pass

    def read(self, offset: int) -> memoryview:
        """The chunk at `offset` (shorter at the end of the disk). Valid until the next read."""
        return self.read_into(offset, memoryview(self._buf))

    def read_into(self, offset: int, out: memoryview) -> memoryview:
        """Read from `offset` into `out` (len(out) bytes, fewer at the end of the disk); returns
        the part of `out` filled."""
        want = min(len(out), self.size - offset)
        mv = out[:want]
        got = 0
        while got < want:
            n = os.preadv(self._fd, [mv[got:]], offset + got)
            if n == 0:
                raise SourceError(f"disk {self.path} ended at {offset + got} bytes, expected {self.size}: did it shrink?")
            got += n
        return mv

    def is_hole(self, offset: int, length: int) -> bool:
        """Whether [offset, offset+length) is known to be a hole (reads as zeros) without reading
        it: an image file's unallocated range. Block devices, and file systems that do not
        track holes, say no."""
        if not _SEEK_DATA:
            return False
        try:
            return os.lseek(self._fd, offset, _SEEK_DATA) >= offset + length
        except OSError as e:  # ENXIO: no data at all from offset to the end of the file
            return e.errno == errno.ENXIO

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
