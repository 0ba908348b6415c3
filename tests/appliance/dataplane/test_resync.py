"""Resync when the agent's digest map is lost: checksums of source and replica are compared
and only the differing blocks are sent (including blocks that became zero)."""
from __future__ import annotations

import dataclasses
import os
import threading

from replication_appliance.apply.applier import MachineApplier, find_machine
from replication_appliance.apply.recovery_points import export_disk, recovery_points
from replication_appliance.common.secrets import MasterKey
from replication_appliance.dataplane.segment import replica_name
from replication_appliance.storage import open_store
from replication_appliance.storage.keyring import DataKeyring

from .conftest import (
    InProcessServer,
    first_disk_only,
    make_machine,
    random_writes,
    replicator,
    sha256,
    wait_until,
)

MiB = 1 << 20


def test_lost_digest_map_resyncs_by_checksum(tmp_path, pki, azurite):
    store = open_store(azurite.connection_string)
    master = MasterKey(os.urandom(32))
    m = make_machine(tmp_path, "resync01", [64 * MiB, 8 * MiB], seed=31, ps_port=0)
    srv = InProcessServer(pki, tmp_path / "cache", [m.record], store, master, segment_max_age=0.2)
    try:
        rep = replicator(pki, m, srv.port)
        first = rep.run_cycle()
        applier = MachineApplier(store, DataKeyring(store, master), m.record)

        # the digest map of disk 0 is lost, and the disk changes meanwhile (some blocks zeroed)
        m.state.digests(0).unlink()
        before = m.images[0].read_bytes()
        random_writes(m.images[0], 150, seed=77)
        with open(m.images[0], "r+b") as f:
            data = f.read()
            first_data = next(i for i in range(0, len(data), 4096) if data[i:i + 4096] != bytes(4096))
            f.seek(first_data)
            f.write(bytes(4096))
        # the replica has not caught up yet: the agent waits until apply has run
        applying = threading.Thread(target=applier.apply_until, args=(first.marker_seq, 60))
        threading.Timer(1.0, applying.start).start()
        report = replicator(pki, m, srv.port).run_cycle()
        assert report.phases[0] == "disk 0: resync" and "disk 1: delta" in report.phases
        after = m.images[0].read_bytes()
        changed = sum(after[i:i + 4096] != before[i:i + 4096] for i in range(0, len(after), 4096))
        assert report.bytes_sent == changed * 4096  # exactly the blocks that differ, not the 64 MiB disk
        assert m.state.load_disk(0).resyncs == 1 and m.state.digests(0).exists()
        applying.join(60)
        applier.apply_until(report.marker_seq, 60)
        for disk, image in enumerate(m.images):
            out = tmp_path / f"replica{disk}.img"
            export_disk(store, m.record, disk, out, None)
            assert sha256(out) == sha256(image)
        # and the map is back: the next cycle is a plain delta again
        random_writes(m.images[0], 10, seed=78)
        assert replicator(pki, m, srv.port).run_cycle().phases[0] == "disk 0: delta"
    finally:
        srv.stop()


