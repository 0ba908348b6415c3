"""Which storage to use: a connection string (Azure Blob / Azurite) or a local directory."""
from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .base import BlobStore, StorageError

ENV_CONNECTION_STRING = "APPLIANCE_STORAGE_CONNECTION_STRING"
# Written sealed by `appliance init --storage*` (configuration server), opened with the master key.
SEALED_CONNECTION_FILE = "storage-connection.sealed"
SEALED_PURPOSE = "storage-connection-string"

# Connection string keys (case-insensitive, as the Azure SDK reads them).
CONNECTION_KEYS = ("DefaultEndpointsProtocol", "AccountName", "AccountKey", "BlobEndpoint", "EndpointSuffix",
                   "SharedAccessSignature")
AZURE = "azure"
DIRECTORY = "directory"


@dataclass(frozen=True)
class StorageSpec:
    """A storage setting judged without contacting anything. `value` may hold an account key:
    it is kept out of repr, and `shown` is what may be printed."""
    kind: str  # AZURE or DIRECTORY
    value: str = field(repr=False)
    shown: str  # "Azure Blob account NAME (ENDPOINT)" or the directory


def _connection_settings(text: str) -> dict[str, str]:
    """`Key=value;...` -> {canonical key: value}. Errors name keys, never values."""
    canonical = {k.lower(): k for k in CONNECTION_KEYS}
    settings: dict[str, str] = {}
    for n, part in enumerate((p.strip() for p in text.split(";")), start=1):
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise StorageError(f"storage connection string is malformed: part {n} is not Key=value "
                               "(value not shown)")
        name = canonical.get(key.strip().lower())
        if name is None:
            raise StorageError(f"storage connection string has an unknown key {key.strip()[:40]!r}: "
                               f"allowed are {', '.join(CONNECTION_KEYS)}")
        settings[name] = value.strip()
    return settings


def _judge_connection_string(text: str) -> StorageSpec:
    s = _connection_settings(text)
    has_key = bool(s.get("AccountName")) and bool(s.get("AccountKey"))
    if not has_key and not s.get("BlobEndpoint"):
        raise StorageError("storage connection string names no account: it needs AccountName= and AccountKey=, "
                           "or BlobEndpoint= (with SharedAccessSignature=) (value not shown)")
    if "AccountKey" in s:
        try:
            base64.b64decode(s["AccountKey"], validate=True)
        except (binascii.Error, ValueError):
            raise StorageError("storage connection string's AccountKey is not base64 (value not shown)") from None
    if s.get("DefaultEndpointsProtocol", "https").lower() not in ("http", "https"):
        raise StorageError("storage connection string's DefaultEndpointsProtocol must be https or http")
    endpoint = s.get("BlobEndpoint")
    if endpoint is not None:
        url = urlsplit(endpoint)
        if url.scheme not in ("http", "https") or not url.hostname or url.query:
            raise StorageError("storage connection string's BlobEndpoint is not an http(s) URL without a query "
                               "(value not shown)")
        where = f"{url.scheme}://{url.hostname}{f':{url.port}' if url.port else ''}{url.path}"
    else:
        where = f"{s.get('DefaultEndpointsProtocol', 'https').lower()}://{s['AccountName']}.blob." \
                f"{s.get('EndpointSuffix', 'core.windows.net')}"
    account = s.get("AccountName") or (urlsplit(endpoint).hostname or "").split(".")[0]
    return StorageSpec(AZURE, text, f"Azure Blob account {account} ({where})")


def judge_storage_spec(text: str) -> StorageSpec:
    """An Azure connection string (it has `=`) or the path of a local storage directory."""
    text = text.strip()
    if not text:
        raise StorageError("storage setting is empty: give an Azure connection string or a local directory")
    if "=" in text:
        return _judge_connection_string(text)
    return StorageSpec(DIRECTORY, text, text)


def open_spec(spec: StorageSpec) -> BlobStore:
    if spec.kind == AZURE:
        from .azure_blob import AzureBlobStore

        return AzureBlobStore(spec.value)
    from .local import LocalStore

    return LocalStore(Path(spec.value))


def open_store(spec: str) -> BlobStore:
    """`spec` is an Azure connection string, or the path of a local storage directory."""
    return open_spec(judge_storage_spec(spec))


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
