"""Cache storage and replica disks: Azure Blob (block blobs for logs, page blobs for replica
disks, snapshots for recovery points) or a local directory with the same interface."""
from .base import (
           BlobInfo,
           BlobNotFound,
           BlobStore,
           PreconditionFailed,
           SnapshotInfo,
           StorageError,
           StorageUnavailable,
)
from .open import open_store, store_for_data_dir

__all__ = ["BlobInfo", "BlobNotFound", "BlobStore", "PreconditionFailed", "SnapshotInfo", "StorageError", "StorageUnavailable",
           "open_store", "store_for_data_dir"]
