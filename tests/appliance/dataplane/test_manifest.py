"""A machine's manifest in storage, and disks added to a machine that already replicates: the
new disk's logs start at a segment above every one uploaded without it, so apply never
waits for a log that will not come."""
from __future__ import annotations

import dataclasses
import os
import threading
import uuid
from pathlib import Path

import pytest
from replication_appliance.apply.applier import AppliedPosition, ApplyError, MachineApplier, find_machine
from replication_appliance.apply.recovery_points import export_disk, recovery_points
from replication_appliance.common.secrets import MasterKey
from replication_appliance.dataplane import frames as F
from replication_appliance.dataplane.manifest import (
    Manifest,
    ManifestError,
    first_segment_after,
    manifest_bytes,
    manifest_name,
    next_manifest,
    parse_manifest,
)
from replication_appliance.dataplane.segment import FORMAT, blob_name, replica_name
from replication_appliance.dataplane.session import MachineRecord
from replication_appliance.process_server.journal import SealedSegment
from replication_appliance.process_server.manifests import Manifests
from replication_appliance.process_server.stats import Stats
from replication_appliance.process_server.uploader import Uploader
from replication_appliance.storage import PreconditionFailed, StorageUnavailable, open_store
from replication_appliance.storage.azure_blob import AzureBlobStore
from replication_appliance.storage.keyring import DataKeyring

from .conftest import InProcessServer, make_machine, random_writes, replicator, sha256, wait_uploaded

M = uuid.uuid4()
MiB = SIZE = 1 << 20
ONE, TWO = MachineRecord(M, "web01", (SIZE,)), MachineRecord(M, "web01", (SIZE, 2 * SIZE))


def test_kept_disks_keep_their_start_added_ones_start_where_told_dropped_ones_go():
    first = next_manifest(None, TWO, None)
    assert first.since_segno == (0, 0) == first.since_seq and first.disk_sizes == TWO.disk_sizes
    three = MachineRecord(M, "web02", (SIZE, 2 * SIZE, 3 * SIZE))
    grown = next_manifest(first, three, (7, 69))
    assert (grown.since_segno, grown.since_seq, grown.hostname) == ((0, 0, 7), (0, 0, 69), "web02")
    assert next_manifest(grown, ONE, None).since_segno == (0,)
    assert next_manifest(grown, three, None) == grown  # nothing changed: nothing to store
    resized = next_manifest(grown, MachineRecord(M, "web02", (SIZE, 4 * SIZE, 3 * SIZE)), None)
    assert resized.since_segno == grown.since_segno and resized.disk_sizes[1] == 4 * SIZE  # the same disk, grown
    with pytest.raises(ValueError, match="segment they start at"):
        next_manifest(first, three, None)


def test_an_added_disk_starts_above_every_segment_uploaded_without_it():
    assert first_segment_after(issued_through=-1, stored_through=-1) == 0
    assert first_segment_after(issued_through=9, stored_through=3) == 10  # 9 is in flight without the disk
    assert first_segment_after(issued_through=-1, stored_through=12) == 13  # an earlier run uploaded 12


def test_manifest_round_trip_and_malformed_ones():
    m = next_manifest(next_manifest(None, ONE, None), TWO, (4, 39))
    assert parse_manifest(manifest_bytes(m)) == m
    old = b'{"machine_id": "%s", "hostname": "h", "disk_sizes": [512, 1024]}' % str(M).encode()
    assert parse_manifest(old).since_segno == (0, 0) == parse_manifest(old).since_seq  # from before disks could be added
    for bad in (b"{", b'{"machine_id": "x", "hostname": "h", "disk_sizes": [1]}',
                b'{"machine_id": "%s", "hostname": "h", "disk_sizes": [1], "since_segno": [0, 1]}' % str(M).encode(),
                b'{"machine_id": "%s", "hostname": "h", "disk_sizes": [1], "since_seq": [-1]}' % str(M).encode()):
        with pytest.raises(ManifestError, match="malformed"):
            parse_manifest(bad)


