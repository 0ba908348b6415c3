"""Reading a source disk, in large chunks: a block device or an image file, or on Windows a
physical drive (`\\\\.\\PhysicalDriveN`, see windows_disk.py).

Disk paths stay strings: `pathlib` would turn a Windows device path into a folder."""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Self

from ..common import fileio
from ..common.errors import ApplianceError
from . import windows_disk

SECTOR = 512


class SourceError(ApplianceError):
    """A source disk cannot be read or has a size the replica cannot hold."""


def _drive(path: str | Path) -> str | None:
    """The physical drive `path` names (canonical form) on Windows; None otherwise."""
    return windows_disk.physical_drive(str(path)) if windows_disk.ENABLED else None


def source_path(path: str | Path) -> str:
    """How a disk is named in the agent's configuration: a physical drive in its canonical
    form, anything else as an absolute path."""
    return _drive(path) or str(Path(path).absolute())


def _open_disk(path: str | Path) -> int:
    try:
        return fileio.open_fd(path, os.O_RDONLY)
    except PermissionError:
        raise SourceError(f"disk {path} is not readable by this account: run the agent as root/administrator") from None


def _drive_size(path: str) -> int:
    try:
        fd = _open_disk(path)
    except FileNotFoundError:
        raise SourceError(f"disk {path} does not exist: see Disk Management (or Get-Disk) for the numbers of this "
                          "server's disks") from None
    try:
        return windows_disk.device_length(fd)
    except OSError as e:
        raise SourceError(f"the size of disk {path} cannot be read: {e.strerror or e}") from None
    finally:
        os.close(fd)


def disk_size(path: str | Path) -> int:
    drive = _drive(path)
    size = _drive_size(drive) if drive else _file_size(path)
    if size <= 0 or size % SECTOR:
        raise SourceError(f"disk {path} is {size} bytes: a replicated disk must be a positive multiple of {SECTOR} bytes")
    return size


def _file_size(path: str | Path) -> int:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        hint = r"a physical drive (\\.\PhysicalDriveN)" if windows_disk.ENABLED else "a block device (/dev/sdX)"
        raise SourceError(f"disk {path} does not exist: give {hint} or an image file") from None
    if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise SourceError(f"disk {path} is neither a block device nor a regular image file")
    fd = _open_disk(path)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


class DiskReader:
    def __init__(self, path: str | Path, chunk: int) -> None:
        self.path = path
        self.size = disk_size(path)
        self._fd = _open_disk(path)
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
