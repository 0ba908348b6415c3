"""The record buffers and queued bytes shared by a process server's connections: spares are
reused across connections and capped, the queued total is bounded without starving a
connection, and nothing stays counted after a connection ends or its journal fails."""
from __future__ import annotations

import os
import threading
import uuid

import pytest
from replication_appliance.dataplane import frames as F
from replication_appliance.process_server import commit as commit_module
from replication_appliance.process_server.buffers import (
    RecordBufferPool,
    class_capacity,
)
from replication_appliance.process_server.commit import GroupCommit
from replication_appliance.process_server.journal import (
    MachineJournal,
    RecordBuffer,
    aligned_capacity,
)

PAYLOAD = 64 * 1024
RECORD = F.HEADER_SIZE + PAYLOAD


def put(c: GroupCommit, machine: uuid.UUID, seq: int) -> None:
    raw = F.encode(F.Frame(F.Kind.DATA, machine, seq=seq, offset=seq * PAYLOAD, payload=os.urandom(PAYLOAD)))
    rec = c.record_buffer(PAYLOAD)
    rec.payload()[:] = raw[F.HEADER_SIZE:]
    rec.set_header(raw[:F.HEADER_SIZE])
    c.put(F.decode_header(raw[:F.HEADER_SIZE]), rec)


def connection(tmp_path, pool: RecordBufferPool, max_queued: int = 1 << 20) -> tuple[GroupCommit, uuid.UUID]:
    machine = uuid.uuid4()
    journal = MachineJournal(tmp_path, machine, max_segment_bytes=1 << 30, max_segment_age=60)
    return GroupCommit(journal, on_sealed=lambda s: None, max_queued_bytes=max_queued, pool=pool), machine


def started(target, *args) -> threading.Thread:
    t = threading.Thread(target=target, args=args, daemon=True)
    t.start()
    t.join(0.3)
    return t


@pytest.fixture
def held_fsync(monkeypatch):
    """Group commits' fsyncs (not the journals' own) wait for the returned event."""
    gate = threading.Event()
    real = os.fsync

    def fsync(fd: int) -> None:
        if threading.current_thread().name.startswith("ps-sync"):
            gate.wait(10)
        real(fd)

    monkeypatch.setattr(commit_module.os, "fsync", fsync)
    yield gate
    gate.set()


def test_a_new_connection_reuses_the_buffers_another_one_wrote(tmp_path):
    """Each record is made durable before the next (one buffer in use at a time, whatever the
    threads' timing): connection a makes the only buffer, connection b reuses it."""
    pool = RecordBufferPool(spare_bytes=64 << 20, queued_budget=64 << 20)
    a, ma = connection(tmp_path, pool)
    for seq in range(1, 5):
        put(a, ma, seq)
        a.wait_durable()
    a.close()
    assert pool.allocated == 1 and pool.spare_bytes == class_capacity(PAYLOAD) and pool.queued_bytes == 0
    b, mb = connection(tmp_path, pool)
    for seq in range(1, 5):
        put(b, mb, seq)
        b.wait_durable()
    b.close()
    assert pool.allocated == 1  # connection b made no buffer of its own


def test_spares_are_kept_only_up_to_the_limit(tmp_path):
    pool = RecordBufferPool(spare_bytes=3 * aligned_capacity(PAYLOAD), queued_budget=64 << 20)
    taken = [pool.take(PAYLOAD) for _ in range(5)]
    pool.give_back(taken)
    assert pool.spare_bytes == 3 * aligned_capacity(PAYLOAD)
    again = [pool.take(PAYLOAD) for _ in range(5)]
    assert pool.allocated == 7 and sum(any(r is t for t in taken) for r in again) == 3