def test_a_damaged_manifest_does_not_hide_the_other_machines(tmp_path):
    store = open_store(str(tmp_path / "storage"))
    store.put_blob(manifest_name(M), manifest_bytes(next_manifest(None, ONE, None)), {})
    store.put_blob("machines/damaged.json", b"v2", {})
    assert find_machine(store, "web01").machine_id == M
    with pytest.raises(ApplyError, match="known machines: web01 .*cannot be read .*machines/damaged.json"):
        find_machine(store, "db01")


def uploading(tmp_path: Path, record: MachineRecord):
    """Local storage, a keyring on it, the machine's registration (a dict a test changes) and
    an uploader that reads it."""
    store = open_store(str(tmp_path / "storage"))
    keyring = DataKeyring(store, MasterKey(os.urandom(32)))
    registered = {M: record}
    return store, keyring, registered, Uploader(store, keyring, registered.__getitem__, Stats())


def segment(tmp_path: Path, segno: int, disks: int) -> SealedSegment:
    """A sealed segment holding one DATA frame per disk and a marker."""
    frames = [F.Frame(F.Kind.DATA, M, disk=d, seq=10 * segno + d + 1, offset=segno * 4096,
                      payload=bytes([segno + 1]) * 4096) for d in range(disks)]
    frames.append(F.Frame(F.Kind.MARKER, M, seq=10 * segno + 9, offset=segno, payload=f"m{segno}".encode()))
    path = tmp_path / f"{segno:012d}.sealed"
    path.write_bytes(b"".join(F.encode(f) for f in frames))
    return SealedSegment(M, segno, path, path.stat().st_size)


def test_a_disk_added_while_segments_upload_out_of_order_is_applied_from_its_first_log(tmp_path):
    """Segment 12 went up with the one-disk manifest (an earlier run of the process server);
    segment 11, left in the cache, goes up after the registration added a disk. The disk must
    start at 13 (12 has no log for it), and apply takes it up from there."""
    store, keyring, registered, earlier = uploading(tmp_path, ONE)
    for segno in (10, 12):
        earlier._upload(segment(tmp_path, segno, disks=1))
    earlier.close()

    registered[M] = TWO
    now = Uploader(store, keyring, registered.__getitem__, Stats())
    for segno in (11, 13):
        now._upload(segment(tmp_path, segno, disks=1 if segno == 11 else 2))
    manifest = find_machine(store, "web01")
    assert manifest.since_segno == (0, 13) and manifest.disk_sizes == TWO.disk_sizes
    assert all(store.list_blobs(blob_name(M, 1, n)) for n in (11, 13)) and not store.list_blobs(blob_name(M, 1, 12))

    # apply: disk 0 from its first log (10 here: earlier ones were applied and deleted), disk 1 from 13
    store.create_page_blob(replica_name(M, 0), SIZE)
    store.set_metadata(replica_name(M, 0), {"applied_segno": "9", "applied_seq": "99"})
    applier = MachineApplier(store, keyring, manifest)
    assert applier.apply_available() == 5 and applier.applied_seq() == 139  # 10-13 on disk 0, 13 on disk 1
    assert store.read_pages(replica_name(M, 0), 10 * 4096, 4 * 4096) == b"".join(bytes([n + 1]) * 4096 for n in range(10, 14))
    assert store.read_pages(replica_name(M, 1), 13 * 4096, 4096) == bytes([14]) * 4096
    assert store.list_blobs(f"logs/{M}/") == []  # applied and deleted; disk 1's log 11, below its start, too


def test_a_disk_starts_right_after_the_last_segment_handed_a_manifest_without_it(tmp_path):
    """Segments 5 and 6 both hold the new disk's data and 6's upload decides first: the disk
    must start at 5 (segment 4 went up without it), or 5's data for it would never be applied."""
    store, keyring, registered, uploader = uploading(tmp_path, ONE)
    uploader._upload(segment(tmp_path, 4, disks=1))
    registered[M] = TWO
    for segno in (6, 5):
        uploader._upload(segment(tmp_path, segno, disks=2))
    manifest = find_machine(store, "web01")
    assert (manifest.since_segno, manifest.since_seq) == ((0, 5), (0, 49))
    store.create_page_blob(replica_name(M, 0), SIZE)
    store.set_metadata(replica_name(M, 0), {"applied_segno": "3", "applied_seq": "39"})
    applier = MachineApplier(store, keyring, manifest)
    assert applier.apply_available() == 5 and applier.applied_seq() == 69
    for segno in (5, 6):
        assert store.read_pages(replica_name(M, 1), segno * 4096, 4096) == bytes([segno + 1]) * 4096


