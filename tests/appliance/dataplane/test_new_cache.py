"""A machine new to a cache that storage already knows: moved to another process server, or
its cache disk replaced. The new journal numbers on from storage (else apply, past those
numbers, would skip what arrives); what the old cache acknowledged and lost is resynced."""
from __future__ import annotations

import os
import shutil
import threading
import time

import pytest
from replication_appliance.agent.link import Link, LinkLost, Outbox, RateLimit
from replication_appliance.apply.applier import MachineApplier, find_machine
from replication_appliance.apply.recovery_points import export_disk, recovery_points
from replication_appliance.common.secrets import MasterKey
from replication_appliance.storage import StorageUnavailable, open_store
from replication_appliance.storage.keyring import DataKeyring

from .conftest import (
    InProcessServer,
    first_disk_only,
    make_machine,
    random_writes,
    replicator,
    sha256,
    wait_uploaded,
)

MiB = 1 << 20


def assert_replica_is_the_source(store, m, tmp_path, marker_seq: int) -> None:
    points = {p.seq: p for p in recovery_points(store, m.record)}
    assert marker_seq in points, (marker_seq, sorted(points))
    for disk, image in enumerate(m.images):
        for name, point in (("replica", None), ("point", points[marker_seq])):
            out = tmp_path / f"{name}{disk}.img"
            export_disk(store, m.record, disk, out, point)
            assert sha256(out) == sha256(image), f"{name} of disk {disk} differs from the source"
            out.unlink()


def test_a_machine_moved_to_another_cache_goes_on_where_storage_stands(tmp_path, pki, azurite):
    store = open_store(azurite.connection_string)
    master = MasterKey(os.urandom(32))
    m = make_machine(tmp_path, "moved01", [16 * MiB, 4 * MiB], seed=51, ps_port=0)
    applier = MachineApplier(store, DataKeyring(store, master), m.record)
    old = InProcessServer(pki, tmp_path / "cache-a", [m.record], store, master, segment_max_age=0.2)
    try:
        replicator(pki, m, old.port).run_cycle()
        random_writes(m.images[0], 40, seed=52)
        before = replicator(pki, m, old.port).run_cycle()
        wait_uploaded(old.server)
    finally:
        old.stop()
    applier.apply_until(before.marker_seq, 60)

    new = InProcessServer(pki, tmp_path / "cache-b", [m.record], store, master, segment_max_age=0.2)
    try:
        random_writes(m.images[0], 40, seed=53)
        random_writes(m.images[1], 10, seed=54)
        report = replicator(pki, m, new.port).run_cycle()
        assert report.marker_seq > before.marker_seq  # numbered on, not from 0 again
        assert report.phases == ["disk 0: delta", "disk 1: delta"]  # nothing was lost: no resync
        wait_uploaded(new.server)
    finally:
        new.stop()
    applier.apply_until(report.marker_seq, 60)
    assert_replica_is_the_source(store, m, tmp_path, report.marker_seq)


def test_a_machine_moved_back_to_a_cache_it_left_goes_on_where_storage_stands(tmp_path, pki, azurite):
    """The first cache's own numbering is behind what the second one uploaded meanwhile."""
    store = open_store(azurite.connection_string)
    master = MasterKey(os.urandom(32))
    m = make_machine(tmp_path, "back01", [16 * MiB], seed=55, ps_port=0)
    applier = MachineApplier(store, DataKeyring(store, master), m.record)
    reports = []
    for cache in ("cache-a", "cache-b", "cache-a"):
        srv = InProcessServer(pki, tmp_path / cache, [m.record], store, master, segment_max_age=0.2)
        try:
            random_writes(m.images[0], 40, seed=56 + len(reports))
            reports.append(replicator(pki, m, srv.port).run_cycle())
            wait_uploaded(srv.server)
        finally:
            srv.stop()
        applier.apply_until(reports[-1].marker_seq, 60)
    assert reports[2].marker_seq > reports[1].marker_seq and reports[2].phases == ["disk 0: delta"]
    assert_replica_is_the_source(store, m, tmp_path, reports[2].marker_seq)


