"""Per-disk data keys, wrapped by the appliance master key and kept in storage beside the logs
(`keys/<machine>/<disk>/<key id>`), so the apply side finds the key a blob names."""
from __future__ import annotations

import os
import threading
import uuid

from ..common.secrets import MasterKey
from .base import BlobNotFound, BlobStore, StorageError


def _purpose(machine: uuid.UUID, disk: int, key_id: str) -> str:
    return f"data-key:{machine}:{disk}:{key_id}"


class DataKeyring:
    def __init__(self, store: BlobStore, master: MasterKey) -> None:
        self._store = store
        self._master = master
        self._cache: dict[tuple[uuid.UUID, int, str], bytes] = {}
        self._current: dict[tuple[uuid.UUID, int], str] = {}
        self._lock = threading.Lock()

    def current(self, machine: uuid.UUID, disk: int) -> tuple[str, bytes]:
        """The disk's key for new blobs, created (and stored wrapped) on first use."""
        with self._lock:
            key_id = self._current.get((machine, disk))
            if key_id is None:
                existing = self._store.list_blobs(f"keys/{machine}/{disk}/")
                if existing:
                    key_id = existing[0].name.rsplit("/", 1)[1]
                else:
                    key_id = uuid.uuid4().hex
                    key = os.urandom(32)
                    self._store.put_blob(f"keys/{machine}/{disk}/{key_id}",
                                         self._master.seal(key, _purpose(machine, disk, key_id)), {"key_id": key_id})
                    self._cache[(machine, disk, key_id)] = key
                self._current[(machine, disk)] = key_id
        return key_id, self.key(machine, disk, key_id)

    def key(self, machine: uuid.UUID, disk: int, key_id: str) -> bytes:
        k = self._cache.get((machine, disk, key_id))
        if k is None:
            try:
                wrapped, _ = self._store.get_blob(f"keys/{machine}/{disk}/{key_id}")
            except BlobNotFound:
                raise StorageError(f"data key {key_id} of machine {machine} disk {disk} is missing from storage") from None
            k = self._master.open(wrapped, _purpose(machine, disk, key_id))
            self._cache[(machine, disk, key_id)] = k
        return k