def test_an_empty_newest_segment_does_not_hide_the_points_before_an_added_disk(tmp_path):
    """A crash's recovery seals and uploads empty segments (last sequence -1): the sequence
    before the new disk is the most any earlier log says, not the newest one's."""
    store, keyring, registered, earlier = uploading(tmp_path, ONE)
    earlier._upload(segment(tmp_path, 10, disks=1))
    empty = tmp_path / "000000000011.sealed"
    empty.write_bytes(b"")
    earlier._upload(SealedSegment(M, 11, empty, 0))
    registered[M] = TWO
    Uploader(store, keyring, registered.__getitem__, Stats())._upload(segment(tmp_path, 12, disks=2))
    manifest = find_machine(store, "web01")
    assert (manifest.since_segno, manifest.since_seq) == ((0, 12), (0, 109))


def test_a_slow_put_of_an_older_manifest_cannot_land_after_a_newer_one(tmp_path, monkeypatch):
    store = open_store(str(tmp_path / "storage"))
    registered = {M: ONE}
    manifests = Manifests(store, registered.__getitem__)
    real_put, in_put, release = store.put_blob_if, threading.Event(), threading.Event()

    def first_put_slow(name, data, metadata, etag):
        if not in_put.is_set():
            in_put.set()
            release.wait(10)
        return real_put(name, data, metadata, etag)

    monkeypatch.setattr(store, "put_blob_if", first_put_slow)
    older = threading.Thread(target=manifests.for_segment, args=(M, 0, 9))
    older.start()
    assert in_put.wait(10)  # the one-disk manifest's put hangs
    registered[M] = TWO
    newer = threading.Thread(target=manifests.for_segment, args=(M, 1, 19))
    newer.start()
    newer.join(0.5)
    release.set()
    older.join(10)
    newer.join(10)
    assert find_machine(store, "web01").disk_sizes == TWO.disk_sizes  # the newer one is what storage holds


@pytest.fixture(params=["local", "azurite"])
def any_store(request, tmp_path):
    if request.param == "azurite":  # a container of its own: the machine id is the module's
        return AzureBlobStore(request.getfixturevalue("azurite").connection_string, container=f"t{uuid.uuid4().hex}")
    return open_store(str(tmp_path / "storage"))


@pytest.mark.parametrize("lands", ["before the newer put", "after it"])
def test_a_manifest_put_whose_answer_was_lost_cannot_overwrite_a_newer_one(any_store, monkeypatch, lands):
    """The one-disk manifest's put times out on this side but reaches the service anyway:
    before the two-disk one is put (which then goes over it), or after (refused: it was
    made against the version before). Then a third, over the second."""
    store = any_store
    registered = {M: ONE}
    manifests = Manifests(store, registered.__getitem__)
    real_put, lost = store.put_blob_if, []

    def answer_lost(*request):
        lost.append(request)
        raise StorageUnavailable("storage unreachable during put_blob_if: ServiceResponseError")

    monkeypatch.setattr(store, "put_blob_if", answer_lost)
    with pytest.raises(StorageUnavailable):
        manifests.for_segment(M, 0, 9)
    monkeypatch.setattr(store, "put_blob_if", real_put)
    if lands == "before the newer put":
        real_put(*lost[0])
    registered[M] = TWO
    manifests.for_segment(M, 1, 19)
    if lands == "after it":
        with pytest.raises(PreconditionFailed):
            real_put(*lost[0])
    assert find_machine(store, "web01").disk_sizes == TWO.disk_sizes
    registered[M] = ONE
    manifests.for_segment(M, 2, 29)  # over the version it wrote (or read after the refusal)
    assert find_machine(store, "web01").disk_sizes == ONE.disk_sizes


