"""The storage interface both backends implement, and its errors."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ..common.errors import ApplianceError

PAGE = 512
MAX_PAGE_WRITE = 4 * 1024 * 1024  # Azure's limit for one Put Page


class StorageError(ApplianceError):
    """Storage refused a request (bad name, size, missing blob, wrong credentials)."""


class BlobNotFound(StorageError):
    pass


class PreconditionFailed(StorageError):
    """A conditional write found the blob changed since the etag given (or there already, when
    it was to be absent)."""


class StorageUnavailable(StorageError):
    """Storage cannot be reached now; the caller retries with backoff."""


@dataclass(frozen=True)
class BlobInfo:
    name: str
    size: int
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SnapshotInfo:
    snapshot_id: str
    metadata: dict[str, str]
    size: int  # bytes: the page blob's size when the snapshot was taken


class BlobStore(Protocol):
    # block blobs (cache logs, keys, small state)
    def put_blob(self, name: str, data: bytes, metadata: dict[str, str]) -> None: ...
    # Written only if the blob's etag is still `etag` (None: only if there is no such blob);
    # the new etag. A request carried out late cannot overwrite a newer write.
    def put_blob_if(self, name: str, data: bytes, metadata: dict[str, str], etag: str | None) -> str: ...
    def blob_etag(self, name: str) -> str | None: ...  # None: no such blob
    def get_blob(self, name: str) -> tuple[bytes, dict[str, str]]: ...
    def list_blobs(self, prefix: str) -> list[BlobInfo]: ...
    def delete_blob(self, name: str) -> None: ...

    # page blobs (replica disks) and their snapshots (recovery points)
    def create_page_blob(self, name: str, size: int) -> None: ...
    def resize_page_blob(self, name: str, size: int) -> None: ...  # snapshots keep their size
    def page_blob_size(self, name: str) -> int: ...
    def write_pages(self, name: str, offset: int, data: bytes | memoryview) -> None: ...
    def clear_pages(self, name: str, offset: int, length: int) -> None: ...
    def read_pages(self, name: str, offset: int, length: int, snapshot: str | None = None) -> bytes: ...
    def page_ranges(self, name: str, snapshot: str | None = None) -> list[tuple[int, int]]: ...
    def get_metadata(self, name: str) -> dict[str, str]: ...
    def set_metadata(self, name: str, metadata: dict[str, str]) -> None: ...
    def snapshot(self, name: str, metadata: dict[str, str]) -> str: ...
    def list_snapshots(self, name: str) -> list[SnapshotInfo]: ...
    def delete_snapshot(self, name: str, snapshot_id: str) -> None: ...


def check_page_range(offset: int, length: int, size: int | None = None) -> None:
    if offset % PAGE or length % PAGE or length <= 0:
        raise StorageError(f"page range {offset}+{length} must be positive multiples of {PAGE} bytes")
    if size is not None and offset + length > size:
        raise StorageError(f"page range {offset}+{length} runs past the page blob's end ({size} bytes)")
