"""Keeps each machine's manifest in storage current as segments upload (what it holds and why:
dataplane/manifest.py). Decisions are made one at a time under a lock, but no storage call is
made under it: a storage outage makes each call hang for its timeout, and the uploads of
other segments must go on failing and retrying meanwhile, not queue behind one."""
from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable

from ..dataplane.manifest import (
    Manifest,
    first_segment_after,
    manifest_bytes,
    manifest_name,
    next_manifest,
    parse_manifest,
)
from ..dataplane.segment import logs_prefix, replica_name, segno_of
from ..dataplane.session import MachineRecord
from ..storage.base import BlobNotFound, BlobStore

log = logging.getLogger(__name__)


class Manifests:
    def __init__(self, store: BlobStore, machine: Callable[[uuid.UUID], MachineRecord]) -> None:
        self._store = store
        self._machine = machine
        self._lock = threading.Lock()
        self._current: dict[uuid.UUID, Manifest | None] = {}  # None: nothing stored yet
        self._version: dict[uuid.UUID, int] = {}  # of _current, counted up at each change
        self._stored_version: dict[uuid.UUID, int] = {}
        self._issued_through: dict[uuid.UUID, int] = {}  # the newest segment handed a manifest

    def for_segment(self, machine: uuid.UUID, segno: int) -> Manifest:
        """The manifest to upload segment `segno` with; it (or a newer one) is in storage when
        this returns, so apply never meets a disk's logs without knowing where they start."""
        if machine not in self._current:
            stored = self._stored_manifest(machine)
            with self._lock:
                if machine not in self._current:
                    self._current[machine], self._version[machine] = stored, 0
                    if stored is not None:
                        self._stored_version[machine] = 0
        stored_through: int | None = None
        while True:
            with self._lock:
                # The registration is read under the lock too: a lookup older than another
                # thread's decision would look like a dropped disk.
                record = self._machine(machine)
                known = self._current[machine]
                added = known is not None and len(record.disk_sizes) > len(known.disk_sizes)
                if not added or stored_through is not None:
                    since_new = None
                    if added:
                        since_new = first_segment_after(segno, self._issued_through.get(machine, -1), stored_through)
                        log.info("machine %s has %d disk(s) now (%d before): the new ones' logs start at segment %d",
                                 machine, len(record.disk_sizes), len(known.disk_sizes), since_new)
                    manifest = next_manifest(known, record, since_new)
                    if manifest != known:
                        self._current[machine] = manifest
                        self._version[machine] += 1
                    self._issued_through[machine] = max(self._issued_through.get(machine, -1), segno)
                    break
            stored_through = self._stored_through(machine)  # only when a disk was added: rare
        self._store_current(machine)
        return manifest

    def _store_current(self, machine: uuid.UUID) -> None:
        while True:
            with self._lock:
                version, manifest = self._version[machine], self._current[machine]
                if self._stored_version.get(machine, -1) >= version:
                    return
            assert manifest is not None
            self._store.put_blob(manifest_name(machine), manifest_bytes(manifest), {})
            with self._lock:
                # a slower put of an older version may land after a newer one: put the newest again
                if self._version[machine] == version:
                    self._stored_version[machine] = version

    def _stored_manifest(self, machine: uuid.UUID) -> Manifest | None:
        try:
            return parse_manifest(self._store.get_blob(manifest_name(machine))[0])
        except BlobNotFound:
            return None

    def _stored_through(self, machine: uuid.UUID) -> int:
        """The newest segment uploaded before (by an earlier run, say): the newest log of
        disk 0 (every segment has one) or, as apply deletes logs, its applied position (read
        after the listing, so a log deleted meanwhile is counted there)."""
        segnos = (segno_of(b.name) for b in self._store.list_blobs(logs_prefix(machine, 0)))
        newest = max((n for n in segnos if n is not None), default=-1)
        try:
            applied = int(self._store.get_metadata(replica_name(machine, 0)).get("applied_segno", -1))
        except BlobNotFound:
            applied = -1
        return max(newest, applied)
