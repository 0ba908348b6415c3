"""A local directory as storage, for a laptop: the same interface as Azure Blob.

Block blobs are files written atomically; page blobs are sparse files; snapshots are
sparse copies. Metadata sits beside each in a `.meta.json` file."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from datetime import UTC, datetime
from pathlib import Path

from ..common import fileio
from .base import (
    BlobInfo,
    BlobNotFound,
    PreconditionFailed,
    SnapshotInfo,
    StorageError,
    check_page_range,
)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/]*$")


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        (self.root / "pages").mkdir(parents=True, exist_ok=True)
        (self.root / "snapshots").mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def _path(self, area: str, name: str) -> Path:
        if not _NAME.match(name) or ".." in name.split("/") or name.endswith((".meta.json", ".tmp")):
            raise StorageError(f"blob name {name!r} is not allowed: letters, digits, . _ - and / only")
        return self.root / area / name

    @staticmethod
    def _meta_path(p: Path) -> Path:
        return p.with_name(p.name + ".meta.json")

    def _read_meta(self, p: Path) -> dict[str, str]:
        try:
            return json.loads(self._meta_path(p).read_text())
        except FileNotFoundError:
            return {}

    # block blobs
    def put_blob(self, name: str, data: bytes, metadata: dict[str, str]) -> None:
        p = self._path("blobs", name)
        _atomic_write(self._meta_path(p), json.dumps(metadata).encode())
        _atomic_write(p, bytes(data))

    def put_blob_if(self, name: str, data: bytes, metadata: dict[str, str], etag: str | None) -> str:
        with self._lock:  # one process writes a given blob conditionally (its process server)
            if self.blob_etag(name) != etag:
                raise PreconditionFailed(f"blob {name} changed since it was read")
            self.put_blob(name, data, metadata)
            new = self.blob_etag(name)
            assert new is not None
            return new

    def blob_etag(self, name: str) -> str | None:
        """A digest of the content and metadata: a file's time can repeat within a tick."""
        p = self._path("blobs", name)
        try:
            return hashlib.sha256(p.read_bytes() + b"\0" + self._meta_path(p).read_bytes()).hexdigest()[:32]
        except FileNotFoundError:
            return None

    def get_blob(self, name: str) -> tuple[bytes, dict[str, str]]:
        p = self._path("blobs", name)
        try:
            return p.read_bytes(), self._read_meta(p)
        except FileNotFoundError:
            raise BlobNotFound(f"blob {name} does not exist") from None

    def list_blobs(self, prefix: str) -> list[BlobInfo]:
        base = self.root / "blobs"
        out = []
        for p in base.rglob("*"):
            if not p.is_file() or p.name.endswith((".meta.json", ".tmp")):
                continue
            name = p.relative_to(base).as_posix()
            if name.startswith(prefix):
                out.append(BlobInfo(name, p.stat().st_size, self._read_meta(p)))
        return sorted(out, key=lambda b: b.name)

    def delete_blob(self, name: str) -> None:
        p = self._path("blobs", name)
        p.unlink(missing_ok=True)
        self._meta_path(p).unlink(missing_ok=True)

    # page blobs
    def create_page_blob(self, name: str, size: int) -> None:
        p = self._path("pages", name)
        if size <= 0 or size % 512:
            raise StorageError(f"page blob size {size} must be a positive multiple of 512")
        with self._lock:
            if p.exists():
                if p.stat().st_size != size:
                    raise StorageError(f"page blob {name} exists with size {p.stat().st_size}, not {size}")
                return
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(p, "wb") as f:
                f.truncate(size)
                os.fsync(f.fileno())

    def _page(self, name: str) -> Path:
        p = self._path("pages", name)
        if not p.exists():
            raise BlobNotFound(f"page blob {name} does not exist")
        return p

    def page_blob_size(self, name: str) -> int:
        return self._page(name).stat().st_size

    def write_pages(self, name: str, offset: int, data: bytes | memoryview) -> None:
        p = self._page(name)
        check_page_range(offset, len(data), p.stat().st_size)
        fd = fileio.open_fd(p, os.O_WRONLY)
        try:
            fileio.pwrite_all(fd, data, offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    def clear_pages(self, name: str, offset: int, length: int) -> None:
        p = self._page(name)
        size = p.stat().st_size
        check_page_range(offset, length, size)
        # The whole blob: an empty sparse file put in its place (where a file another process
        # holds open may be replaced: not on Windows, which writes the zeros instead).
        if offset == 0 and length == size and fileio.RENAME_OPEN:
            fresh = p.with_name(p.name + ".clearing")
            with open(fresh, "wb") as f:
                f.truncate(size)
                os.fsync(f.fileno())
            os.replace(fresh, p)  # at no moment is the blob shorter (a crash between truncates was)
            fileio.fsync_dir(p.parent)
            return
        fd = fileio.open_fd(p, os.O_WRONLY)
        try:
            fileio.pwrite_all(fd, bytes(length), offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    def resize_page_blob(self, name: str, size: int) -> None:
        p = self._page(name)
        if size <= 0 or size % 512:
            raise StorageError(f"page blob size {size} must be a positive multiple of 512")
        with open(p, "r+b") as f:
            f.truncate(size)
            os.fsync(f.fileno())

    def _source(self, name: str, snapshot: str | None) -> Path:
        if snapshot is None:
            return self._page(name)
        p = self._path("snapshots", name) / snapshot
        if not p.exists():
            raise BlobNotFound(f"snapshot {snapshot} of {name} does not exist")
        return p

    def read_pages(self, name: str, offset: int, length: int, snapshot: str | None = None) -> bytes:
        p = self._source(name, snapshot)
        with open(p, "rb") as f:
            return fileio.pread(f.fileno(), length, offset)

    def page_ranges(self, name: str, snapshot: str | None = None) -> list[tuple[int, int]]:
        p = self._source(name, snapshot)
        with open(p, "rb") as f:
            return fileio.data_ranges(f.fileno(), os.fstat(f.fileno()).st_size)

    def get_metadata(self, name: str) -> dict[str, str]:
        return self._read_meta(self._page(name))

    def set_metadata(self, name: str, metadata: dict[str, str]) -> None:
        _atomic_write(self._meta_path(self._page(name)), json.dumps(metadata).encode())

    def snapshot(self, name: str, metadata: dict[str, str]) -> str:
        src = self._page(name)
        with self._lock:
            snap_id = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            dest_dir = self._path("snapshots", name)
            dest_dir.mkdir(parents=True, exist_ok=True)
            while (dest_dir / snap_id).exists():  # same microsecond: keep ids unique and ordered
                snap_id = snap_id[:-1] + "0Z"
            tmp = dest_dir / (snap_id + ".tmp")
            _sparse_copy(src, tmp)
            _atomic_write(self._meta_path(dest_dir / snap_id), json.dumps(metadata).encode())
            os.replace(tmp, dest_dir / snap_id)
        return snap_id

    def list_snapshots(self, name: str) -> list[SnapshotInfo]:
        d = self._path("snapshots", name)
        if not d.is_dir():
            return []
        return [SnapshotInfo(p.name, self._read_meta(p), p.stat().st_size) for p in sorted(d.iterdir())
                if not p.name.endswith((".meta.json", ".tmp"))]

    def delete_snapshot(self, name: str, snapshot_id: str) -> None:
        p = self._path("snapshots", name) / snapshot_id
        p.unlink(missing_ok=True)
        self._meta_path(p).unlink(missing_ok=True)


def _sparse_copy(src: Path, dest: Path) -> None:
    with open(src, "rb") as fi, open(dest, "wb") as fo:
        size = os.fstat(fi.fileno()).st_size
        fo.truncate(size)
        for start, end in fileio.data_ranges(fi.fileno(), size):
            while start < end:
                n = min(end - start, 8 << 20)
                fileio.pwrite_all(fo.fileno(), fileio.pread(fi.fileno(), n, start), start)
                start += n
        fo.flush()
        os.fsync(fo.fileno())
    shutil.copymode(src, dest)