def test_recovery_points_before_an_added_disk_hold_the_others_and_do_not_wait_for_it(tmp_path):
    """Disk 1 was there at marker 9, dropped, and registered again after sequence 40: points
    19 and 29 hold disk 0 alone, 9 holds both (the earlier disk's state), and 49 waits until
    the new disk 1 has applied it."""
    store = open_store(str(tmp_path / "storage"))
    manifest = Manifest(M, "web01", TWO.disk_sizes, since_segno=(0, 5), since_seq=(0, 40))
    for disk, seqs in ((0, (9, 19, 29, 49)), (1, (9,))):
        store.create_page_blob(replica_name(M, disk), manifest.disk_sizes[disk])
        for seq in seqs:
            store.snapshot(replica_name(M, disk), {"marker_seq": str(seq), "marker_id": f"m{seq}"})
    points = recovery_points(store, manifest)
    assert [(p.seq, [s is not None for s in p.snapshots]) for p in points] == [
        (9, [True, True]), (19, [True, False]), (29, [True, False])]
    store.snapshot(replica_name(M, 1), {"marker_seq": "49", "marker_id": "m49"})
    assert [p.seq for p in recovery_points(store, manifest)] == [9, 19, 29, 49]


def test_resized_disks_keep_their_replica_resized(tmp_path):
    """A disk grown (or replaced by a larger one at its index, which the agent resyncs): apply
    resizes the replica instead of stopping on the size, and keeps what it holds."""
    store, keyring, registered, uploader = uploading(tmp_path, TWO)
    uploader._upload(segment(tmp_path, 0, disks=2))
    applier = MachineApplier(store, keyring, find_machine(store, "web01"))
    assert applier.apply_available() == 2
    registered[M] = MachineRecord(M, "web01", (2 * SIZE, 3 * SIZE))
    uploader._upload(segment(tmp_path, 1, disks=2))
    assert applier.apply_available() == 2 and applier.applied_seq() == 19
    assert [store.page_blob_size(replica_name(M, d)) for d in (0, 1)] == [2 * SIZE, 3 * SIZE]
    for d in (0, 1):
        assert store.read_pages(replica_name(M, d), 0, 2 * 4096) == bytes([1]) * 4096 + bytes([2]) * 4096


def sealed(tmp_path: Path, segno: int, size: int, writes: list[tuple[int, int]]) -> SealedSegment:
    """Segment `segno` of one disk, received while it had `size` bytes: a DATA frame of a page
    of byte `segno + 1` at each (sequence, offset), then a marker at sequence 10 * segno + 9."""
    frames = [F.Frame(F.Kind.DATA, M, disk=0, seq=seq, offset=offset, payload=bytes([segno + 1]) * 4096)
              for seq, offset in writes]
    frames.append(F.Frame(F.Kind.MARKER, M, seq=10 * segno + 9, offset=segno, payload=f"m{segno}".encode()))
    path = tmp_path / f"{segno:012d}.sealed"
    path.write_bytes(b"".join(F.encode(f) for f in frames))
    return SealedSegment(M, segno, path, path.stat().st_size, (size,))


