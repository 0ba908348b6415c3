"""Reading a source disk: a block device or an image file, in large chunks."""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Self

from ..common import fileio
from ..common.errors import ApplianceError

SECTOR = 512


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
        fd = fileio.open_fd(path, os.O_RDONLY)
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
        self._fd = fileio.open_fd(self.path, os.O_RDONLY)
        self._buf = bytearray(chunk)
        # Holes are only asked about in image files: a block device is data throughout.
        self._sparse = fileio.SPARSE and stat.S_ISREG(os.fstat(self._fd).st_mode)
        self._zeros = memoryview(bytes(chunk))  # what a hole reads as (calloc'd: costs no memory until read)
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
            n = fileio.read_into(self._fd, mv[got:], offset + got)
            if n == 0:
                raise SourceError(f"disk {self.path} ended at {offset + got} bytes, expected {self.size}: did it shrink?")
            got += n
        return mv

    def data_extents(self, offset: int, length: int, align: int) -> list[tuple[int, int]]:
        """The parts of [offset, offset+length) that may hold data, widened to multiples of
        `align` from `offset` and merged; the rest is known to be holes of an image file (reads
        as zeros). Block devices, and file systems that do not track holes, are all data."""
        end = offset + length
        if not self._sparse:
            return [(offset, end)]
        extents: list[tuple[int, int]] = []
        for start, stop in fileio.data_ranges(self._fd, end, offset):
            lo = offset + (start - offset) // align * align
            hi = min(end, offset + -(-(stop - offset) // align) * align)
            if extents and lo <= extents[-1][1]:
                extents[-1] = (extents[-1][0], max(hi, extents[-1][1]))
            else:
                extents.append((lo, hi))
        return extents

    def read_extents_into(self, offset: int, out: memoryview, extents: list[tuple[int, int]]) -> memoryview:
        """Like `read_into`, but only `extents` (from `data_extents`) are read; the rest of `out`
        is filled with zeros, which is what those holes hold."""
        want = min(len(out), self.size - offset)
        pos = offset
        for lo, hi in extents:
            if lo > pos:
                out[pos - offset:lo - offset] = self._zeros[:lo - pos]
            self.read_into(lo, out[lo - offset:hi - offset])
            pos = hi
        if offset + want > pos:
            out[pos - offset:want] = self._zeros[:offset + want - pos]
        return out[:want]

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
