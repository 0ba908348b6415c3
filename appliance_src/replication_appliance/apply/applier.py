"""Applies a machine's cache logs, in order, to its replica page blobs.

Per disk, blob `logs/<machine>/<disk>/<segno>` follows blob segno-1; each is authenticated
and decrypted with the disk's data key, decompressed, and its records written in sequence
order. The replica's own metadata records how far it has been applied (segment and
sequence), so a restarted apply carries on where it stopped and never applies a record
twice. Every MARKER becomes a snapshot of the replica: a recovery point."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from ..common.errors import ApplianceError
from ..dataplane.frames import Kind
from ..dataplane.segment import (
    FORMAT,
    SegmentError,
    blob_name,
    iter_records,
    parse_manifest,
    replica_name,
    unseal,
)
from ..dataplane.session import MachineRecord, resolve_in
from ..storage.base import MAX_PAGE_WRITE, BlobNotFound, BlobStore
from ..storage.keyring import DataKeyring

log = logging.getLogger(__name__)


class ApplyError(ApplianceError):
    """Apply cannot proceed (unknown machine, logs missing or not arriving)."""


@dataclass(frozen=True)
class AppliedPosition:
    segno: int  # last segment applied completely (-1: none)
    seq: int  # last record applied

    @classmethod
    def of(cls, metadata: dict[str, str]) -> AppliedPosition:
        return cls(int(metadata.get("applied_segno", -1)), int(metadata.get("applied_seq", 0)))

    def as_metadata(self) -> dict[str, str]:
        return {"applied_segno": str(self.segno), "applied_seq": str(self.seq)}


def machines_in(store: BlobStore) -> list[MachineRecord]:
    return [parse_manifest(store.get_blob(b.name)[0]) for b in store.list_blobs("machines/")]


def find_machine(store: BlobStore, id_or_hostname: str) -> MachineRecord:
    records = machines_in(store)
    rec = resolve_in(records, id_or_hostname)
    if rec is None:
        known = ", ".join(f"{r.hostname} ({r.machine_id})" for r in records) or "none yet"
        raise ApplyError(f"machine {id_or_hostname!r} has no replication data in storage (or the hostname is ambiguous); "
                         f"known machines: {known}")
    return rec


def iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Coalescer:
    """Merges adjacent writes into Put Page calls of up to 4 MiB (zeros become Clear Page)."""

    def __init__(self, store: BlobStore, name: str) -> None:
        self.store, self.name = store, name
        self.start = -1
        self.parts: list[memoryview] = []
        self.size = 0

    def add(self, offset: int, data: memoryview) -> None:
        if self.parts and (offset != self.start + self.size or self.size + len(data) > MAX_PAGE_WRITE):
            self.flush()
        if not self.parts:
            self.start = offset
        self.parts.append(data)
        self.size += len(data)

    def flush(self) -> None:
        if not self.parts:
            return
        data = self.parts[0] if len(self.parts) == 1 else memoryview(b"".join(self.parts))
        if bytes(data) == bytes(len(data)):  # bytes compare is a memcmp; memoryview compare is not
            self.store.clear_pages(self.name, self.start, len(data))
        else:
            self.store.write_pages(self.name, self.start, data)
        self.parts, self.size = [], 0


class DiskApplier:
    def __init__(self, store: BlobStore, keyring: DataKeyring, machine: MachineRecord, disk: int) -> None:
        self.store, self.keyring, self.machine, self.disk = store, keyring, machine, disk
        self.name = replica_name(machine.machine_id, disk)
        store.create_page_blob(self.name, machine.disk_sizes[disk])
        self.metadata = store.get_metadata(self.name)
        self.position = AppliedPosition.of(self.metadata)
        self._snapshotted = {s.metadata.get("marker_seq") for s in store.list_snapshots(self.name)}

    def _save(self, position: AppliedPosition) -> None:
        self.position = position
        self.metadata = {**self.metadata, **position.as_metadata()}
        self.store.set_metadata(self.name, self.metadata)

    def apply_next(self) -> bool:
        """Apply the next log blob if it is in storage; False when there is none yet."""
        segno = self.position.segno + 1
        name = blob_name(self.machine.machine_id, self.disk, segno)
        try:
            blob, meta = self.store.get_blob(name)
        except BlobNotFound:
            return False
        key_id, blob_last_seq = _log_metadata(name, meta)
        key = self.keyring.key(self.machine.machine_id, self.disk, key_id)
        plain = unseal(blob, key, name, key_id, blob_last_seq)  # the metadata is authenticated with it
        out = _Coalescer(self.store, self.name)
        last = self.position.seq
        for rec in iter_records(plain):
            h = rec.header
            if h.seq <= self.position.seq:
                continue  # applied before a restart
            if h.kind is Kind.DATA:
                out.add(h.offset, rec.payload)
            elif h.kind is Kind.MARKER:
                out.flush()
                self._recovery_point(h.seq, bytes(rec.payload).decode("ascii", "replace"), h.offset)
                self._save(AppliedPosition(self.position.segno, h.seq))
            last = h.seq
        out.flush()
        # The segment's last sequence (it may end with another disk's data): applied means
        # "everything the process server received up to there is in this replica".
        self._save(AppliedPosition(segno, max(last, self.position.seq, blob_last_seq)))
        return True

    def _recovery_point(self, seq: int, marker_id: str, time_ns: int) -> None:
        if str(seq) in self._snapshotted:
            return
        self.store.snapshot(self.name, {"marker_seq": str(seq), "marker_id": marker_id, "marker_time_ns": str(time_ns)})
        self._snapshotted.add(str(seq))


def _log_metadata(name: str, meta: dict[str, str]) -> tuple[str, int]:
    """The key id and last sequence a log blob's metadata gives, checked for form (their
    truth is checked by decryption: both are in the associated data)."""
    if meta.get("format") != FORMAT:
        raise SegmentError(f"log blob {name} has format {meta.get('format')!r}; this appliance reads {FORMAT!r}")
    try:
        return meta["key_id"], int(meta["last_seq"])
    except (KeyError, ValueError):
        raise SegmentError(f"log blob {name} lacks a key_id or a numeric last_seq in its metadata") from None


class MachineApplier:
    def __init__(self, store: BlobStore, keyring: DataKeyring, machine: MachineRecord) -> None:
        self.machine = machine
        self.disks = [DiskApplier(store, keyring, machine, d) for d in range(len(machine.disk_sizes))]

    def applied_seq(self) -> int:
        return min(d.position.seq for d in self.disks)

    def apply_available(self) -> int:
        """Apply every log already in storage; returns how many blobs were applied."""
        count = 0
        for d in self.disks:
            while d.apply_next():
                count += 1
        return count

    def apply_until(self, seq: int, timeout: float, poll: float = 0.5) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.apply_available()
            if self.applied_seq() >= seq:
                return
            if time.monotonic() > deadline:
                raise ApplyError(f"logs up to sequence {seq} of {self.machine.hostname} did not reach storage within "
                                 f"{timeout:.0f}s (applied up to {self.applied_seq()}): check the process server's "
                                 "upload backlog and storage connectivity")
            time.sleep(poll)