def test_a_resized_disk_takes_its_size_with_its_logs_and_every_point_keeps_its_own(tmp_path):
    """1 MiB, grown to 3 MiB (segment 1 writes past the old end); then segments 2-4, received
    at 3 MiB, wait in the cache while the disk is shrunk to 512 KiB, and go up out of order
    after that: each log is applied at the size its records were received at, whenever it is
    uploaded, so every point is the disk as it was. An apply that read the manifest before the
    growth, and one that reads it after the shrink, both get every point right."""
    store, keyring, registered, uploader = uploading(tmp_path, ONE)
    uploader._upload(sealed(tmp_path, 0, MiB, [(1, 0)]))
    early = MachineApplier(store, keyring, find_machine(store, "web01"))  # knows only the 1 MiB disk
    registered[M] = MachineRecord(M, "web01", (3 * MiB,))
    uploader._upload(sealed(tmp_path, 1, 3 * MiB, [(11, 2 * MiB)]))
    assert early.disks[0].apply_next() and early.disks[0].apply_next()  # the manifest not read again
    assert store.page_blob_size(replica_name(M, 0)) == 3 * MiB
    registered[M] = MachineRecord(M, "web01", (MiB // 2,))
    for segno, writes in ((3, [(31, 2 * MiB + 4096)]), (2, [(21, 4096)]), (4, [(41, 0)])):
        uploader._upload(sealed(tmp_path, segno, 3 * MiB, writes))
    uploader._upload(sealed(tmp_path, 5, MiB // 2, [(51, 8192)]))

    late = MachineApplier(store, keyring, find_machine(store, "web01"))
    assert late.apply_available() == 4 and late.applied_seq() == 59
    points = recovery_points(store, late.machine)
    assert [(p.seq, p.sizes) for p in points] == [(9, (MiB,)), (19, (3 * MiB,)), (29, (3 * MiB,)), (39, (3 * MiB,)),
                                                  (49, (3 * MiB,)), (59, (MiB // 2,))]
    page = {n: bytes([n + 1]) * 4096 for n in range(6)}
    expected = {9: {0: page[0]}, 19: {0: page[0], 2 * MiB: page[1]},
                49: {0: page[4], 4096: page[2], 2 * MiB: page[1], 2 * MiB + 4096: page[3]},
                59: {0: page[4], 4096: page[2], 8192: page[5]}}
    for p in points:
        if p.seq in expected:
            out = tmp_path / f"point{p.seq}.img"
            assert export_disk(store, late.machine, 0, out, p)[0] == p.sizes[0]
            image = out.read_bytes()
            assert len(image) == p.sizes[0]
            for offset, data in expected[p.seq].items():
                assert image[offset:offset + 4096] == data
            assert image.count(0) == len(image) - 4096 * len(expected[p.seq])
    assert export_disk(store, late.machine, 0, tmp_path / "now.img", None)[0] == MiB // 2


def test_logs_of_earlier_versions_are_still_applied(tmp_path):
    """Format 2 logs (no disk size; sealed segments of an earlier version have none either):
    applied at the size registered now, or what their records need."""
    store, keyring, registered, uploader = uploading(tmp_path, ONE)
    for segno, writes in ((0, [(1, 0), (2, 2 * MiB)]), (1, [(11, 4096)])):  # received at 3 MiB, before a shrink
        uploader._upload(dataclasses.replace(sealed(tmp_path, segno, MiB, writes), disk_sizes=None))  # sizes not recorded
    assert "disk_size" not in store.get_blob(blob_name(M, 0, 0))[1]  # a format 2 log, as the earlier version wrote
    uploader._upload(sealed(tmp_path, 2, MiB, [(21, 8192)]))
    assert store.get_blob(blob_name(M, 0, 2))[1]["format"] == FORMAT
    applier = MachineApplier(store, keyring, find_machine(store, "web01"))
    sizes = []
    for _ in range(3):
        assert applier.disks[0].apply_next()
        sizes.append(store.page_blob_size(replica_name(M, 0)))
    # the second format 2 log needs no more than 8 KiB, yet may predate the shrink: not cut
    assert sizes == [2 * MiB + 4096, 2 * MiB + 4096, MiB]
    assert [p.sizes for p in recovery_points(store, applier.machine)] == [(2 * MiB + 4096,)] * 2 + [(MiB,)]
    out = tmp_path / "point19.img"
    export_disk(store, applier.machine, 0, out, recovery_points(store, applier.machine)[1])
    assert out.read_bytes()[2 * MiB:] == bytes([1]) * 4096
    # a segment handed over twice (listed while its upload finished) is not uploaded again
    again = sealed(tmp_path, 3, MiB, [(31, 0)])
    assert uploader._upload(again) and not uploader._upload(again)


def test_logs_of_a_dropped_disk_are_swept_but_not_those_of_a_disk_added_unseen(tmp_path):
    store, keyring, registered, uploader = uploading(tmp_path, TWO)
    uploader._upload(segment(tmp_path, 0, disks=2))
    registered[M] = ONE  # disk 1 dropped before its log 0 was applied
    uploader._upload(segment(tmp_path, 1, disks=1))
    applier = MachineApplier(store, keyring, find_machine(store, "web01"))
    assert applier.apply_available() == 2 and store.list_blobs(f"logs/{M}/") == []
    # an apply that has not read the manifest adding disk 1 again keeps that disk's logs
    registered[M] = TWO
    uploader._upload(segment(tmp_path, 2, disks=2))
    assert applier.sweep() == 0 and [b.name for b in store.list_blobs(f"logs/{M}/")] == [
        blob_name(M, 0, 2), blob_name(M, 1, 2)]


def test_the_sweep_takes_a_disk_added_while_it_lists_for_added_not_dropped(tmp_path, monkeypatch):
    """The manifest adding disk 1, then disk 1's first log, go up while the sweep lists: the
    manifest read after the listing names the disk, so its log stays."""
    store, keyring, registered, uploader = uploading(tmp_path, ONE)
    uploader._upload(segment(tmp_path, 0, disks=1))
    applier = MachineApplier(store, keyring, find_machine(store, "web01"))
    real_list, added = store.list_blobs, []

    def listing_while_a_disk_is_added(prefix):
        if not added:
            added.append(prefix)
            registered[M] = TWO
            uploader._upload(segment(tmp_path, 1, disks=2))
        return real_list(prefix)

    monkeypatch.setattr(store, "list_blobs", listing_while_a_disk_is_added)
    applier.sweep()
    assert added and store.list_blobs(blob_name(M, 1, 1))


def test_apply_takes_up_a_disk_added_after_it_read_the_manifest_before_it_counts_others_logs(tmp_path, monkeypatch):
    """Apply reads the one-disk manifest; then the manifest adding disk 1 and segment 1's logs
    of both disks go up; then apply finds disk 0's log. It must not count that log as the
    machine applied up to its marker while disk 1's log of the same segment waits unread."""
    store, keyring, registered, uploader = uploading(tmp_path, ONE)
    uploader._upload(segment(tmp_path, 0, disks=1))
    applier = MachineApplier(store, keyring, find_machine(store, "web01"))
    assert applier.apply_available() == 1 and applier.applied_seq() == 9
    real_get, added = store.get_blob, []

    def disk_added_right_after_the_manifest_is_read(name):
        got = real_get(name)
        if name == manifest_name(M) and not added:
            added.append(name)
            registered[M] = TWO
            uploader._upload(segment(tmp_path, 1, disks=2))
        return got

    monkeypatch.setattr(store, "get_blob", disk_added_right_after_the_manifest_is_read)
    assert applier.apply_available() == 2 and added
    assert applier.applied_seq() == 19 and [d.disk for d in applier.disks] == [0, 1]
    assert store.read_pages(replica_name(M, 1), 4096, 4096) == bytes([2]) * 4096


def test_a_position_storage_did_not_take_is_not_taken_here_either(tmp_path):
    """The write of apply's position fails after log 1 was applied: this process must go on
    from what storage holds. Believing itself past log 1, its sweep would delete that log, and
    an apply started again (from storage's position) would wait for it for ever."""
    store, keyring, registered, uploader = uploading(tmp_path, ONE)
    uploader._upload(segment(tmp_path, 0, disks=1))
    applier = MachineApplier(store, keyring, find_machine(store, "web01"))
    assert applier.apply_available() == 1
    uploader._upload(segment(tmp_path, 1, disks=1))
    real_set = store.set_metadata

    def position_write_fails(name, metadata):
        if metadata.get("applied_segno") == "1":
            raise StorageUnavailable("injected outage")
        real_set(name, metadata)

    store.set_metadata = position_write_fails
    with pytest.raises(StorageUnavailable):
        applier.apply_available()
    store.set_metadata = real_set
    assert applier.disks[0].position.segno == 0 and applier.sweep() == 0  # log 1 stays
    restarted = MachineApplier(store, keyring, find_machine(store, "web01"))
    assert restarted.apply_available() == 1 and restarted.applied_seq() == 19


def test_an_export_that_fails_leaves_nothing_behind(tmp_path):
    store = open_store(str(tmp_path / "storage"))
    store.create_page_blob(replica_name(M, 0), 16 * 1024 * 1024)
    store.write_pages(replica_name(M, 0), 0, os.urandom(4096))

    def read_fails(*request):
        raise StorageUnavailable("injected outage")

    store.read_pages = read_fails
    out = tmp_path / "disk0.img"
    with pytest.raises(StorageUnavailable):
        export_disk(store, ONE, 0, out, None)
    assert list(tmp_path.glob("disk0.img*")) == []  # no disk-sized .part file either


def test_a_disk_start_never_moves_apply_back(tmp_path):
    """A disk applier that went on applying while the manifest changed under it (a log of the
    disk's new start applied, and deleted) is rebuilt at the position it reached, not at the
    start, where it would wait for ever for a log that is gone."""
    store, master = open_store(str(tmp_path / "storage")), MasterKey(os.urandom(32))
    name = replica_name(M, 1)
    store.create_page_blob(name, TWO.disk_sizes[1])
    store.set_metadata(name, {"applied_segno": "5", "applied_seq": "59"})
    ahead = MachineApplier(store, DataKeyring(store, master), Manifest(M, "web01", TWO.disk_sizes, since_segno=(0, 3),
                                                                       since_seq=(0, 29)))
    assert ahead.disks[1].position == AppliedPosition(5, 59) and store.get_metadata(name)["since_segno"] == "3"
    later = MachineApplier(store, DataKeyring(store, master), Manifest(M, "web01", TWO.disk_sizes, since_segno=(0, 9),
                                                                       since_seq=(0, 89)))
    assert later.disks[1].position == AppliedPosition(8, 89)


def test_a_disk_added_to_a_replicating_machine_is_replicated_applied_and_in_later_points(tmp_path, pki):
    """The real agent and process server: two cycles of one disk, then the machine registers
    again with a second disk; the agent replicates it from scratch, apply takes it up, and
    recovery points from before it hold disk 0 alone."""
    store, master = open_store(str(tmp_path / "storage")), MasterKey(os.urandom(32))
    m = make_machine(tmp_path, "grow01", [8 * MiB, 4 * MiB], seed=61, ps_port=0)
    full_config, both = m.config, m.record
    m.config = dataclasses.replace(full_config, disks=full_config.disks[:1])
    m.state.save_config(m.config)
    srv = InProcessServer(pki, tmp_path / "cache", [MachineRecord(m.id, "grow01", both.disk_sizes[:1])], store, master,
                          segment_max_age=0.2)
    states: dict[int, list[str]] = {}
    try:
        for cycle in range(4):
            if cycle == 2:  # registered again with the second disk
                srv.directory.register(both)
                m.config = full_config
                m.state.save_config(m.config)
            for img in m.images[:len(m.config.disks)]:
                random_writes(img, 50, seed=70 + cycle)
            report = replicator(pki, m, srv.port).run_cycle()
            states[report.marker_seq] = [sha256(p) for p in m.images[:len(m.config.disks)]]
        wait_uploaded(srv.server)
    finally:
        srv.stop()
    manifest = find_machine(store, "grow01")
    assert manifest.disk_sizes == both.disk_sizes and manifest.since_segno[0] == 0 and manifest.since_segno[1] > 0
    MachineApplier(store, DataKeyring(store, master), manifest).apply_until(max(states), 60)
    points = recovery_points(store, manifest)
    assert [p.seq for p in points] == sorted(states)
    for p in points:
        assert [s is not None for s in p.snapshots] == [True, len(states[p.seq]) == 2]
        for disk, expected in enumerate(states[p.seq]):
            out = tmp_path / f"rp-{p.seq}-{disk}.img"
            export_disk(store, manifest, disk, out, p)
            assert sha256(out) == expected, f"recovery point {p.seq} disk {disk}"
    with pytest.raises(ApplyError, match="disk 1 of grow01 was added after recovery point"):
        export_disk(store, manifest, 1, tmp_path / "none.img", points[0])


def test_a_log_missing_below_later_ones_is_named(tmp_path, caplog):
    """Uploads finish out of order, so a missing log with later ones there is normal for a while;
    still missing a sweep later (or when `apply_until` gives up), apply names it."""
    store, keyring, _, uploader = uploading(tmp_path, ONE)
    for segno in (0, 2):
        uploader._upload(segment(tmp_path, segno, disks=1))
    applier = MachineApplier(store, keyring, find_machine(store, "web01"))
    with pytest.raises(ApplyError, match="log 1 of web01 disk 0 is not in storage while later ones are"):
        applier.apply_until(29, timeout=0.2, poll=0.05)
    applier.sweep()
    assert "is not in storage" not in caplog.text  # one sweep has seen it: not yet
    applier.sweep()
    assert "log 1 of web01 disk 0 is not in storage while later ones are" in caplog.text
    caplog.clear()
    uploader._upload(segment(tmp_path, 1, disks=1))  # it came after all
    applier.apply_until(29, timeout=5)
    applier.sweep()
    assert "is not in storage" not in caplog.text