def test_size_classes_are_few_and_waste_at_most_an_eighth():
    assert class_capacity(F.MAX_DATA) == aligned_capacity(F.MAX_DATA)  # the usual frame: an exact fit
    sizes = range(4096, F.MAX_DATA + 1, 4096)  # every DATA payload the agent sends
    for n in sizes:
        assert aligned_capacity(n) <= class_capacity(n) <= aligned_capacity(n + n // 8)
    assert len({class_capacity(n) for n in sizes}) <= 80


def test_buffers_of_near_sizes_serve_each_other(tmp_path):
    pool = RecordBufferPool(spare_bytes=64 << 20, queued_budget=64 << 20)
    first = pool.take(97 * 1024)
    pool.give_back([first])
    assert pool.take(100 * 1024) is first and pool.allocated == 1
    pool.give_back([RecordBuffer.of(bytes(F.HEADER_SIZE), bytes(100 * 1024))])  # not the pool's: not kept
    assert pool.spare_bytes == 0


def test_full_spares_let_go_of_the_ones_returned_longest_ago(tmp_path):
    big = class_capacity(F.MAX_DATA)
    pool = RecordBufferPool(spare_bytes=2 * big, queued_budget=64 << 20)
    odd = [pool.take(n) for n in (300 * 1024, 500 * 1024, 700 * 1024, 900 * 1024)]
    pool.give_back(odd)  # a delta cycle's odd sizes fill the spares
    frames = [pool.take(F.MAX_DATA) for _ in range(2)]
    pool.give_back(frames)  # then whole frames again: they are kept, the odd ones go
    assert pool.spare_bytes <= 2 * big
    made = pool.allocated
    assert {id(pool.take(F.MAX_DATA)) for _ in range(2)} == {id(f) for f in frames} and pool.allocated == made


def test_prefilled_buffers_serve_the_first_frames(tmp_path):
    pool = RecordBufferPool(spare_bytes=16 << 20, queued_budget=64 << 20)
    pool.prefill(F.MAX_DATA, 8 << 20)
    assert pool.spare_bytes == aligned_capacity(F.MAX_DATA)  # 8 MiB holds one 4 MiB record plus its header, not two
    pool.prefill(PAYLOAD, 1 << 20)
    small = (pool.spare_bytes - aligned_capacity(F.MAX_DATA)) // aligned_capacity(PAYLOAD)
    assert small == (1 << 20) // aligned_capacity(PAYLOAD)
    [pool.take(PAYLOAD) for _ in range(small)]
    pool.take(F.MAX_DATA)
    assert pool.allocated == 0 and pool.spare_bytes == 0
    pool.take(PAYLOAD)
    assert pool.allocated == 1


def test_the_server_wide_budget_holds_back_only_connections_with_something_queued(tmp_path, held_fsync):
    pool = RecordBufferPool(spare_bytes=64 << 20, queued_budget=3 * RECORD)
    a, ma = connection(tmp_path, pool)
    b, mb = connection(tmp_path, pool)
    c, mc = connection(tmp_path, pool)
    try:
        put(a, ma, 1)
        put(a, ma, 2)
        put(b, mb, 1)  # the budget is now used up
        a3 = started(put, a, ma, 3)
        b2 = started(put, b, mb, 2)
        assert a3.is_alive() and b2.is_alive()  # both have something queued: they wait
        c1 = started(put, c, mc, 1)
        c1.join(10)  # would wait for held_fsync, set only below, if it were held back
        assert not c1.is_alive()  # nothing queued yet: never held back (no connection starves)
        assert pool.queued_bytes == 4 * RECORD
        held_fsync.set()
        a3.join(10)
        b2.join(10)
        assert not a3.is_alive() and not b2.is_alive()
        assert (a.wait_durable(), b.wait_durable(), c.wait_durable()) == (3, 2, 1)
        assert pool.queued_bytes == 0
    finally:
        held_fsync.set()
        for x in (a, b, c):
            x.close()


def test_a_failed_journal_neither_blocks_its_connection_nor_keeps_budget(tmp_path, monkeypatch):
    gate, failing = threading.Event(), threading.Event()
    real = os.fsync

    def fsync(fd: int) -> None:
        if threading.current_thread().name.startswith("ps-sync"):
            gate.wait(10)
            if failing.is_set():
                raise OSError(5, "I/O error")
        real(fd)

    monkeypatch.setattr(commit_module.os, "fsync", fsync)
    pool = RecordBufferPool(spare_bytes=64 << 20, queued_budget=2 * RECORD)
    a, ma = connection(tmp_path, pool)
    outcome: list[BaseException | None] = []

    def third() -> None:
        try:
            put(a, ma, 3)
            outcome.append(None)
        except OSError as e:
            outcome.append(e)

    try:
        put(a, ma, 1)
        put(a, ma, 2)
        t = started(third)
        assert t.is_alive()  # waiting for budget held by records 1 and 2
        failing.set()
        gate.set()  # their fsync fails: they will never be durable
        t.join(10)
        assert not t.is_alive()
        [error] = outcome
        assert isinstance(error, OSError) and "journal of machine" in str(error) and "I/O error" in str(error)
    finally:
        gate.set()
        a.close()
    assert pool.queued_bytes == 0  # what the failed journal held is counted no more


def test_the_process_server_serves_every_connection_from_its_prefilled_buffers(tmp_path, pki):
    """Two machines replicate one after the other through one server: disks of random data go
    out as whole 4 MiB frames, which the buffers filled at start cover (none made later)."""
    from replication_appliance.common.secrets import MasterKey
    from replication_appliance.storage import open_store

    from .conftest import InProcessServer, make_machine, replicator

    machines = [make_machine(tmp_path, f"m{i}", [24 << 20], seed=i, ps_port=0) for i in range(2)]
    for m in machines:
        m.images[0].write_bytes(os.urandom(24 << 20))
    srv = InProcessServer(pki, tmp_path / "cache", [m.record for m in machines], open_store(str(tmp_path / "store")),
                          MasterKey(os.urandom(32)), queue_bytes=8 << 20)
    try:
        pool = srv.server.buffers
        assert pool.spare_bytes == 3 * aligned_capacity(F.MAX_DATA)  # 2 x 8 MiB of 4 MiB records
        for m in machines:
            report = replicator(pki, m, srv.port).run_cycle()
            assert report.bytes_sent == 24 << 20
        assert pool.allocated == 0 and pool.queued_bytes == 0
    finally:
        srv.stop()
