"""A Windows physical drive (\\\\.\\PhysicalDriveN) as the agent's source disk.

No Windows here: DeviceIoControl is replaced by a ctypes callback with its signature (so the
call is marshalled as it would be on Windows), and the drive by a file named like the device.
The callback reports a size smaller than the file: the size must come from the ioctl, which
seeking to a disk device's end does not give."""
from __future__ import annotations

import ctypes
import os

import pytest
from replication_appliance.agent import windows_disk
from replication_appliance.agent.source import (
    DiskReader,
    SourceError,
    disk_size,
    source_path,
)
from replication_appliance.agent.state import DiskConfig
from replication_appliance.apply.applier import MachineApplier
from replication_appliance.apply.recovery_points import export_disk
from replication_appliance.common import fileio
from replication_appliance.common.secrets import MasterKey
from replication_appliance.storage import open_store
from replication_appliance.storage.keyring import DataKeyring

from .conftest import InProcessServer, make_machine, random_writes, replicator

MiB = 1 << 20
DRIVE = "\\\\.\\PhysicalDrive3"
HANDLE_BASE = 0x1000  # made-up Windows handles: descriptor + HANDLE_BASE

# BOOL DeviceIoControl(HANDLE, DWORD code, LPVOID in, DWORD in_size, LPVOID out, DWORD out_size,
#                      LPDWORD returned, LPOVERLAPPED)
PROTOTYPE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint32,
                             ctypes.c_void_p, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p)


class FakeKernel:
    """DeviceIoControl for disks whose sizes are given by inode; records each call."""

    def __init__(self, sizes: dict[int, int], error: int = 0, returned: int = 8) -> None:
        self.sizes, self.error, self.returned = sizes, error, returned
        self.calls: list[tuple[int, int, int]] = []
        self.function = PROTOTYPE(self._device_io_control)  # kept alive as long as the fake

    def _device_io_control(self, handle, code, inbuf, insize, outbuf, outsize, returned, overlapped) -> int:
        self.calls.append((handle, code, outsize))
        if self.error:
            return 0
        ctypes.c_int64.from_address(outbuf).value = self.sizes[os.fstat(handle - HANDLE_BASE).st_ino]
        returned[0] = self.returned
        return 1

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(windows_disk, "ENABLED", True)
        monkeypatch.setattr(windows_disk, "_kernel32", lambda: (self.function, lambda: self.error))
        monkeypatch.setattr(windows_disk, "_os_handle", lambda fd: fd + HANDLE_BASE)


def drive_file(directory, size: int, extra: int = MiB):
    """A file named like the device (a legal name on Linux), `extra` bytes longer than the
    size the fake ioctl will report."""
    path = directory / DRIVE
    path.write_bytes(os.urandom(size + extra))
    return path


@pytest.mark.parametrize("given, canonical", [
    ("\\\\.\\PhysicalDrive0", "\\\\.\\PhysicalDrive0"),
    ("\\\\?\\physicaldrive12", "\\\\.\\PhysicalDrive12"),
    ("  \\\\.\\PHYSICALDRIVE007 ", "\\\\.\\PhysicalDrive7"),
])
def test_physical_drive_paths_are_recognised_in_any_spelling(given, canonical):
    assert windows_disk.physical_drive(given) == canonical


@pytest.mark.parametrize("path", ["\\\\.\\C:", "C:\\disks\\d0.img", "/dev/sda", "\\\\.\\PhysicalDrive",
                                  "\\\\.\\PhysicalDrive1\\", "\\\\server\\share\\PhysicalDrive1", "\\\\.\\PhysicalDrive1234"])
def test_other_paths_are_not_physical_drives(path):
    assert windows_disk.physical_drive(path) is None


