"""Recovery point retention, the bandwidth limit, and the digest map's change detection."""
from __future__ import annotations

import argparse
import time
import uuid

import pytest
from replication_appliance.agent.cli import parse_rate
from replication_appliance.agent.link import RateLimit
from replication_appliance.apply.applier import ApplyError
from replication_appliance.apply.recovery_points import prune, recovery_points
from replication_appliance.dataplane.digests import (
    BLOCK,
    CHUNK,
    ZERO_DIGEST,
    DigestMap,
    Run,
    changed_runs,
    chunk_digest,
    digest_blocks,
)
from replication_appliance.dataplane.segment import replica_name
from replication_appliance.dataplane.session import MachineRecord
from replication_appliance.storage import StorageUnavailable, open_store

HOUR_NS = 3600 * 10**9


def test_retention_prunes_old_points_on_every_disk_and_keeps_the_newest(tmp_path):
    store = open_store(str(tmp_path / "storage"))
    m = MachineRecord(uuid.uuid4(), "web01", (1 << 20, 1 << 20))
    for d in range(2):
        store.create_page_blob(replica_name(m.machine_id, d), 1 << 20)
    now = time.time_ns()
    for seq, age_h in ((10, 30), (20, 25), (30, 2), (40, 0)):
        for d in range(2):
            store.snapshot(replica_name(m.machine_id, d), {"marker_seq": str(seq), "marker_id": f"m{seq}",
                                                            "marker_time_ns": str(now - age_h * HOUR_NS)})
    gone = prune(store, m, 24 * 3600)
    assert [p.seq for p in gone] == [10, 20]
    assert [p.seq for p in recovery_points(store, m)] == [30, 40]
    assert all(len(store.list_snapshots(replica_name(m.machine_id, d))) == 2 for d in range(2))
    assert [p.seq for p in prune(store, m, 60)] == [30]  # even a tiny retention keeps the newest
    with pytest.raises(ApplyError, match="between 0 and 15 days"):
        prune(store, m, 16 * 24 * 3600)


def test_a_prune_interrupted_between_disks_is_finished_by_the_next(tmp_path):
    """Storage fails after the old point's snapshot of disk 0 went: its snapshot of disk 1 is
    no longer part of any point, and must still go with the next prune (not stay for ever)."""
    store = open_store(str(tmp_path / "storage"))
    m = MachineRecord(uuid.uuid4(), "web01", (1 << 20, 1 << 20))
    now = time.time_ns()
    for d in range(2):
        store.create_page_blob(replica_name(m.machine_id, d), 1 << 20)
        for seq, age_h in ((10, 30), (40, 0)):
            store.snapshot(replica_name(m.machine_id, d), {"marker_seq": str(seq), "marker_id": f"m{seq}",
                                                            "marker_time_ns": str(now - age_h * HOUR_NS)})
    real_delete = store.delete_snapshot

    def disk_1_unreachable(name, snapshot_id):
        if name == replica_name(m.machine_id, 1):
            raise StorageUnavailable("injected outage")
        real_delete(name, snapshot_id)

    store.delete_snapshot = disk_1_unreachable
    with pytest.raises(StorageUnavailable):
        prune(store, m, 24 * 3600)
    store.delete_snapshot = real_delete
    assert [p.seq for p in recovery_points(store, m)] == [40]  # 10 is not a point any more
    prune(store, m, 24 * 3600)
    assert [[s.metadata["marker_seq"] for s in store.list_snapshots(replica_name(m.machine_id, d))]
            for d in range(2)] == [["40"], ["40"]]


def test_a_point_missing_on_one_disk_is_not_a_recovery_point(tmp_path):
    store = open_store(str(tmp_path / "storage"))
    m = MachineRecord(uuid.uuid4(), "web01", (1 << 20, 1 << 20))
    for d in range(2):
        store.create_page_blob(replica_name(m.machine_id, d), 1 << 20)
    store.snapshot(replica_name(m.machine_id, 0), {"marker_seq": "5", "marker_id": "x", "marker_time_ns": "1"})
    assert recovery_points(store, m) == []


def test_rate_parsing_and_limit():
    assert parse_rate("100M") == 100 * 1024**2 and parse_rate("1.5k") == 1536 and parse_rate("2048") == 2048
    for bad in ("fast", "-5M", "0", "10T"):
        with pytest.raises(argparse.ArgumentTypeError, match="bytes per second"):
            parse_rate(bad)
    limit = RateLimit(4 * 1024**2)
    start = time.monotonic()
    for _ in range(12):
        limit.take(1024**2)
    assert time.monotonic() - start >= 1.9  # 12 MiB at 4 MiB/s, the first second's allowance aside


def test_changed_runs():
    a, b, z = b"a" * BLOCK, b"b" * BLOCK, bytes(BLOCK)
    old = digest_blocks(a + a + a + a + z)
    new = digest_blocks(a + b + b + a + a)
    assert changed_runs(old, new, max_blocks=256, skip_zero=False) == [Run(1, 2), Run(4, 1)]
    assert changed_runs(old, new, max_blocks=1, skip_zero=False) == [Run(1, 1), Run(2, 1), Run(4, 1)]
    assert changed_runs(b"", digest_blocks(z + a + z + z + b), max_blocks=256, skip_zero=True) == [Run(1, 1), Run(4, 1)]
    assert changed_runs(old, old, 256, skip_zero=False) == []


def test_digest_map_round_trip_and_mismatch(tmp_path):
    size = CHUNK + 10 * BLOCK + 512
    m = DigestMap(size)
    assert (m.blocks, m.chunk_count) == (1024 + 11, 2) and bytes(m.slice(0, 1)) == ZERO_DIGEST
    assert not m.chunk_matches(0, chunk_digest(bytes(CHUNK)))  # unknown until recorded
    tail = b"t" * (10 * BLOCK + 512)
    m.update(CHUNK, digest_blocks(tail), chunk_digest(tail))
    assert m.chunk_matches(CHUNK, chunk_digest(tail)) and bytes(m.slice(1024, 11)) == digest_blocks(tail)
    m.save(tmp_path / "d")
    loaded = DigestMap.load(tmp_path / "d", size)
    assert loaded.data == m.data and loaded.chunks == m.chunks and not loaded.dirty
    assert DigestMap.load(tmp_path / "d", 20 * BLOCK) is None  # another disk size: resync
    (tmp_path / "d").write_bytes(b"garbage")
    assert DigestMap.load(tmp_path / "d", size) is None
