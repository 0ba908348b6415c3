"""Azure Blob storage (or Azurite): one container holds the cache logs (block blobs), data
keys, and replica disks (page blobs) with their snapshots (recovery points)."""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

from azure.core import MatchConditions
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import BlobServiceClient

from .base import (
    MAX_PAGE_WRITE,
    BlobInfo,
    BlobNotFound,
    PreconditionFailed,
    SnapshotInfo,
    StorageError,
    StorageUnavailable,
    check_page_range,
)

CONTAINER = "replication"
T = TypeVar("T")


def _mapped(fn: Callable[..., T]) -> Callable[..., T]:
    """Azure SDK errors -> the storage errors callers know; never echo the account key."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ResourceNotFoundError as e:
            raise BlobNotFound(f"{fn.__name__}: not found ({e.reason or 'no such blob'})") from None
        except ClientAuthenticationError:
            raise StorageError("storage refused the credentials: check the storage connection string") from None
        except (ServiceRequestError, ServiceResponseError) as e:
            raise StorageUnavailable(f"storage unreachable during {fn.__name__}: {type(e).__name__}") from None
        except HttpResponseError as e:
            if e.status_code is None or e.status_code >= 500 or e.status_code == 408:
                raise StorageUnavailable(f"storage busy during {fn.__name__}: HTTP {e.status_code}") from None
            raise StorageError(f"storage refused {fn.__name__}: HTTP {e.status_code} {e.reason}") from None

    return wrapper


class AzureBlobStore:
    def __init__(self, connection_string: str, container: str = CONTAINER) -> None:
        try:
            # Few SDK retries and short timeouts: our uploader retries with its own backoff, and
            # an outage must show up in health quickly rather than hang inside the SDK.
            self._service = BlobServiceClient.from_connection_string(
                connection_string, retry_total=1, retry_connect=1, retry_read=1, retry_backoff_factor=0.2,
                retry_backoff_max=2, connection_timeout=10, read_timeout=20,
                max_single_put_size=256 * 1024 * 1024, max_block_size=8 * 1024 * 1024)
        except ValueError:
            raise StorageError("the storage connection string is malformed: expected "
                               "'DefaultEndpointsProtocol=...;AccountName=...;AccountKey=...' (value not shown)") from None
        self._container = self._service.get_container_client(container)
        self._ensure_container()

    @_mapped
    def _ensure_container(self) -> None:
        try:
            self._container.create_container()
        except ResourceExistsError:
            pass

    def _blob(self, name: str, snapshot: str | None = None):
        return self._container.get_blob_client(name, snapshot=snapshot)

    @_mapped
    def put_blob(self, name: str, data: bytes, metadata: dict[str, str]) -> None:
        self._container.upload_blob(name, bytes(data), overwrite=True, metadata=metadata)

    @_mapped
    def put_blob_if(self, name: str, data: bytes, metadata: dict[str, str], etag: str | None) -> str:
        condition = ({"overwrite": False} if etag is None else
                     {"overwrite": True, "etag": etag, "match_condition": MatchConditions.IfNotModified})
        try:
            return self._blob(name).upload_blob(bytes(data), metadata=metadata, **condition)["etag"]
        except (ResourceModifiedError, ResourceExistsError):
            raise PreconditionFailed(f"blob {name} changed since it was read") from None

    @_mapped
    def blob_etag(self, name: str) -> str | None:
        try:
            return self._blob(name).get_blob_properties().etag
        except ResourceNotFoundError:
            return None

    @_mapped
    def get_blob(self, name: str) -> tuple[bytes, dict[str, str]]:
        d = self._blob(name).download_blob()
        return d.readall(), dict(d.properties.metadata or {})

    @_mapped
    def list_blobs(self, prefix: str) -> list[BlobInfo]:
        return [BlobInfo(b.name, b.size, dict(b.metadata or {}))
                for b in self._container.list_blobs(name_starts_with=prefix, include=["metadata"])]

    @_mapped
    def delete_blob(self, name: str) -> None:
        try:
            self._blob(name).delete_blob(delete_snapshots="include")
        except ResourceNotFoundError:
            pass

    @_mapped
    def create_page_blob(self, name: str, size: int) -> None:
        if size <= 0 or size % 512:
            raise StorageError(f"page blob size {size} must be a positive multiple of 512")
        b = self._blob(name)
        try:
            current = b.get_blob_properties().size
        except ResourceNotFoundError:
            b.create_page_blob(size)
            return
        if current != size:
            raise StorageError(f"page blob {name} exists with size {current}, not {size}")

    @_mapped
    def resize_page_blob(self, name: str, size: int) -> None:
        if size <= 0 or size % 512:
            raise StorageError(f"page blob size {size} must be a positive multiple of 512")
        self._blob(name).resize_blob(size)

    @_mapped
    def page_blob_size(self, name: str) -> int:
        return self._blob(name).get_blob_properties().size

    @_mapped
    def write_pages(self, name: str, offset: int, data: bytes | memoryview) -> None:
        check_page_range(offset, len(data))
        b = self._blob(name)
        mv = memoryview(data)
        for start in range(0, len(mv), MAX_PAGE_WRITE):
            chunk = mv[start:start + MAX_PAGE_WRITE]
            b.upload_page(bytes(chunk), offset=offset + start, length=len(chunk))

    @_mapped
    def clear_pages(self, name: str, offset: int, length: int) -> None:
        check_page_range(offset, length)
        self._blob(name).clear_page(offset=offset, length=length)

    @_mapped
    def read_pages(self, name: str, offset: int, length: int, snapshot: str | None = None) -> bytes:
        return self._blob(name, snapshot).download_blob(offset=offset, length=length).readall()

    @_mapped
    def page_ranges(self, name: str, snapshot: str | None = None) -> list[tuple[int, int]]:
        return [(r.start, r.end + 1) for r in self._blob(name, snapshot).list_page_ranges() if not r.cleared]

    @_mapped
    def get_metadata(self, name: str) -> dict[str, str]:
        return dict(self._blob(name).get_blob_properties().metadata or {})

    @_mapped
    def set_metadata(self, name: str, metadata: dict[str, str]) -> None:
        self._blob(name).set_blob_metadata(metadata)

    @_mapped
    def snapshot(self, name: str, metadata: dict[str, str]) -> str:
        return self._blob(name).create_snapshot(metadata=metadata)["snapshot"]

    @_mapped
    def list_snapshots(self, name: str) -> list[SnapshotInfo]:
        snaps = [SnapshotInfo(b.snapshot, dict(b.metadata or {}), b.size)
                 for b in self._container.list_blobs(name_starts_with=name, include=["snapshots", "metadata"])
                 if b.name == name and b.snapshot]
        return sorted(snaps, key=lambda s: s.snapshot_id)

    @_mapped
    def delete_snapshot(self, name: str, snapshot_id: str) -> None:
        try:
            self._blob(name, snapshot_id).delete_blob()
        except ResourceNotFoundError:
            pass