def test_a_grown_disk_is_resynced_and_its_replica_resized(tmp_path, pki, azurite):
    """The source disk grew and the agent registered again with its new size: its map no
    longer fits, so it resyncs; the replica (still the old size until apply reads the next
    manifest) reads as zeros past its end, and apply resizes it (it stopped at the size before)."""
    store = open_store(azurite.connection_string)
    master = MasterKey(os.urandom(32))
    m = make_machine(tmp_path, "grow02", [8 * MiB], seed=33, ps_port=0)
    srv = InProcessServer(pki, tmp_path / "cache", [m.record], store, master, segment_max_age=0.2)
    try:
        first = replicator(pki, m, srv.port).run_cycle()
        applier = MachineApplier(store, DataKeyring(store, master), m.record)
        applier.apply_until(first.marker_seq, 60)
        before = sha256(m.images[0])
        with open(m.images[0], "r+b") as f:
            f.truncate(12 * MiB)
            f.seek(10 * MiB)
            f.write(os.urandom(MiB))  # data in the grown part
        random_writes(m.images[0], 20, seed=34)
        grown = dataclasses.replace(m.record, disk_sizes=(12 * MiB,))
        srv.directory.register(grown)  # registered again with the new size
        m.config.disks[0] = dataclasses.replace(m.config.disks[0], size=12 * MiB)
        m.state.save_config(m.config)
        report = replicator(pki, m, srv.port).run_cycle()
        assert report.phases[0] == "disk 0: resync"
        applier.apply_until(report.marker_seq, 60)
        assert store.page_blob_size(replica_name(m.id, 0)) == 12 * MiB
        out = tmp_path / "replica.img"
        export_disk(store, grown, 0, out, None)
        assert sha256(out) == sha256(m.images[0])
        # the point before the growth is still the 8 MiB disk it was
        points = {p.seq: p for p in recovery_points(store, applier.machine)}
        assert (points[first.marker_seq].sizes, points[report.marker_seq].sizes) == ((8 * MiB,), (12 * MiB,))
        export_disk(store, grown, 0, out, points[first.marker_seq])
        assert sha256(out) == before
    finally:
        srv.stop()


def test_an_agent_that_lost_its_state_and_has_a_new_disk_resyncs_without_waiting_for_it(tmp_path, pki):
    """Reinstalled with one more disk: every disk is fresh while the process server holds the
    machine's history, so all are resynced. The new disk has no replica and no logs yet:
    nothing to wait for before serving its digests (zeros), or the cycle would wait for ever."""
    store = open_store(str(tmp_path / "storage"))
    master = MasterKey(os.urandom(32))
    m = make_machine(tmp_path, "lost02", [8 * MiB, 4 * MiB], seed=35, ps_port=0)
    full_config, both, one = first_disk_only(m)
    srv = InProcessServer(pki, tmp_path / "cache", [one], store, master, segment_max_age=0.2)
    try:
        first = replicator(pki, m, srv.port).run_cycle()
        wait_until(lambda: store.list_blobs("machines/"), 20, "the first log uploaded")
        MachineApplier(store, DataKeyring(store, master), find_machine(store, "lost02")).apply_until(first.marker_seq, 60)
        for f in m.state.root.glob("disk-*"):
            f.unlink()
        srv.directory.register(both)
        m.config = full_config
        m.state.save_config(m.config)
        outcome: dict = {}
        cycle = threading.Thread(target=lambda: outcome.update(report=replicator(pki, m, srv.port).run_cycle()),
                                 daemon=True)
        cycle.start()
        cycle.join(60)
        assert not cycle.is_alive(), "the resync waited for a disk that has nothing to apply"
        report = outcome["report"]
        assert report.phases == ["disk 0: resync", "disk 1: resync"]
        applier = MachineApplier(store, DataKeyring(store, master), find_machine(store, "lost02"))
        applier.apply_until(report.marker_seq, 60)
        for disk, image in enumerate(m.images):
            out = tmp_path / f"replica{disk}.img"
            export_disk(store, both, disk, out, None)
            assert sha256(out) == sha256(image)
    finally:
        srv.stop()


