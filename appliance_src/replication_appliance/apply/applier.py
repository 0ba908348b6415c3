"""Applies a machine's cache logs, in order, to its replica page blobs.

Per disk, blob `logs/<machine>/<disk>/<segno>` follows blob segno-1; each is authenticated
and decrypted with the disk's data key, decompressed, and its records written in sequence
order. The replica's own metadata records how far it has been applied (segment and
sequence), so a restarted apply carries on where it stopped and never applies a record
twice. Every MARKER becomes a snapshot of the replica: a recovery point. A log is deleted
once its position is recorded (cache storage is a staging area, not an archive); one left
behind by an interruption, or uploaded again by a process server restarted after it had been
applied, is deleted when apply starts, or within ten minutes running on; so are the logs of a
disk dropped from the machine."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from ..common.errors import ApplianceError
from ..dataplane.frames import Kind
from ..dataplane.manifest import Manifest, ManifestError, manifest_name, parse_manifest
from ..dataplane.segment import (
    FORMAT,
    FORMAT_V2,
    SegmentError,
    blob_name,
    iter_records,
    replica_name,
    segno_of,
    unseal,
)
from ..dataplane.session import MachineRecord, resolve_in
from ..storage.base import MAX_PAGE_WRITE, PAGE, BlobNotFound, BlobStore, StorageError
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


def machines_in(store: BlobStore) -> tuple[list[Manifest], list[str]]:
    """The machines' manifests in storage, and the names of those that cannot be read (one
    damaged manifest must not keep apply from every other machine)."""
    found, unreadable = [], []
    for b in store.list_blobs("machines/"):
        try:
            found.append(parse_manifest(store.get_blob(b.name)[0]))
        except ManifestError as e:
            log.warning("%s: %s", b.name, e)
            unreadable.append(b.name)
    return found, unreadable


def find_machine(store: BlobStore, id_or_hostname: str) -> Manifest:
    records, unreadable = machines_in(store)
    rec = resolve_in(records, id_or_hostname)
    if rec is None:
        known = ", ".join(f"{r.hostname} ({r.machine_id})" for r in records) or "none yet"
        damaged = f"; manifests that cannot be read (malformed JSON): {', '.join(unreadable)}" if unreadable else ""
        raise ApplyError(f"machine {id_or_hostname!r} has no replication data in storage (or the hostname is ambiguous); "
                         f"known machines: {known}{damaged}")
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
    """One replica disk. Its metadata: the applied position, and `since_segno`, the first
    segment with logs for the disk (a disk added later starts there). Its size follows the
    logs: each is applied to a replica of the size the disk had when its records were
    received (a disk resized takes its new size with the first log at that size), so every
    recovery point keeps the size of its time."""

    def __init__(self, store: BlobStore, keyring: DataKeyring, machine: Manifest, disk: int) -> None:
        self.store, self.keyring, self.machine, self.disk = store, keyring, machine, disk
        self.name = replica_name(machine.machine_id, disk)
        try:
            self.size = store.page_blob_size(self.name)
        except BlobNotFound:
            self.size = machine.disk_sizes[disk]
            store.create_page_blob(self.name, self.size)
        self.metadata = store.get_metadata(self.name)
        self._snapshotted = {s.metadata.get("marker_seq") for s in store.list_snapshots(self.name)}
        since = machine.since(disk)
        if int(self.metadata.get("since_segno", 0)) != since:
            self._start_at(since, machine.born_after(disk))
        self.position = AppliedPosition.of(self.metadata)

    def _resize(self, size: int, segno: int) -> None:
        """The disk was resized (the agent resyncs it) or replaced by one of another size."""
        log.info("%s disk %d: replica resized from %d to %d bytes at segment %d", self.machine.hostname, self.disk,
                 self.size, size, segno)
        self.store.resize_page_blob(self.name, size)
        self.size = size

    def _start_at(self, since: int, since_seq: int) -> None:
        """The disk's logs start at segment `since` (added after replication began, or
        dropped and registered again): apply goes on from there, never back (a log of it may
        have been applied already, and deleted). The replica keeps its content: it is what the
        agent's digest map for this disk describes, if it kept one; without one the agent
        sends the disk whole (a new disk) or resyncs it (a grown one)."""
        position = AppliedPosition.of(self.metadata)
        if position.segno < since - 1:
            position = AppliedPosition(since - 1, max(position.seq, since_seq))
        self.metadata = {**self.metadata, "since_segno": str(since), **position.as_metadata()}
        self.store.set_metadata(self.name, self.metadata)
        log.info("%s disk %d: logs start at segment %d", self.machine.hostname, self.disk, since)

    def _save(self, position: AppliedPosition) -> None:
        # Stored first: a position only this process knew of would let the sweep delete the
        # log storage still names as next, and an apply started again would wait for it for ever.
        metadata = {**self.metadata, **position.as_metadata()}
        self.store.set_metadata(self.name, metadata)
        self.position, self.metadata = position, metadata

    def apply_next(self) -> bool:
        """Apply the next log blob if it is in storage; False when there is none yet."""
        segno = self.position.segno + 1
        name = blob_name(self.machine.machine_id, self.disk, segno)
        try:
            blob, meta = self.store.get_blob(name)
        except BlobNotFound:
            return False
        key_id, blob_last_seq, disk_size = _log_metadata(name, meta)
        key = self.keyring.key(self.machine.machine_id, self.disk, key_id)
        plain = unseal(blob, key, name, key_id, blob_last_seq, disk_size)  # the metadata is authenticated with it
        records = list(iter_records(plain))
        end = max((r.header.offset + r.header.length for r in records if r.header.kind is Kind.DATA), default=0)
        if disk_size is None:
            # A log of an earlier version: the size now, or what its records need, but never
            # smaller (its records may predate a shrink; the first format 3 log brings that).
            disk_size = max(self.size, self.machine.disk_sizes[self.disk], -(-end // PAGE) * PAGE)
        elif end > disk_size:  # authenticated, so written this way by a process server: a bug there
            raise SegmentError(f"log blob {name} writes up to byte {end}, past the end of disk {self.disk} of "
                               f"{self.machine.hostname} ({disk_size} bytes) that it gives")
        if disk_size != self.size:
            self._resize(disk_size, segno)
        out = _Coalescer(self.store, self.name)
        last = self.position.seq
        for rec in records:
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
        _delete_log(self.store, name)
        return True

    def _recovery_point(self, seq: int, marker_id: str, time_ns: int) -> None:
        if str(seq) in self._snapshotted:
            return
        self.store.snapshot(self.name, {"marker_seq": str(seq), "marker_id": marker_id, "marker_time_ns": str(time_ns)})
        self._snapshotted.add(str(seq))


def _delete_log(store: BlobStore, name: str) -> None:
    try:
        store.delete_blob(name)
    except StorageError as e:  # applied and recorded (or of no disk): a later sweep deletes it
        log.warning("log %s not deleted (%s); it is deleted later", name, e)


def _missing_text(hostname: str, disk: int, segno: int) -> str:
    return (f"log {segno} of {hostname} disk {disk} is not in storage while later ones are, and apply cannot go "
            "past it: unless a process server still holds it, it was lost with the cache disk that received it "
            "(see 'Numbering against storage' in docs/replication.md).")


def _disk_and_segno(name: str) -> tuple[int, int] | None:
    """(disk, segment) of a log blob `logs/<machine>/<disk>/<segno>.log`; None: not a log."""
    parts = name.split("/")
    segno = segno_of(name)
    return (int(parts[2]), segno) if len(parts) == 4 and parts[2].isdigit() and segno is not None else None


def _log_metadata(name: str, meta: dict[str, str]) -> tuple[str, int, int | None]:
    """The key id, last sequence and disk size (None: a log of FORMAT_V2, without one) a log
    blob's metadata gives, checked for form (their truth is checked by decryption: all are in
    the associated data)."""
    fmt = meta.get("format")
    if fmt not in (FORMAT, FORMAT_V2):
        raise SegmentError(f"log blob {name} has format {fmt!r}; this appliance reads {FORMAT!r} and {FORMAT_V2!r}")
    try:
        size = int(meta["disk_size"]) if fmt == FORMAT else None
        if size is not None and (size <= 0 or size % PAGE):
            raise ValueError
        return meta["key_id"], int(meta["last_seq"]), size
    except (KeyError, ValueError):
        raise SegmentError(f"log blob {name} lacks a key_id, a numeric last_seq or (format {FORMAT}) a disk_size "
                           f"that is a positive multiple of {PAGE} in its metadata") from None


class MachineApplier:
    SWEEP_INTERVAL_S = 600.0  # how often, running on, logs no disk will apply are deleted

    def __init__(self, store: BlobStore, keyring: DataKeyring, machine: Manifest | MachineRecord) -> None:
        self.store, self.keyring, self.machine = store, keyring, Manifest.of(machine)
        self.disks = [DiskApplier(store, keyring, self.machine, d) for d in range(len(self.machine.disk_sizes))]
        self._missing: dict[int, int] = {}  # per disk, its next log if the last sweep found it missing
        self.sweep()  # logs an interruption left behind go when apply starts
        self._swept_at = time.monotonic()

    def applied_seq(self) -> int:
        return min(d.position.seq for d in self.disks)

    def follow_manifest(self) -> bool:
        """Take up what a registration changed since the manifest was read: disks added,
        replaced or dropped (a resize comes with the logs). Whether anything changed."""
        try:
            manifest = parse_manifest(self.store.get_blob(manifest_name(self.machine.machine_id))[0])
        except BlobNotFound:
            return False
        if manifest == self.machine:
            return False
        keep = 0  # disks whose replica goes on as it is (a resize comes with the logs)
        while keep < min(len(self.disks), len(manifest.disk_sizes)) and manifest.since(keep) == self.machine.since(keep):
            keep += 1
        self.disks = self.disks[:keep] + [DiskApplier(self.store, self.keyring, manifest, d)
                                          for d in range(keep, len(manifest.disk_sizes))]
        self.machine = manifest
        for d in self.disks:
            d.machine = manifest
        self._swept_at = -self.SWEEP_INTERVAL_S  # a disk's start moved: the logs below it go at once
        return True

    def sweep(self) -> int:
        """Delete the logs no disk will apply: below a disk's position (an interrupted delete,
        or uploaded again by a restarted process server), and every log of a disk the machine
        no longer has (dropped; registered again, it starts above them). Returns how many."""
        logs = self._listed_logs()
        # Read after the listing: a log is put after the manifest naming its disk, so a disk
        # listed here that this manifest lacks was dropped, not added unseen.
        try:
            count = len(parse_manifest(self.store.get_blob(manifest_name(self.machine.machine_id))[0]).disk_sizes)
        except BlobNotFound:  # none yet: no log of a disk this applier lacks either
            count = len(self.disks)
        gone = [name for name, (disk, segno) in logs
                if disk >= count or (disk < len(self.disks) and segno <= self.disks[disk].position.segno)]
        for name in gone:
            _delete_log(self.store, name)
        missing = self._next_missing(logs)
        for disk, segno in missing.items():
            if self._missing.get(disk) == segno:  # missing a whole sweep interval, the later ones there
                log.warning("%s", _missing_text(self.machine.hostname, disk, segno))
        self._missing = missing
        return len(gone)

    def _next_missing(self, logs: list[tuple[str, tuple[int, int]]]) -> dict[int, int]:
        """Per disk, its next log when that is not in storage while a later one is. Uploads
        finish out of order, so for a while that is normal; for long, the log was lost (with the
        cache that received it) and apply cannot go past it."""
        out = {}
        for d, disk in enumerate(self.disks):
            nxt = disk.position.segno + 1
            held = {segno for _, (dd, segno) in logs if dd == d}
            if nxt not in held and any(segno > nxt for segno in held):
                out[d] = nxt
        return out

    def missing_logs(self) -> list[str]:
        """What `_next_missing` finds in storage now, as sentences for an error message."""
        return [_missing_text(self.machine.hostname, d, segno)
                for d, segno in self._next_missing(self._listed_logs()).items()]

    def _listed_logs(self) -> list[tuple[str, tuple[int, int]]]:
        """(name, (disk, segment)) of every log of the machine in storage."""
        return [(b.name, pos) for b in self.store.list_blobs(f"logs/{self.machine.machine_id}/")
                if (pos := _disk_and_segno(b.name)) is not None]

    def apply_available(self) -> int:
        """Apply every log already in storage; returns how many blobs were applied."""
        count = 0
        self.follow_manifest()
        while True:
            if time.monotonic() - self._swept_at >= self.SWEEP_INTERVAL_S:
                self.sweep()
                self._swept_at = time.monotonic()
            before = count
            for d in self.disks:
                while d.apply_next():
                    count += 1
            # A log goes up after the manifest naming its disk: one read now names every disk of
            # the logs just applied. A disk added since the read above had logs put beside those
            # of the others: without this, applied_seq() would count the others' and not wait
            # for it (`apply_until` returning with the added disk's data not in its replica).
            if count == before or not self.follow_manifest():
                return count

    def apply_until(self, seq: int, timeout: float, poll: float = 0.5) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.apply_available()
            if self.applied_seq() >= seq:
                return
            if time.monotonic() > deadline:
                missing = " ".join(self.missing_logs())
                raise ApplyError(f"logs up to sequence {seq} of {self.machine.hostname} did not reach storage within "
                                 f"{timeout:.0f}s (applied up to {self.applied_seq()}): " + (missing or
                                 "check the process server's upload backlog and storage connectivity"))
            time.sleep(poll)
