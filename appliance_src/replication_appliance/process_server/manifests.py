"""Keeps each machine's manifest in storage current as segments upload (what it holds and why:
dataplane/manifest.py). Per machine, decisions are made one at a time and manifests are put
one at a time, each only over the version last read or written (its etag), so an older one
cannot land after a newer one, not even a put the service carries out after this side gave up
on it. No storage call is made while deciding: a storage outage makes each call hang for its
timeout, and the uploads of other segments must go on failing and retrying meanwhile, not
queue behind one."""
from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

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
from ..storage.base import BlobNotFound, BlobStore, PreconditionFailed

log = logging.getLogger(__name__)


@dataclass
class _Machine:
    current: Manifest | None  # None: nothing stored yet
    version: int = 0  # of `current`, counted up at each change
    stored_version: int = -1
    issued_through: int = -1  # the newest segment handed a manifest
    issued_seq: int = 0  # the newest sequence in a segment handed one
    etag: str | None = None  # of the manifest in storage as last read or written (None: none there)
    deciding: threading.Lock = field(default_factory=threading.Lock)
    putting: threading.Lock = field(default_factory=threading.Lock)


class Manifests:
    def __init__(self, store: BlobStore, machine: Callable[[uuid.UUID], MachineRecord]) -> None:
        self._store = store
        self._machine = machine
        self._lock = threading.Lock()  # guards _machines only
        self._machines: dict[uuid.UUID, _Machine] = {}

    def for_segment(self, machine: uuid.UUID, segno: int, last_seq: int) -> Manifest:
        """The manifest to upload segment `segno` (whose last sequence is `last_seq`) with; it,
        or a newer one, is in storage when this returns, so apply never meets a disk's logs
        without knowing where they start."""
        m = self._state(machine)
        stored_through: tuple[int, int] | None = None
        while True:
            with m.deciding:
                # The registration is read while deciding: a lookup older than another
                # thread's decision would look like a dropped disk.
                record = self._machine(machine)
                known = m.current
                added = known is not None and len(record.disk_sizes) > len(known.disk_sizes)
                if not added or stored_through is not None:
                    since = None
                    if added:
                        assert stored_through is not None and known is not None
                        since = (first_segment_after(m.issued_through, stored_through[0]),
                                 max(m.issued_seq, stored_through[1]))
                        log.info("machine %s: disks %d-%d start at segment %d (after sequence %d)", machine,
                                 len(known.disk_sizes), len(record.disk_sizes) - 1, *since)
                    manifest = next_manifest(known, record, since)
                    if manifest != known:
                        m.current, m.version = manifest, m.version + 1
                    m.issued_through = max(m.issued_through, segno)
                    m.issued_seq = max(m.issued_seq, last_seq)
                    break
            stored_through = stored_through_in(self._store, machine)  # only when a disk was added: rare
        self._store_current(machine, m)
        return manifest

    def forget(self, machine: uuid.UUID) -> None:
        with self._lock:
            self._machines.pop(machine, None)

    def _state(self, machine: uuid.UUID) -> _Machine:
        with self._lock:
            m = self._machines.get(machine)
        if m is None:
            etag = self._store.blob_etag(manifest_name(machine))  # no lock held: these may hang in an outage
            stored = self._stored_manifest(machine)  # (changed in between: the first put re-reads the etag)
            with self._lock:
                m = self._machines.setdefault(machine, _Machine(stored, stored_version=0 if stored else -1, etag=etag))
        return m

    def _store_current(self, machine: uuid.UUID, m: _Machine) -> None:
        if m.stored_version >= m.version:
            return
        with m.putting:
            with m.deciding:
                version, manifest = m.version, m.current
            if m.stored_version >= version:
                return  # another thread stored it (or a newer one) meanwhile
            assert manifest is not None
            name, data = manifest_name(machine), manifest_bytes(manifest)
            try:
                m.etag = self._store.put_blob_if(name, data, {}, m.etag)
            except PreconditionFailed:
                # Changed since: by a put of ours whose answer was lost, or that the service
                # carried out late, before this one (this process server is the machine's one
                # writer). This is the newest decision: it goes over that.
                etag = self._store.blob_etag(name)
                stored = self._stored_manifest(machine)
                if stored != manifest:
                    log.info("manifest of machine %s changed in storage since it was last written here (a put whose "
                             "answer was lost): writing the current one over it", machine)
                    etag = self._store.put_blob_if(name, data, {}, etag)
                m.etag = etag
            m.stored_version = version

    def _stored_manifest(self, machine: uuid.UUID) -> Manifest | None:
        try:
            return parse_manifest(self._store.get_blob(manifest_name(machine))[0])
        except BlobNotFound:
            return None


def stored_through_in(store: BlobStore, machine: uuid.UUID) -> tuple[int, int]:
    """The newest segment of `machine` uploaded before (by an earlier run, or another cache) and
    the newest sequence in those (-1, 0: none): from the logs of disk 0 (every segment has one;
    an empty segment's says -1, so the sequence is the most any says) and, as apply deletes
    logs, its applied position (read after the listing, so a log deleted meanwhile is counted
    there)."""
    newest, seq = -1, 0
    for blob in store.list_blobs(logs_prefix(machine, 0)):
        n = segno_of(blob.name)
        if n is not None:
            newest, seq = max(newest, n), max(seq, int(blob.metadata.get("last_seq", 0)))
    try:
        meta = store.get_metadata(replica_name(machine, 0))
    except BlobNotFound:
        meta = {}
    return max(newest, int(meta.get("applied_segno", -1))), max(seq, int(meta.get("applied_seq", 0)))