def acknowledged_then_cache_replaced(tmp_path, pki, m, store, master, applier) -> tuple[int, int]:
    """A first cycle uploaded and applied; a second acknowledged by a process server that never
    uploads it (storage unreachable, say), whose cache disk is then replaced. The two markers."""
    cache = tmp_path / "cache"
    srv = InProcessServer(pki, cache, [m.record], store, master, segment_max_age=0.2)
    try:
        first = replicator(pki, m, srv.port).run_cycle()
        wait_uploaded(srv.server)
    finally:
        srv.stop()
    applier.apply_until(first.marker_seq, 60)
    srv = InProcessServer(pki, cache, [m.record], store, master, segment_max_age=0.2, upload_concurrency=0)
    try:
        for disk, image in enumerate(m.images):
            random_writes(image, 60, seed=62 + disk)
        lost = replicator(pki, m, srv.port).run_cycle()
    finally:
        srv.stop()
    shutil.rmtree(cache)
    return first.marker_seq, lost.marker_seq


def test_a_replaced_cache_that_lost_acknowledged_data_is_resynced(tmp_path, pki, azurite, caplog):
    store = open_store(azurite.connection_string)
    master = MasterKey(os.urandom(32))
    m = make_machine(tmp_path, "replaced01", [16 * MiB], seed=61, ps_port=0)
    applier = MachineApplier(store, DataKeyring(store, master), m.record)
    _, lost = acknowledged_then_cache_replaced(tmp_path, pki, m, store, master, applier)
    srv = InProcessServer(pki, tmp_path / "cache", [m.record], store, master, segment_max_age=0.2)
    try:
        random_writes(m.images[0], 20, seed=63)
        report = replicator(pki, m, srv.port).run_cycle()
        assert report.phases == ["disk 0: resync"], report.phases
        assert f"had acknowledged up to {lost}" in caplog.text
        wait_uploaded(srv.server)
    finally:
        srv.stop()
    applier.apply_until(report.marker_seq, 60)
    assert_replica_is_the_source(store, m, tmp_path, report.marker_seq)
    assert m.state.load_disk(0).acked_seq == report.marker_seq


def test_a_resync_for_lost_data_broken_off_is_done_by_the_next_cycle(tmp_path, pki, azurite):
    """Disk 0's resync takes the server's sequence past what the agent was acknowledged before;
    the agent dies before disk 1's. The next WELCOME no longer shows the loss: the decision
    must have been recorded before the first frame went out."""
    store = open_store(azurite.connection_string)
    master = MasterKey(os.urandom(32))
    m = make_machine(tmp_path, "broken01", [16 * MiB, 4 * MiB], seed=65, ps_port=0)
    applier = MachineApplier(store, DataKeyring(store, master), m.record)
    _, lost = acknowledged_then_cache_replaced(tmp_path, pki, m, store, master, applier)
    srv = InProcessServer(pki, tmp_path / "cache", [m.record], store, master, segment_max_age=0.2)
    try:
        random_writes(m.images[0], 200, seed=66)  # enough frames to pass the lost sequence
        rep = replicator(pki, m, srv.port)
        real_digests = rep._remote_digests

        def dies_before_disk_1(disk, *request):
            if disk == 1:
                rep._wait(rep.next_seq - 1)
                raise KeyboardInterrupt("agent killed before disk 1's resync")
            return real_digests(disk, *request)

        rep._remote_digests = dies_before_disk_1
        with pytest.raises(KeyboardInterrupt):
            rep.run_cycle()
        reached = srv.server.journals.get(m.id).last_seq
        assert reached > lost
        # disk 1's resync waits for the replica to have applied what disk 0's sent
        applying = threading.Thread(target=applier.apply_until, args=(reached, 60))
        applying.start()
        report = replicator(pki, m, srv.port).run_cycle()
        applying.join(60)
        assert "disk 1: resync" in report.phases, report.phases
        wait_uploaded(srv.server)
    finally:
        srv.stop()
    applier.apply_until(report.marker_seq, 60)
    assert_replica_is_the_source(store, m, tmp_path, report.marker_seq)


