"""Group commit: records are written and fsynced by threads of their own; a record counts as
durable only after an fsync (or a seal) covering it, a marker seals its segment, and what
was queued when a connection ends is still committed."""
from __future__ import annotations

import errno
import os
import threading
import time
import uuid

import pytest

from replication_appliance.common import fileio
from replication_appliance.dataplane import frames as F
from replication_appliance.dataplane.segment import iter_records, valid_prefix
from replication_appliance.process_server import commit as commit_module
from replication_appliance.process_server.commit import GroupCommit
from replication_appliance.process_server.journal import MachineJournal, RecordBuffer

from .conftest import refuse_renaming_open_files

M = uuid.uuid4()


def put(c: GroupCommit, kind: F.Kind, seq: int, payload: bytes = b"", offset: int = 0) -> None:
    raw = F.encode(F.Frame(kind, M, seq=seq, offset=offset, payload=payload))
    rec = c.record_buffer(len(payload))
    rec.payload()[:] = raw[F.HEADER_SIZE:]
    rec.set_header(raw[:F.HEADER_SIZE])
    c.put(F.decode_header(raw[:F.HEADER_SIZE]), rec)


def records(j: MachineJournal) -> list[tuple[int, bytes]]:
    out = []
    for p in sorted(j.dir.glob("*.sealed")) + sorted(j.dir.glob("*.open")):
        out += [(r.header.seq, bytes(r.payload)) for r in iter_records(p.read_bytes())]
    return out


def test_durable_only_after_the_fsync_that_covers_it(tmp_path, monkeypatch):
    j = MachineJournal(tmp_path, M, max_segment_bytes=1 << 30, max_segment_age=60)
    gate, in_fsync = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def held_fsync(fd: int) -> None:
        if threading.current_thread().name.startswith("ps-sync"):  # the group commit's fsync
            in_fsync.set()
            gate.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(commit_module.os, "fsync", held_fsync)
    c = GroupCommit(j, on_sealed=lambda s: None, max_queued_bytes=1 << 20)
    try:
        for seq in range(1, 4):
            put(c, F.Kind.DATA, seq, bytes([seq]) * 4096, offset=seq * 4096)
        assert in_fsync.wait(10)
        time.sleep(0.2)
        # written to the segment, but the fsync has not returned: nothing is durable yet
        assert c.durable_seq == 0 and records(j)[0][0] == 1
        gate.set()
        assert c.wait_durable() == 3
        assert records(j) == [(seq, bytes([seq]) * 4096) for seq in range(1, 4)]
    finally:
        gate.set()
        c.close()


def test_a_full_queue_blocks_the_reader_until_records_are_durable(tmp_path, monkeypatch):
    j = MachineJournal(tmp_path, M, max_segment_bytes=1 << 30, max_segment_age=60)
    gate = threading.Event()
    real_fsync = os.fsync
    monkeypatch.setattr(commit_module.os, "fsync", lambda fd: (gate.wait(10), real_fsync(fd)))
    c = GroupCommit(j, on_sealed=lambda s: None, max_queued_bytes=3 * (4096 + F.HEADER_SIZE))
    try:
        for seq in range(1, 4):
            put(c, F.Kind.DATA, seq, b"x" * 4096)
        fourth = threading.Thread(target=put, args=(c, F.Kind.DATA, 4, b"y" * 4096))
        fourth.start()
        fourth.join(0.5)
        assert fourth.is_alive()  # back-pressure: the connection stops reading
        gate.set()
        fourth.join(10)
        assert not fourth.is_alive() and c.wait_durable() == 4
    finally:
        gate.set()
        c.close()


def test_marker_seals_and_close_commits_what_is_queued(tmp_path):
    j = MachineJournal(tmp_path, M, max_segment_bytes=1 << 30, max_segment_age=60)
    sealed = []
    c = GroupCommit(j, on_sealed=sealed.append, max_queued_bytes=8 << 20)
    put(c, F.Kind.DATA, 1, b"a" * 4096)
    put(c, F.Kind.MARKER, 2, b"m1", offset=7)
    put(c, F.Kind.DATA, 3, b"b" * 4096)
    c.close()  # the connection ended: records 1..3 arrived whole and are kept
    assert [s.segno for s in sealed] == [0]
    assert [seq for seq, _ in iter_seqs(sealed[0].path)] == [1, 2]  # the marker ended its segment
    assert c.durable_seq == 3 and [seq for seq, _ in records(j)] == [1, 2, 3]
    assert MachineJournal(tmp_path, M, 1 << 30, 60).last_seq == 3


def iter_seqs(path):
    return [(r.header.seq, bytes(r.payload)) for r in iter_records(path.read_bytes())]


