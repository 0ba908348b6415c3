"""Recovery points (a marker snapshotted on every disk of a machine), retention, export."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..common import fileio
from ..dataplane.manifest import Manifest
from ..dataplane.session import MachineRecord
from ..storage.base import BlobStore
from .applier import ApplyError, iso, replica_name

MAX_RETENTION_S = 15 * 24 * 3600
EXPORT_CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class RecoveryPoint:
    marker_id: str
    seq: int
    time_ns: int
    # one per disk, in disk order; None: the disk was added to the machine after this point
    snapshots: tuple[str | None, ...]
    sizes: tuple[int | None, ...]  # each disk's size at this point (None as above)

    @property
    def time_iso(self) -> str:
        return iso(self.time_ns)


def recovery_points(store: BlobStore, machine: MachineRecord) -> list[RecoveryPoint]:
    """Markers snapshotted on every disk of the machine that was there then: a disk added
    later (its manifest's `since_seq`) is not needed for markers before it. A marker a disk
    has not reached yet, or lost (an interrupted prune), is not a point."""
    manifest = Manifest.of(machine)
    per_disk = [{int(s.metadata["marker_seq"]): s for s in store.list_snapshots(replica_name(machine.machine_id, d))
                 if "marker_seq" in s.metadata} for d in range(len(machine.disk_sizes))]
    points = []
    for seq in sorted(set().union(*per_disk)):
        taken = [snaps.get(seq) for snaps in per_disk]
        if any(s is None and seq > manifest.born_after(d) for d, s in enumerate(taken)):
            continue
        first = next(s for s in taken if s is not None)
        points.append(RecoveryPoint(first.metadata.get("marker_id", ""), seq, int(first.metadata.get("marker_time_ns", 0)),
                                    tuple(s.snapshot_id if s else None for s in taken),
                                    tuple(s.size if s else None for s in taken)))
    return points


def prune(store: BlobStore, machine: MachineRecord, retention_s: float) -> list[RecoveryPoint]:
    """Delete recovery points older than `retention_s` before the newest; the newest stays."""
    if not 0 < retention_s <= MAX_RETENTION_S:
        raise ApplyError(f"retention of {retention_s / 3600:.1f} h is not allowed: between 0 and 15 days (360 h)")
    points = recovery_points(store, machine)
    if not points:
        return []
    newest = points[-1]
    cutoff = newest.time_ns - int(retention_s * 1e9)
    gone = [p for p in points[:-1] if p.time_ns < cutoff]
    # Disk by disk, not point by point: a prune interrupted between two disks leaves snapshots
    # of a marker that no longer is a point, which a point-by-point prune would never see again.
    for d in range(len(machine.disk_sizes)):
        name = replica_name(machine.machine_id, d)
        for snap in store.list_snapshots(name):
            meta = snap.metadata
            if ("marker_seq" in meta and int(meta["marker_seq"]) < newest.seq
                    and int(meta.get("marker_time_ns", 0)) < cutoff):
                store.delete_snapshot(name, snap.snapshot_id)
    return gone


def find_point(store: BlobStore, machine: MachineRecord, point_id: str) -> RecoveryPoint:
    points = recovery_points(store, machine)
    for p in points:
        if point_id in (p.marker_id, str(p.seq)):
            return p
    raise ApplyError(f"recovery point {point_id!r} not found for {machine.hostname}: "
                     f"{len(points)} exist (see `appliance recovery-points`)")


def _windows(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Few large reads instead of one per stored range: a replica written by many small
    writes has thousands of ranges, and each read costs a round trip."""
    out: list[tuple[int, int]] = []
    for start, end in ranges:
        while start < end:
            if out and start < out[-1][0] + EXPORT_CHUNK:
                w_start = out[-1][0]
                w_end = min(end, w_start + EXPORT_CHUNK)
                out[-1] = (w_start, max(out[-1][1], w_end))
            else:
                w_end = min(end, start + EXPORT_CHUNK)
                out.append((start, w_end))
            start = w_end
    return out


def export_disk(store: BlobStore, machine: MachineRecord, disk: int, out: Path,
                point: RecoveryPoint | None) -> tuple[int, int]:
    """Write the replica (or a recovery point) as a raw image of the disk's size then;
    unwritten pages stay holes. Returns that size and the bytes stored (written)."""
    if not 0 <= disk < len(machine.disk_sizes):
        raise ApplyError(f"disk {disk} does not exist on {machine.hostname}: disks 0..{len(machine.disk_sizes) - 1}")
    name = replica_name(machine.machine_id, disk)
    snapshot = point.snapshots[disk] if point else None
    if point and snapshot is None:
        raise ApplyError(f"disk {disk} of {machine.hostname} was added after recovery point {point.marker_id} "
                         f"(sequence {point.seq}): it has no state at that point")
    # the size of that state: a disk resized later is still the size it had then (and the
    # replica takes a new size with the first log at it)
    size = point.sizes[disk] if point else store.page_blob_size(name)
    assert size is not None
    tmp = out.with_name(out.name + ".part")
    written = 0
    try:
        with open(tmp, "wb") as f:
            f.truncate(size)
            for start, end in _windows(store.page_ranges(name, snapshot)):
                fileio.pwrite_all(f.fileno(), store.read_pages(name, start, end - start, snapshot), start)
                written += end - start
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)  # nothing partial left behind (a disk-sized sparse file)
        raise
    return size, written
