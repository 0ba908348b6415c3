"""A machine's manifest in cache storage (`machines/<machine>.json`): what the cloud side
(apply, export) knows of it with no database: its hostname and, per disk, its size, the first
segment whose logs include it and the last sequence before that segment.

Disks can be added by registering again (or the last ones dropped, and later added again). A
disk added while the machine replicates has no logs in the segments uploaded before, so apply
must start it at a later segment, and every segment from there on must have a log for it, or
apply would wait for ever. Segments are uploaded concurrently and out of order, so the uploader
starts the disk above every segment already uploaded, or handed a manifest, without it: those
were read against a registration without the disk, so they hold nothing for it; every later
one is uploaded with the disk (`first_segment_after`). Recovery points up to `since_seq` were
taken before the disk was there and hold the other disks only. A disk is known by its index:
one replaced at its index is replicated by the agent as a change of that disk (its digest map
and the replica both describe the disk before; a map that no longer fits the size is a resync).
Pure logic; the uploader does the I/O."""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from ..common.errors import ApplianceError
from .session import MachineRecord


class ManifestError(ApplianceError):
    """A manifest in storage cannot be read."""


@dataclass(frozen=True)
class Manifest(MachineRecord):
    since_segno: tuple[int, ...] = ()  # per disk: the first segment with a log for it
    since_seq: tuple[int, ...] = ()  # per disk: the last sequence before that segment (0: from the start)

    def since(self, disk: int) -> int:
        return self.since_segno[disk] if disk < len(self.since_segno) else 0

    def born_after(self, disk: int) -> int:
        """Markers up to this sequence were taken before the disk was there."""
        return self.since_seq[disk] if disk < len(self.since_seq) else 0

    @classmethod
    def of(cls, record: MachineRecord) -> Manifest:
        """Every disk there from the start (a record with no history)."""
        if isinstance(record, Manifest):
            return record
        n = len(record.disk_sizes)
        return cls(record.machine_id, record.hostname, tuple(record.disk_sizes), since_segno=(0,) * n,
                   since_seq=(0,) * n)


def manifest_name(machine: uuid.UUID) -> str:
    return f"machines/{machine}.json"


def manifest_bytes(m: Manifest) -> bytes:
    return json.dumps({"machine_id": str(m.machine_id), "hostname": m.hostname, "disk_sizes": list(m.disk_sizes),
                       "since_segno": list(m.since_segno), "since_seq": list(m.since_seq)}).encode()


def parse_manifest(data: bytes) -> Manifest:
    try:
        d = json.loads(data)
        sizes = tuple(int(s) for s in d["disk_sizes"])
        zeros = [0] * len(sizes)  # manifests written before disks could be added
        since = tuple(int(s) for s in d.get("since_segno", zeros))
        since_seq = tuple(int(s) for s in d.get("since_seq", zeros))
        if len(since) != len(sizes) or len(since_seq) != len(sizes):
            raise ValueError(f"per-disk lists do not match its {len(sizes)} disk(s)")
        if min(since + since_seq, default=0) < 0:
            raise ValueError("negative segment or sequence")
        return Manifest(uuid.UUID(d["machine_id"]), str(d["hostname"]), sizes, since_segno=since, since_seq=since_seq)
    except (ValueError, KeyError, TypeError) as e:
        raise ManifestError(f"machine manifest in storage is malformed: {e}") from None


def first_segment_after(issued_through: int, stored_through: int) -> int:
    """The first segment a disk added now can have logs from: above every segment already
    handed an older manifest here (`issued_through`) or uploaded with one before
    (`stored_through`: the newest log or applied position in storage)."""
    return max(issued_through + 1, stored_through + 1)


def next_manifest(known: Manifest | None, record: MachineRecord, since: tuple[int, int] | None) -> Manifest:
    """The manifest to upload a segment with, given the one known (None: nothing uploaded
    yet, so every disk starts at segment 0) and the machine's registration now. Kept disks
    keep their start (their size may change: the replica is resized); added ones start at
    `since` (segment, last sequence before it; required then); dropped ones go."""
    if known is None:
        return Manifest.of(record)
    keep = min(len(known.disk_sizes), len(record.disk_sizes))
    added = len(record.disk_sizes) - keep
    if added and since is None:
        raise ValueError("disks were added: the segment they start at is needed")
    segno, seq = since or (0, 0)
    return Manifest(record.machine_id, record.hostname, tuple(record.disk_sizes),
                    since_segno=known.since_segno[:keep] + (segno,) * added,
                    since_seq=known.since_seq[:keep] + (seq,) * added)