def test_segments_received_before_a_shrink_are_applied_at_their_size_after_it(tmp_path, pki, azurite):
    """Two cycles at 12 MiB wait in the cache (uploads held back) while the disk is shrunk to
    8 MiB and the agent registered again. When the process server comes back with uploads,
    each log is applied at the size its records were checked against: the two points are the
    12 MiB disk as it was, the next one (after the resync) the 8 MiB disk."""
    store = open_store(azurite.connection_string)
    master = MasterKey(os.urandom(32))
    m = make_machine(tmp_path, "shrink03", [12 * MiB], seed=35, ps_port=0)
    srv = InProcessServer(pki, tmp_path / "cache", [m.record], store, master, segment_max_age=0.2, upload_concurrency=0)
    try:
        states = {}
        for seed in (36, 37):
            report = replicator(pki, m, srv.port).run_cycle()
            states[report.marker_seq] = m.images[0].read_bytes()
            with open(m.images[0], "r+b") as f:
                f.seek(10 * MiB)
                f.write(os.urandom(64 * 1024))  # past the 8 MiB the disk will have
            random_writes(m.images[0], 20, seed=seed)
    finally:
        srv.stop()
    assert store.list_blobs(f"logs/{m.id}/") == []  # all still in the cache
    with open(m.images[0], "r+b") as f:
        f.truncate(8 * MiB)
    shrunk = dataclasses.replace(m.record, disk_sizes=(8 * MiB,))
    m.config.disks[0] = dataclasses.replace(m.config.disks[0], size=8 * MiB)
    m.state.save_config(m.config)
    srv = InProcessServer(pki, tmp_path / "cache", [shrunk], store, master, segment_max_age=0.2)
    try:
        applier = MachineApplier(store, DataKeyring(store, master), shrunk)
        applying = threading.Thread(target=applier.apply_until, args=(max(states), 60))
        applying.start()
        report = replicator(pki, m, srv.port, resync_wait=60).run_cycle()  # its map no longer fits: a resync, once applied
        applying.join(60)
        assert report.phases[0] == "disk 0: resync"
        states[report.marker_seq] = m.images[0].read_bytes()
        applier.apply_until(report.marker_seq, 60)
        points = recovery_points(store, applier.machine)
        assert [p.sizes[0] for p in points] == [12 * MiB, 12 * MiB, 8 * MiB]
        for p in points:
            out = tmp_path / f"point-{p.seq}.img"
            export_disk(store, shrunk, 0, out, p)
            assert out.read_bytes() == states[p.seq]
    finally:
        srv.stop()


def test_a_disk_dropped_with_data_waiting_and_registered_again_is_resynced(tmp_path, pki, azurite):
    """A cycle's changes to disk 1 wait in the cache (uploads held back) when the machine is
    registered again without disk 1: they go with the disk. Registered again with it later,
    the disk is resynced (the agent forgot its map at the drop, since the map counts those
    changes as sent), so the replica is the source, not the source less the dropped writes."""
    store = open_store(azurite.connection_string)
    master = MasterKey(os.urandom(32))
    m = make_machine(tmp_path, "drop04", [8 * MiB, 8 * MiB], seed=38, ps_port=0)
    two, one = m.record, dataclasses.replace(m.record, disk_sizes=(8 * MiB,))
    both = list(m.config.disks)
    applier = MachineApplier(store, DataKeyring(store, master), two)
    srv = InProcessServer(pki, tmp_path / "cache", [two], store, master, segment_max_age=0.2)
    try:
        applier.apply_until(replicator(pki, m, srv.port).run_cycle().marker_seq, 60)
    finally:
        srv.stop()
    srv = InProcessServer(pki, tmp_path / "cache", [two], store, master, segment_max_age=0.2, upload_concurrency=0)
    try:
        random_writes(m.images[1], 30, seed=39)
        assert replicator(pki, m, srv.port).run_cycle().bytes_sent > 0  # acknowledged, still in the cache
    finally:
        srv.stop()
    m.state.drop_disks_from(1)  # as `mobility-agent register` does with one disk fewer
    m.config.disks = both[:1]
    m.state.save_config(m.config)
    srv = InProcessServer(pki, tmp_path / "cache", [one], store, master, segment_max_age=0.2)
    stop = threading.Event()

    def apply_on():
        while not stop.is_set():
            applier.apply_available()
            stop.wait(0.2)

    applying = threading.Thread(target=apply_on)
    applying.start()
    try:
        replicator(pki, m, srv.port).run_cycle()  # the backlog goes up with one disk
        srv.directory.register(two)  # and disk 1 is registered again
        m.config.disks = both
        m.state.save_config(m.config)
        report = replicator(pki, m, srv.port, resync_wait=60).run_cycle()
        assert "disk 1: resync" in report.phases
        stop.set()
        applying.join(30)
        applier.apply_until(report.marker_seq, 60)
        for disk, image in enumerate(m.images):
            out = tmp_path / f"replica{disk}.img"
            export_disk(store, two, disk, out, None)
            assert sha256(out) == sha256(image), f"disk {disk}"
    finally:
        stop.set()
        srv.stop()
