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
A disk resized starts its new size the same way, at a segment above every one handed a manifest
before: each disk's size history says which size every segment has, so a log is applied to a
replica of the size its records were checked against, and a recovery point keeps the size the
disk had then. Pure logic; the uploader does the I/O."""
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
    # per disk: (first segment, size) for each size it has had, oldest first; the last is its size now
    size_history: tuple[tuple[tuple[int, int], ...], ...] = ()

    def __post_init__(self) -> None:
        if not self.size_history:  # one size per disk, since its start: equal to the same history spelt out
            object.__setattr__(self, "size_history", tuple(self.sizes(d) for d in range(len(self.disk_sizes))))

    def since(self, disk: int) -> int:
        return self.since_segno[disk] if disk < len(self.since_segno) else 0

    def born_after(self, disk: int) -> int:
        """Markers up to this sequence were taken before the disk was there."""
        return self.since_seq[disk] if disk < len(self.since_seq) else 0

    def sizes(self, disk: int) -> tuple[tuple[int, int], ...]:
        if disk < len(self.size_history):
            return self.size_history[disk]
        return ((self.since(disk), self.disk_sizes[disk]),)

    def size_at(self, disk: int, segno: int) -> int:
        """The disk's size when segment `segno` was received (its logs' records fit it)."""
        history = self.sizes(disk)
        return next((size for first, size in reversed(history) if first <= segno), history[0][1])

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
                       "since_segno": list(m.since_segno), "since_seq": list(m.since_seq),
                       "size_history": [[list(e) for e in m.sizes(d)] for d in range(len(m.disk_sizes))]}).encode()


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
        # manifests written before disks could be resized: one size each, since its start
        history = tuple(tuple((int(first), int(size)) for first, size in h)
                        for h in d.get("size_history", [[[s, z]] for s, z in zip(since, sizes)]))
        if len(history) != len(sizes):
            raise ValueError(f"size history does not match its {len(sizes)} disk(s)")
        for disk, h in enumerate(history):
            firsts = [first for first, _ in h]
            if not h or h[-1][1] != sizes[disk] or firsts != sorted(set(firsts)) or firsts[0] < 0:
                raise ValueError(f"size history of disk {disk} is not ascending segments ending at its size")
        return Manifest(uuid.UUID(d["machine_id"]), str(d["hostname"]), sizes, since_segno=since, since_seq=since_seq,
                        size_history=history)
    except (ValueError, KeyError, TypeError) as e:
        raise ManifestError(f"machine manifest in storage is malformed: {e}") from None


def first_segment_after(issued_through: int, stored_through: int) -> int:
    """The first segment a disk added (or resized) now can have logs from (at its new size): above every segment already
    handed an older manifest here (`issued_through`) or uploaded with one before
    (`stored_through`: the newest log or applied position in storage)."""
    return max(issued_through + 1, stored_through + 1)


def next_manifest(known: Manifest | None, record: MachineRecord, since: tuple[int, int] | None) -> Manifest:
    """The manifest to upload a segment with, given the one known (None: nothing uploaded
    yet, so every disk starts at segment 0) and the machine's registration now. Kept disks
    keep their start; added ones start at `since` (segment, last sequence before it), and
    resized ones have their new size from that segment (`since` is required for either);
    dropped ones go."""
    if known is None:
        return Manifest.of(record)
    keep = min(len(known.disk_sizes), len(record.disk_sizes))
    added = len(record.disk_sizes) - keep
    if needs_start(known, record) and since is None:
        raise ValueError("disks were added or resized: the segment they start at is needed")
    segno, seq = since or (0, 0)
    history = []
    for disk in range(keep):
        h = known.sizes(disk)
        size = record.disk_sizes[disk]
        if size != h[-1][1]:  # a new size from `segno`, in place of one set there already
            h = tuple(e for e in h if e[0] < segno)
            h = h if h and h[-1][1] == size else h + ((segno, size),)
        history.append(h)
    history += [((segno, size),) for size in record.disk_sizes[keep:]]
    return Manifest(record.machine_id, record.hostname, tuple(record.disk_sizes),
                    since_segno=known.since_segno[:keep] + (segno,) * added,
                    since_seq=known.since_seq[:keep] + (seq,) * added, size_history=tuple(history))


def needs_start(known: Manifest | None, record: MachineRecord) -> bool:
    """Whether the registration added or resized disks since `known`: a segment to start
    them at is needed."""
    if known is None:
        return False
    keep = min(len(known.disk_sizes), len(record.disk_sizes))
    return len(record.disk_sizes) > keep or known.disk_sizes[:keep] != tuple(record.disk_sizes[:keep])
