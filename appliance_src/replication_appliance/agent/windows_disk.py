"""Windows physical disks as replication sources: `\\\\.\\PhysicalDriveN`.

Such a path is a device, not a file: `os.stat` tells nothing useful about it, `pathlib` turns
it into the root folder of a share (it appends a backslash), and seeking to its end does not
give its size. Its size comes from IOCTL_DISK_GET_LENGTH_INFO. Reads go through the ordinary
descriptor (`fileio`'s seek + read on Windows); the agent reads whole sectors at
sector-aligned offsets (4 MiB chunks from offset 0, the disk's size a whole number of
sectors), which is what a disk device requires.

Tests replace `_kernel32` (with a ctypes callback of DeviceIoControl's signature) and
`_os_handle`: there is no Windows here."""
from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Callable

# Module-level switch so tests can take the Windows path on Linux.
ENABLED = os.name == "nt"

_PHYSICAL_DRIVE = re.compile(r"^\\\\[.?]\\physicaldrive(\d{1,3})$", re.IGNORECASE)
# CTL_CODE(IOCTL_DISK_BASE=7, 0x0017, METHOD_BUFFERED, FILE_READ_ACCESS)
IOCTL_DISK_GET_LENGTH_INFO = 0x0007405C
# GET_LENGTH_INFORMATION is a single LARGE_INTEGER
_LENGTH_INFO_BYTES = 8

DeviceIoControl = Callable[..., int]


def physical_drive(path: str) -> str | None:
    """The canonical `\\\\.\\PhysicalDriveN` for a physical drive path (either prefix, any
    case), or None when `path` is not one."""
    m = _PHYSICAL_DRIVE.match(path.strip())
    return f"\\\\.\\PhysicalDrive{int(m.group(1))}" if m else None


def _kernel32() -> tuple[DeviceIoControl, Callable[[], int]]:
    from ctypes import wintypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    fn = kernel32.DeviceIoControl
    fn.argtypes = [wintypes.HANDLE, wintypes.DWORD, wintypes.LPVOID, wintypes.DWORD, wintypes.LPVOID,
                   wintypes.DWORD, ctypes.POINTER(wintypes.DWORD), wintypes.LPVOID]
    fn.restype = wintypes.BOOL
    return fn, ctypes.get_last_error  # type: ignore[attr-defined]


def _os_handle(fd: int) -> int:
    import msvcrt

    return msvcrt.get_osfhandle(fd)  # type: ignore[attr-defined]


def device_length(fd: int) -> int:
    """The size in bytes of the disk device open as `fd`."""
    device_io_control, last_error = _kernel32()
    length = ctypes.c_int64(0)
    returned = ctypes.c_uint32(0)
    ok = device_io_control(_os_handle(fd), IOCTL_DISK_GET_LENGTH_INFO, None, 0, ctypes.byref(length),
                           _LENGTH_INFO_BYTES, ctypes.byref(returned), None)
    if not ok:
        code = last_error()
        raise OSError(code, f"IOCTL_DISK_GET_LENGTH_INFO failed (Windows error {code})")
    if returned.value != _LENGTH_INFO_BYTES:
        raise OSError(0, f"IOCTL_DISK_GET_LENGTH_INFO returned {returned.value} bytes, expected {_LENGTH_INFO_BYTES}")
    return length.value