def test_on_windows_a_segment_is_sealed_with_no_descriptor_of_it_open(tmp_path, monkeypatch):
    """Windows cannot rename an open file: there the writer fsyncs itself, so no descriptor held
    for the sync thread keeps a full segment, or one ended by a marker, from being sealed."""
    monkeypatch.setattr(fileio, "RENAME_OPEN", False)
    refused: list[str] = []
    refuse_renaming_open_files(monkeypatch, refused)
    real_fsync = os.fsync

    def slow_sync_thread(fd: int) -> None:  # a sync thread would still hold its descriptor at the seal
        if threading.current_thread().name.startswith("ps-sync"):
            time.sleep(0.5)
        real_fsync(fd)

    monkeypatch.setattr(commit_module.os, "fsync", slow_sync_thread)
    j = MachineJournal(tmp_path, M, max_segment_bytes=64 << 10, max_segment_age=60)
    sealed = []
    c = GroupCommit(j, on_sealed=sealed.append, max_queued_bytes=8 << 20)
    try:
        put(c, F.Kind.DATA, 1, b"a" * 4096)
        time.sleep(0.1)  # its own batch
        put(c, F.Kind.MARKER, 2, b"m1")  # seals segment 0
        put(c, F.Kind.DATA, 3, b"b" * (64 << 10))  # fills segment 1
        time.sleep(0.1)
        put(c, F.Kind.MARKER, 4, b"m2")
        assert c.wait_durable() == 4
    finally:
        c.close()
    assert refused == []
    assert [seq for s in sealed for seq, _ in iter_seqs(s.path)] == [1, 2, 3, 4]


@pytest.mark.parametrize("failure", ["staged record", "torn large record"])
def test_after_a_failed_write_only_repair_ends_the_segment(tmp_path, monkeypatch, failure):
    """A journal write fails (cache disk full): a small record may be left in the staging
    buffer, or a large one half on the disk after the last whole record. Until the session's
    end cuts the segment back, the monitor's age-based seal must leave it alone: sealing would
    flush and count the staged record, or hand torn bytes over for upload."""
    j = MachineJournal(tmp_path, M, max_segment_bytes=1 << 30, max_segment_age=0)
    real_pwrite = fileio.pwrite
    armed = [False]

    def failing_pwrite(fd: int, data, offset: int) -> int:
        if armed[0]:
            if failure == "torn large record" and len(data) > 64 << 10:
                armed[0] = "half written"
                return real_pwrite(fd, memoryview(data)[:len(data) // 2 // 4096 * 4096], offset)
            if failure == "staged record" or armed[0] == "half written":
                armed[0] = False
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(fileio, "pwrite", failing_pwrite)
    # The writer held as it starts handling the failure (the journal lock is released by then):
    # the monitor's seal comes in there.
    failing, go_on, real_fail = threading.Event(), threading.Event(), GroupCommit._fail

    def held_fail(self, e):
        failing.set()
        go_on.wait(10)
        real_fail(self, e)

    monkeypatch.setattr(GroupCommit, "_fail", held_fail)
    c = GroupCommit(j, on_sealed=lambda s: None, max_queued_bytes=8 << 20)
    try:
        put(c, F.Kind.DATA, 1, b"a" * 4096)
        assert c.wait_durable() == 1
        armed[0] = True
        put(c, F.Kind.DATA, 2, b"b" * (4096 if failure == "staged record" else 256 << 10))
        assert failing.wait(10)
        assert j.seal_if_old() is None and list(j.dir.glob("*.sealed")) == []
        go_on.set()
        with pytest.raises(OSError, match="No space left"):
            c.wait_durable()
        assert j.seal_if_old() is None and list(j.dir.glob("*.sealed")) == []
    finally:
        go_on.set()
        c.close()  # repairs: the segment ends at the last durable record
    sealed = list(j.dir.glob("*.sealed"))
    assert len(sealed) == 1 and valid_prefix(sealed[0].read_bytes())[0] == sealed[0].stat().st_size
    assert records(j) == [(1, b"a" * 4096)] and j.last_seq == 1
    assert MachineJournal(tmp_path, M, 1 << 30, 60).last_seq == 1


def test_the_sync_thread_fsyncs_a_file_opened_anew_not_a_dup(tmp_path):
    """A write-back error is reported once per open file: on a dup of the journal's descriptor
    the sync thread's fsync would take it, and the seal's fsync of the same segment would
    succeed and count records the disk lost. Separate open files keep separate offsets."""
    j = MachineJournal(tmp_path, M, max_segment_bytes=1 << 30, max_segment_age=60)
    with j.lock:
        r = F.encode(F.Frame(F.Kind.DATA, M, seq=1, payload=b"a" * 4096))
        j.append(F.decode_header(r[:F.HEADER_SIZE]), RecordBuffer.of(r[:F.HEADER_SIZE], r[F.HEADER_SIZE:]))
        fd = j.sync_handle()
    try:
        os.lseek(fd, 100, os.SEEK_SET)
        assert os.lseek(j._fd, 0, os.SEEK_CUR) == 0
        os.fsync(fd)
    finally:
        os.close(fd)
