"""A machine's manifest in cache storage (`machines/<machine>.json`): what the cloud side
(apply, export) knows of it with no database, namely its hostname, its disks' sizes and,
per disk, the first segment whose logs include it.

Disks can be added by registering again. A disk added while the machine replicates has no
logs in the segments uploaded before, so apply must start it at a later segment, and every
segment from there on must have a log for it, or apply would wait for ever. Segments are
uploaded concurrently and out of order, so the uploader picks that segment (`since`) above
every segment already uploaded, or being uploaded, without the disk (`first_segment_after`).
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

    def since(self, disk: int) -> int:
        return self.since_segno[disk] if disk < len(self.since_segno) else 0


def manifest_name(machine: uuid.UUID) -> str:
    return f"machines/{machine}.json"


def manifest_bytes(m: Manifest) -> bytes:
    return json.dumps({"machine_id": str(m.machine_id), "hostname": m.hostname, "disk_sizes": list(m.disk_sizes),
                       "since_segno": list(m.since_segno)}).encode()


def parse_manifest(data: bytes) -> Manifest:
    try:
        d = json.loads(data)
        sizes = tuple(int(s) for s in d["disk_sizes"])
        since = tuple(int(s) for s in d.get("since_segno", [0] * len(sizes)))  # written before disks could be added
        if len(since) != len(sizes) or min(since, default=0) < 0:
            raise ValueError(f"since_segno {list(since)} does not match {len(sizes)} disk(s)")
        return Manifest(uuid.UUID(d["machine_id"]), str(d["hostname"]), sizes, since_segno=since)
    except (ValueError, KeyError, TypeError) as e:
        raise ManifestError(f"machine manifest in storage is malformed: {e}") from None


def first_segment_after(segno: int, issued_through: int, stored_through: int) -> int:
    """The first segment a disk added now can have logs from: not below the segment being
    uploaded, and above every segment already handed an older manifest here
    (`issued_through`) or uploaded with one before (`stored_through`: the newest log or
    applied position in storage)."""
    return max(segno, issued_through + 1, stored_through + 1)


def next_manifest(known: Manifest | None, record: MachineRecord, since_new: int | None) -> Manifest:
    """The manifest to upload a segment with, given the one known (None: nothing uploaded
    yet, so every disk starts at segment 0) and the machine's registration now. Kept disks
    keep their first segment; added ones start at `since_new` (required then); dropped ones
    go (added again later, they start afresh)."""
    if known is None:
        since = (0,) * len(record.disk_sizes)
    else:
        kept = known.since_segno[:len(record.disk_sizes)]
        added = len(record.disk_sizes) - len(kept)
        if added and since_new is None:
            raise ValueError("disks were added: the segment they start at is needed")
        since = kept + (since_new,) * added
    return Manifest(record.machine_id, record.hostname, tuple(record.disk_sizes), since_segno=since)
