"""Which storage to use: a connection string (Azure Blob / Azurite) or a local directory."""
from __future__ import annotations

import os
from pathlib import Path

from .base import BlobStore, StorageError

ENV_CONNECTION_STRING = "APPLIANCE_STORAGE_CONNECTION_STRING"
# Written sealed by `appliance init --storage` (configuration server), opened with the master key.
SEALED_CONNECTION_FILE = "storage-connection.sealed"
SEALED_PURPOSE = "storage-connection-string"


def open_store(spec: str) -> BlobStore:
    """`spec` is an Azure connection string, or the path of a local storage directory."""
    if "AccountName=" in spec or "BlobEndpoint=" in spec or "DefaultEndpointsProtocol=" in spec:
        from .azure_blob import AzureBlobStore

        return AzureBlobStore(spec)
    if "=" in spec and ";" in spec:
        raise StorageError("storage connection string is malformed: it needs AccountName=, AccountKey= "
                           "and optionally BlobEndpoint= (value not shown)")
    from .local import LocalStore

    return LocalStore(Path(spec))


def store_for_data_dir(data_dir: Path) -> BlobStore:
    """The environment variable wins, then the sealed string from `appliance init --storage`
    (`DATA_DIR/private/storage-connection.sealed`), then `DATA_DIR/storage` as a local directory."""
    spec = os.environ.get(ENV_CONNECTION_STRING)
    if spec:
        return open_store(spec)
    from ..common.datadir import DataDir

    dd = DataDir(data_dir)
    sealed = dd.private / SEALED_CONNECTION_FILE
    if sealed.exists():
        return open_store(dd.master_key().load_secret(sealed, SEALED_PURPOSE))
    return open_store(str(dd.root / "storage"))