def test_storage_unreadable_refuses_a_new_machine_and_delays_a_known_one_briefly(tmp_path, pki):
    """A machine new to the cache cannot be numbered without storage: its agent is told to
    retry. One the cache has numbered goes on from the cache's numbering after a short wait."""
    store = open_store(str(tmp_path / "storage"))
    master = MasterKey(os.urandom(32))
    m = make_machine(tmp_path, "outage01", [4 * MiB], seed=67, ps_port=0)
    real_list = store.list_blobs
    srv = InProcessServer(pki, tmp_path / "cache", [m.record], store, master, segment_max_age=0.2,
                          storage_check_wait=0.5)
    try:
        def unreachable(prefix):
            raise StorageUnavailable("storage unreachable during list_blobs: injected")

        store.list_blobs = unreachable
        with pytest.raises(LinkLost, match="cannot read where outage01's logs stand in cache storage"):
            Link(("127.0.0.1", srv.port), pki.client_context(m.id), m.id, Outbox(MiB), RateLimit(None))
        store.list_blobs = real_list
        first = replicator(pki, m, srv.port).run_cycle()
        wait_uploaded(srv.server)

        def hangs(prefix):  # as in an outage: the storage client's timeouts
            time.sleep(30)
            return real_list(prefix)

        store.list_blobs = hangs
        random_writes(m.images[0], 10, seed=68)
        started = time.monotonic()
        report = replicator(pki, m, srv.port).run_cycle()
        assert time.monotonic() - started < 20 and report.marker_seq > first.marker_seq
    finally:
        store.list_blobs = real_list
        srv.stop()


def test_back_on_a_process_server_that_ran_on_its_manifest_and_numbering_are_storage_s(tmp_path, pki):
    """The first process server went on serving others while the machine was away, got a disk
    there, and came back, storage slow to answer that once: the server must wait for it (the
    agent was acknowledged beyond its numbering) and forget the manifest it knew."""
    store = open_store(str(tmp_path / "storage"))
    master = MasterKey(os.urandom(32))
    m = make_machine(tmp_path, "away01", [8 * MiB, 4 * MiB], seed=71, ps_port=0)
    two_disks, both, one = first_disk_only(m)
    first = InProcessServer(pki, tmp_path / "cache-a", [one], store, master, segment_max_age=0.2, storage_check_wait=0.5)
    try:
        replicator(pki, m, first.port).run_cycle()
        wait_uploaded(first.server)
        first.directory.register(both)  # registered again with a second disk, served elsewhere
        m.config = two_disks
        m.state.save_config(m.config)
        other = InProcessServer(pki, tmp_path / "cache-b", [both], store, master, segment_max_age=0.2)
        try:
            for i in range(2):
                random_writes(m.images[0], 20, seed=72 + i)
                away = replicator(pki, m, other.port).run_cycle()
            wait_uploaded(other.server)
        finally:
            other.stop()
        real_list = store.list_blobs
        slow = [3.0]

        def slow_once(prefix):
            time.sleep(slow.pop() if slow else 0)
            return real_list(prefix)

        store.list_blobs = slow_once
        for disk, image in enumerate(m.images):
            random_writes(image, 20, seed=75 + disk)
        back = replicator(pki, m, first.port).run_cycle()
        store.list_blobs = real_list
        assert back.marker_seq > away.marker_seq and back.phases == ["disk 0: delta", "disk 1: delta"]
        wait_uploaded(first.server)
    finally:
        first.stop()
    MachineApplier(store, DataKeyring(store, master), find_machine(store, "away01")).apply_until(back.marker_seq, 60)
    assert_replica_is_the_source(store, m, tmp_path, back.marker_seq)
