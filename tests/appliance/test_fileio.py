"""Portable file I/O: the POSIX calls, and the seek-then-read/write paths Windows takes (run
here by switching the module's flags), give the same bytes (a whole replication cycle on the
portable paths is in dataplane/test_portable_io.py)."""
from __future__ import annotations

import os
import subprocess

import pytest
from replication_appliance.common import fileio
from replication_appliance.common.secrets import write_private_file

MiB = 1 << 20


@pytest.fixture(params=["posix", "portable"])
def mode(request, monkeypatch):
    if request.param == "portable":  # what Windows has: no pread/pwrite/preadv, no SEEK_DATA, no directory fsync
        monkeypatch.setattr(fileio, "POSITIONAL", False)
        monkeypatch.setattr(fileio, "SPARSE", False)
        monkeypatch.setattr(fileio, "DIRECTORY_FSYNC", False)
    return request.param


def test_positional_reads_and_writes(tmp_path, mode):
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)) * 64)  # 16 KiB
    fd = fileio.open_fd(path, os.O_RDWR)
    try:
        fileio.pwrite_all(fd, b"\r\nXY\n", 1000)  # line ends must come through untouched
        out = memoryview(bytearray(b"\xee" * 32))
        assert fileio.read_into(fd, out, 998) == 32
        assert bytes(out[:8]) == bytes([998 % 256, 999 % 256]) + b"\r\nXY\n" + bytes([1005 % 256])
        assert fileio.read_into(fd, out, 16 * 1024 - 4) == 4  # short at the end of the file
        assert fileio.read_into(fd, out, 16 * 1024) == 0
        assert fileio.pread(fd, 6, 999) == bytes([999 % 256]) + b"\r\nXY\n"
        # the position a positional call leaves behind does not matter to the next one
        os.lseek(fd, 5, os.SEEK_SET)
        assert fileio.pread(fd, 2, 1001) == b"\nX"
    finally:
        os.close(fd)
    write_private_file(tmp_path / "key", b"\n\r\n\x00" * 8)
    assert (tmp_path / "key").read_bytes() == b"\n\r\n\x00" * 8


def test_data_ranges(tmp_path, mode):
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write(b"d" * 4096)
    fd = fileio.open_fd(path, os.O_RDONLY)
    try:
        if mode == "posix":
            assert fileio.data_ranges(fd, 8 * MiB) == [(MiB, MiB + 4096)]
        else:  # the platform cannot tell holes from data: all of it is data
            assert fileio.data_ranges(fd, 8 * MiB) == [(0, 8 * MiB)]
        assert fileio.data_ranges(fd, 0) == []
    finally:
        os.close(fd)
    if mode == "posix":
        subprocess.run(["fallocate", "--punch-hole", "--offset", str(MiB), "--length", "4096", str(path)], check=True)
        fd = fileio.open_fd(path, os.O_RDONLY)
        try:
            assert fileio.data_ranges(fd, 8 * MiB) == []  # SEEK_DATA answers ENXIO: no data at all
        finally:
            os.close(fd)
