"""Reproducible zip and tar.gz writers: same inputs, same bytes, whatever the machine or clock."""
from __future__ import annotations

import gzip
import io
import os
import subprocess
import tarfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..version import REPO_ROOT

ZIP_EPOCH = 315532800  # 1980-01-01, the earliest time a zip entry can carry
EXECUTABLE_SUFFIXES = (".sh",)


@dataclass(frozen=True)
class Entry:
    """One file of an archive: its name inside the archive and where its bytes come from."""

    name: str
    source: Path

    @property
    def mode(self) -> int:
        return 0o755 if self.name.endswith(EXECUTABLE_SUFFIXES) else 0o644


def source_date_epoch() -> int:
    """SOURCE_DATE_EPOCH if set, else the time of the last commit: the same for every build of a commit."""
    if os.environ.get("SOURCE_DATE_EPOCH"):
        return max(int(os.environ["SOURCE_DATE_EPOCH"]), ZIP_EPOCH)
    result = subprocess.run(["git", "-C", str(REPO_ROOT), "log", "-1", "--format=%ct"],
                            capture_output=True, text=True, check=False)
    stamp = result.stdout.strip()
    return max(int(stamp), ZIP_EPOCH) if result.returncode == 0 and stamp.isdigit() else ZIP_EPOCH


def write_zip(path: Path, entries: list[Entry], epoch: int) -> None:
    import time

    date_time = time.gmtime(epoch)[:6]
    with _partial(path) as tmp, zipfile.ZipFile(tmp, "w") as zf:
        for entry in sorted(entries, key=lambda e: e.name):
            info = zipfile.ZipInfo(entry.name, date_time=date_time)
            info.create_system = 3  # unix, so the mode below is honoured and fixed
            info.external_attr = (0o100000 | entry.mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, entry.source.read_bytes(), compresslevel=9)


def write_tar_gz(path: Path, entries: list[Entry], epoch: int) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in _parent_dirs(entries):
            tar.addfile(_tarinfo(directory, tarfile.DIRTYPE, 0o755, 0, epoch))
        for entry in sorted(entries, key=lambda e: e.name):
            data = entry.source.read_bytes()
            tar.addfile(_tarinfo(entry.name, tarfile.REGTYPE, entry.mode, len(data), epoch), io.BytesIO(data))
    with _partial(path) as tmp, tmp.open("wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=epoch, compresslevel=9) as gz:
        gz.write(buffer.getvalue())


@contextmanager
def _partial(path: Path) -> Iterator[Path]:
    """`<path>.part` to write; renamed to `path` on success, removed on any failure (Ctrl-C too),
    so a reader never finds half an archive."""
    tmp = path.with_name(path.name + ".part")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def _tarinfo(name: str, kind: bytes, mode: int, size: int, epoch: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.mtime = kind, mode, size, epoch
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _parent_dirs(entries: list[Entry]) -> list[str]:
    dirs = {str(parent) for e in entries for parent in Path(e.name).parents if str(parent) != "."}
    return sorted(dirs)