def test_the_size_comes_from_the_ioctl(tmp_path, monkeypatch):
    path = drive_file(tmp_path, 8 * MiB)
    kernel = FakeKernel({path.stat().st_ino: 8 * MiB})
    kernel.install(monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert source_path("\\\\?\\physicaldrive3") == DRIVE  # kept as a device, not made a folder by pathlib
    assert disk_size(DRIVE) == 8 * MiB  # not the file's 9 MiB
    [(handle, code, outsize)] = kernel.calls
    # CTL_CODE(FILE_DEVICE_DISK 7, function 0x17, METHOD_BUFFERED 0, FILE_READ_ACCESS 1), as winioctl.h builds it
    assert code == (7 << 16) | (1 << 14) | (0x17 << 2) | 0
    assert outsize == 8 and handle >= HANDLE_BASE


def test_ioctl_failures_name_the_disk_and_the_windows_error(tmp_path, monkeypatch):
    drive_file(tmp_path, MiB)
    monkeypatch.chdir(tmp_path)
    FakeKernel({}, error=21).install(monkeypatch)  # ERROR_NOT_READY
    with pytest.raises(SourceError, match=r"size of disk .*PhysicalDrive3 cannot be read: .*Windows error 21"):
        disk_size(DRIVE)
    FakeKernel({(tmp_path / DRIVE).stat().st_ino: MiB}, returned=4).install(monkeypatch)
    with pytest.raises(SourceError, match="returned 4 bytes, expected 8"):
        disk_size(DRIVE)


def test_a_missing_drive_says_where_to_find_the_numbers(tmp_path, monkeypatch):
    FakeKernel({}).install(monkeypatch)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError, match=r"PhysicalDrive9 does not exist: see Disk Management \(or Get-Disk\)"):
        disk_size("\\\\.\\PhysicalDrive9")


def test_a_drive_of_a_size_no_replica_can_hold_is_refused(tmp_path, monkeypatch):
    path = drive_file(tmp_path, MiB)
    FakeKernel({path.stat().st_ino: MiB + 100}).install(monkeypatch)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError, match="positive multiple of 512 bytes"):
        disk_size(DRIVE)


def test_replicating_a_physical_drive_on_the_windows_paths(tmp_path, pki, monkeypatch):
    """Initial replication and a delta from the drive, with Windows file I/O (seek + read, no
    holes): the replica equals the drive's first `size` bytes, not the longer file."""
    monkeypatch.setattr(fileio, "POSITIONAL", False)
    monkeypatch.setattr(fileio, "SPARSE", False)
    size = 12 * MiB
    m = make_machine(tmp_path, "windows01", [size], seed=11, ps_port=0)
    drive = tmp_path / DRIVE
    os.replace(m.images[0], drive)
    with open(drive, "ab") as f:
        f.write(os.urandom(MiB))  # beyond the disk's end: must never be read
    kernel = FakeKernel({drive.stat().st_ino: size})
    kernel.install(monkeypatch)
    monkeypatch.chdir(tmp_path)
    m.config.disks[0] = DiskConfig(source_path(DRIVE), size)
    m.state.save_config(m.config)
    with DiskReader(DRIVE, MiB) as reader:
        assert reader.size == size and reader.data_extents(0, MiB, 4096) == [(0, MiB)]

    store = open_store(str(tmp_path / "storage"))
    master = MasterKey(os.urandom(32))
    srv = InProcessServer(pki, tmp_path / "cache", [m.record], store, master, segment_max_age=0.2)
    try:
        applier = MachineApplier(store, DataKeyring(store, master), m.record)
        for cycle in range(2):
            if cycle:
                random_writes(drive, 30, seed=4)
                with open(drive, "r+b") as f:  # keep the writes inside the disk
                    f.truncate(size)
                    f.seek(size)
                    f.write(os.urandom(MiB))
            report = replicator(pki, m, srv.port).run_cycle()
            assert report.bytes_sent > 0 and report.bytes_skipped == 0
            applier.apply_until(report.marker_seq, 60)
            out = tmp_path / f"replica-{cycle}.img"
            export_disk(store, m.record, 0, out, None)
            with open(drive, "rb") as f:
                expected = f.read(size)
            assert out.stat().st_size == size and out.read_bytes() == expected
    finally:
        srv.stop()
    assert kernel.calls  # every size came from the ioctl
