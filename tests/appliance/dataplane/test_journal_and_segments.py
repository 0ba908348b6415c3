"""Journal on the cache disk (durability, sealing, torn-tail recovery) and the segment format
(split per disk, zstd + AES-256-GCM bound to the blob's name and key id)."""
from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
import uuid
from pathlib import Path

import pytest
from replication_appliance.dataplane import frames as F
from replication_appliance.dataplane.segment import (
    SEGMENT_ALIGN,
    SegmentError,
    iter_records,
    seal,
    split_by_disk,
    unseal,
    valid_prefix,
)
from replication_appliance.process_server import journal as journal_module
from replication_appliance.process_server.journal import (
    Journals,
    MachineJournal,
    RecordBuffer,
    read_state,
)

M = uuid.uuid4()


def rec(kind, seq, disk=0, offset=0, payload=b""):
    raw = F.encode(F.Frame(kind, M, disk=disk, seq=seq, offset=offset, payload=payload))
    return F.decode_header(raw[:F.HEADER_SIZE]), raw[:F.HEADER_SIZE], raw[F.HEADER_SIZE:]


def append(j: MachineJournal, *records):
    with j.lock:
        for h, hb, p in records:
            j.append(h, RecordBuffer.of(hb, p))
        return j.sync()


def test_seal_on_marker_and_size_and_state(tmp_path):
    j = MachineJournal(tmp_path, M, max_segment_bytes=3 * 4096, max_segment_age=60)
    assert append(j, rec(F.Kind.DATA, 1, payload=b"a" * 4096)) is None
    sealed = append(j, rec(F.Kind.DATA, 2, payload=b"b" * 4096), rec(F.Kind.DATA, 3, payload=b"c" * 4096))
    assert sealed is not None and sealed.segno == 0 and sealed.path.suffix == ".sealed"
    sealed = append(j, rec(F.Kind.DATA, 4, payload=b"d" * 512), rec(F.Kind.MARKER, 5, offset=123, payload=b"m1"))
    assert sealed is not None and sealed.segno == 1
    state = read_state(j.dir)
    assert (state.last_marker_seq, state.last_marker_id, state.last_marker_time_ns, state.next_segno) == (5, "m1", 123, 2)
    assert [s.segno for s in j.pending()] == [0, 1]
    # after the segments are uploaded and deleted, the sequence survives a restart
    for s in j.pending():
        s.path.unlink()
    assert MachineJournal(tmp_path, M, 1 << 20, 60).last_seq == 5


def test_seal_by_age(tmp_path):
    j = MachineJournal(tmp_path, M, max_segment_bytes=1 << 20, max_segment_age=0.05)
    append(j, rec(F.Kind.DATA, 1, payload=b"a" * 512))
    assert j.pending() == []
    time.sleep(0.1)
    assert j.seal_if_old() is not None
    assert [s.segno for s in j.pending()] == [0]


def test_torn_tail_is_cut_back_and_sealed(tmp_path):
    j = MachineJournal(tmp_path, M, max_segment_bytes=1 << 20, max_segment_age=60)
    append(j, rec(F.Kind.DATA, 1, payload=b"a" * 4096), rec(F.Kind.DATA, 2, payload=b"b" * 4096))
    open_file = next(j.dir.glob("*.open"))
    good = open_file.stat().st_size
    # a crash in the middle of the next record's write: half a header and payload
    _, hb, p = rec(F.Kind.DATA, 3, payload=b"c" * 4096)
    with open(open_file, "ab") as f:
        f.write((hb + p)[:3000])
    os.close(j._fd)  # simulate the process dying (no seal)
    j2 = Journals(tmp_path, 1 << 20, 60).get(M)
    assert j2.last_seq == 2 and j2.recovered_torn_bytes == 3000
    [seg] = j2.pending()
    assert seg.size == good
    assert [r.header.seq for r in iter_records(seg.path.read_bytes())] == [1, 2]


def test_corrupt_record_in_the_middle_ends_the_valid_prefix():
    a = b"".join(rec(F.Kind.DATA, s, payload=bytes([s]) * 512)[1] + rec(F.Kind.DATA, s, payload=bytes([s]) * 512)[2]
                 for s in (1, 2, 3))
    bad = bytearray(a)
    bad[F.HEADER_SIZE + 512 + F.HEADER_SIZE + 10] ^= 0xFF  # payload of record 2
    assert valid_prefix(bytes(bad)) == (F.HEADER_SIZE + 512, 1)


def test_split_by_disk_keeps_markers_everywhere():
    parts = [rec(F.Kind.DATA, 1, disk=0, payload=b"0" * 512), rec(F.Kind.DATA, 2, disk=1, payload=b"1" * 512),
             rec(F.Kind.MARKER, 3, payload=b"m"), rec(F.Kind.DATA, 4, disk=1, payload=b"1" * 1024)]
    raw = b"".join(hb + p for _, hb, p in parts)
    d0, d1, d2 = split_by_disk(raw, 3)
    assert [r.header.seq for r in iter_records(d0)] == [1, 3]
    assert [r.header.seq for r in iter_records(d1)] == [2, 3, 4]
    assert [r.header.seq for r in iter_records(d2)] == [3]
    with pytest.raises(SegmentError, match="corrupt at byte"):
        split_by_disk(raw + b"junk", 3)


def test_sealed_blob_is_compressed_encrypted_and_bound_to_its_name():
    key, other = os.urandom(32), os.urandom(32)
    plain = b"the quick brown fox jumps over the lazy dog. " * 2000
    name = "logs/m/0/000000000001.log"
    blob = seal(plain, key, name, "k1", 7, 1 << 20, level=3)
    assert len(blob) < len(plain) // 10 and b"quick brown" not in blob
    assert unseal(blob, key, name, "k1", 7, 1 << 20) == plain
    for args, why in (((blob, other, name, "k1", 7, 1 << 20), "wrong key"),
                      ((blob, key, "logs/m/0/000000000002.log", "k1", 7, 1 << 20), "moved to another name"),
                      ((blob, key, name, "k2", 7, 1 << 20), "other key id"),
                      ((blob, key, name, "k1", 10**18, 1 << 20), "metadata's last sequence altered"),
                      ((blob, key, name, "k1", 7, 2 << 20), "metadata's disk size altered"),
                      ((blob, key, name, "k1", 7, None), "passed off as format 2, without a size"),
                      ((blob[:-1] + bytes([blob[-1] ^ 1]), key, name, "k1", 7, 1 << 20), "altered")):
        with pytest.raises(SegmentError, match="fails authentication"):
            unseal(*args)
    # format 2 (earlier versions: no size) still opens, and cannot be given a size
    v2 = seal(plain, key, name, "k1", 7, None)
    assert unseal(v2, key, name, "k1", 7, None) == plain
    with pytest.raises(SegmentError, match="fails authentication"):
        unseal(v2, key, name, "k1", 7, 1 << 20)
    with pytest.raises(SegmentError, match="zstd level 9 is not allowed"):
        seal(plain, key, "n", "k", 1, 512, level=9)


def padded(raw: bytes) -> bytes:
    return raw + bytes(-len(raw) % SEGMENT_ALIGN)


def test_zero_padding_after_a_record_is_skipped_and_kept_out_of_blobs():
    (_, h1, p1), (_, h2, p2), (_, h3, p3) = (rec(F.Kind.DATA, s, disk=s % 2, payload=bytes([s]) * 512) for s in (1, 2, 3))
    segment = padded(h1 + p1) + padded(h2 + p2 + h3 + p3)  # as two direct writes leave it
    assert [r.header.seq for r in iter_records(segment)] == [1, 2, 3]
    assert valid_prefix(segment) == (len(segment), 3)  # trailing padding belongs to the valid part
    d0, d1 = split_by_disk(segment, 2)
    assert (d0, d1) == (h2 + p2, h1 + p1 + h3 + p3)  # records back to back, no padding
    # a torn record after the padding is still cut off
    assert valid_prefix(segment + (h1 + p1)[:100]) == (len(segment), 3)
    # a "padding" with anything but zeros in it is not padding: the valid prefix ends before it
    dirty = bytearray(padded(h1 + p1) + h2 + p2)
    dirty[len(h1 + p1) + 7] = 1
    assert valid_prefix(bytes(dirty)) == (len(h1 + p1), 1)
    with pytest.raises(SegmentError, match="corrupt at byte"):
        split_by_disk(bytes(dirty), 2)


def open_segment_flags(j: MachineJournal) -> int:
    """The open flags of the descriptor this process holds on the journal's open segment."""
    open_path = next(j.dir.glob("*.open")).resolve()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == str(open_path):
                return int(Path(f"/proc/self/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8)
    raise AssertionError("no descriptor on the open segment")


def test_segments_are_written_with_direct_io_in_aligned_writes(tmp_path):
    j = MachineJournal(tmp_path, M, max_segment_bytes=1 << 30, max_segment_age=60)
    big, small = b"B" * (256 * 1024), b"s" * 512
    append(j, rec(F.Kind.DATA, 1, payload=small), rec(F.Kind.DATA, 2, payload=big), rec(F.Kind.DATA, 3, payload=small))
    assert open_segment_flags(j) & os.O_DIRECT, "the page cache was not bypassed"
    segment = next(j.dir.glob("*.open")).read_bytes()
    assert len(segment) % SEGMENT_ALIGN == 0
    assert [(r.header.seq, bytes(r.payload)) for r in iter_records(segment)] == [(1, small), (2, big), (3, small)]
    j.close()


def test_without_direct_io_the_journal_goes_through_the_page_cache(tmp_path, monkeypatch):
    real_open = journal_module.os.open

    def refuse_direct(path, flags, mode=0o777):  # what a file system without O_DIRECT answers
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, mode)

    monkeypatch.setattr(journal_module.os, "open", refuse_direct)
    j = MachineJournal(tmp_path, M, max_segment_bytes=1 << 30, max_segment_age=60)
    append(j, rec(F.Kind.DATA, 1, payload=b"a" * 4096), rec(F.Kind.DATA, 2, payload=b"b" * 200_704))
    assert not open_segment_flags(j) & os.O_DIRECT
    [sealed] = [j.seal()]
    assert [r.header.seq for r in iter_records(sealed.path.read_bytes())] == [1, 2]


def test_a_segment_killed_before_its_first_write_is_sealed_empty_so_numbers_stay_consecutive(tmp_path):
    j = MachineJournal(tmp_path, M, max_segment_bytes=1 << 20, max_segment_age=60)
    append(j, rec(F.Kind.DATA, 1, payload=b"a" * 4096), rec(F.Kind.MARKER, 2, payload=b"m"))  # seals segment 0
    # the next record was only staged in memory when the process died: its segment file is empty
    h, hb, payload = rec(F.Kind.DATA, 3, payload=b"b" * 4096)
    with j.lock:
        j.append(h, RecordBuffer.of(hb, payload))
    assert next(j.dir.glob("*.open")).stat().st_size == 0
    j2 = MachineJournal(tmp_path, M, 1 << 20, 60)
    assert [(s.segno, s.size) for s in j2.pending()] == [(0, SEGMENT_ALIGN * 2), (1, 0)]
    assert j2.last_seq == 2
    append(j2, rec(F.Kind.DATA, 3, payload=b"c" * 4096), rec(F.Kind.MARKER, 4, payload=b"n"))
    assert [s.segno for s in j2.pending()] == [0, 1, 2]
    assert split_by_disk(j2.pending()[1].path.read_bytes(), 2) == [b"", b""]  # uploads as empty blobs


def test_a_crash_between_a_seal_and_its_state_is_caught_up_at_restart(tmp_path):
    """Sealing renames the segment, then writes state.json: a crash in between leaves the state
    behind. The sealed segment is the truth; if the restart did not write that down, the
    sequence would go back once the segment is uploaded and deleted (and apply would then skip
    the agent's next frames as already applied)."""
    j = MachineJournal(tmp_path, M, 1 << 20, 60)
    append(j, rec(F.Kind.DATA, 1, payload=b"a" * 4096), rec(F.Kind.MARKER, 2, offset=7, payload=b"m2"))
    stale = (j.dir / "state.json").read_bytes()
    append(j, rec(F.Kind.DATA, 3, payload=b"b" * 4096), rec(F.Kind.MARKER, 4, offset=9, payload=b"m4"))
    (j.dir / "state.json").write_bytes(stale)  # as if the crash came before the second state write
    restarted = MachineJournal(tmp_path, M, 1 << 20, 60)
    assert restarted.last_seq == 4
    state = read_state(j.dir)
    assert (state.last_sealed_seq, state.last_marker_seq, state.last_marker_id, state.next_segno) == (4, 4, "m4", 2)
    for s in restarted.pending():  # uploaded
        s.path.unlink()
    assert MachineJournal(tmp_path, M, 1 << 20, 60).last_seq == 4


def test_a_restart_reads_only_the_segments_its_state_has_not_counted(tmp_path, monkeypatch):
    """A long storage outage leaves hundreds of GB sealed in the cache: a restart must not read
    them all before the port opens. Those numbered below the stored next segment were counted
    when that state was written; only one sealed after it (a crash mid-seal) is read."""
    j = MachineJournal(tmp_path, M, 1 << 20, 60)
    for seq in range(1, 7, 2):
        append(j, rec(F.Kind.DATA, seq, payload=b"a" * 4096), rec(F.Kind.MARKER, seq + 1, offset=seq, payload=b"m"))
    stale = (j.dir / "state.json").read_bytes()
    append(j, rec(F.Kind.DATA, 7, payload=b"b" * 4096), rec(F.Kind.MARKER, 8, offset=9, payload=b"m8"))
    (j.dir / "state.json").write_bytes(stale)  # the crash came before segment 3's state write
    read: list[str] = []
    real_read_bytes = Path.read_bytes

    def noting_read_bytes(path: Path) -> bytes:
        read.append(path.name)
        return real_read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", noting_read_bytes)
    restarted = MachineJournal(tmp_path, M, 1 << 20, 60)
    assert [n for n in read if n.endswith(".sealed")] == ["000000000003.sealed"]
    assert restarted.last_seq == 8 and read_state(j.dir).last_marker_id == "m8"
    assert [s.segno for s in restarted.pending()] == [0, 1, 2, 3]  # every one still goes up


def test_an_older_pending_segment_does_not_turn_the_last_marker_back(tmp_path):
    j = MachineJournal(tmp_path, M, 1 << 20, 60)
    append(j, rec(F.Kind.MARKER, 1, offset=5, payload=b"m1"))
    append(j, rec(F.Kind.MARKER, 2, offset=6, payload=b"m2"))
    next(p for p in j.pending() if p.segno == 1).path.unlink()  # the newer one uploaded, the older not yet
    MachineJournal(tmp_path, M, 1 << 20, 60)
    assert read_state(j.dir).last_marker_id == "m2"


def test_a_failed_segment_open_takes_no_segment_number(tmp_path, monkeypatch):
    """Apply goes by consecutive segment numbers: one taken by a failed open would stall it."""
    j = MachineJournal(tmp_path, M, 1 << 20, 60)
    real, failures = journal_module.fileio.open_fd, [errno.EMFILE, errno.EMFILE]  # direct I/O, then without

    def open_fd(*args, **kwargs):
        if failures:
            raise OSError(failures.pop(), "Too many open files")
        return real(*args, **kwargs)

    monkeypatch.setattr(journal_module.fileio, "open_fd", open_fd)
    with pytest.raises(OSError):
        append(j, rec(F.Kind.DATA, 1, payload=b"a" * 4096))
    sealed = append(j, rec(F.Kind.DATA, 1, payload=b"a" * 4096), rec(F.Kind.MARKER, 2, payload=b"m"))
    assert sealed is not None and sealed.segno == 0


def test_after_a_failure_the_journal_is_cut_back_to_its_last_durable_record(tmp_path):
    """Records appended after the last fsync may not be on the disk when a write or fsync
    fails: repair cuts them away, so the sequence the next session announces is one that is
    durable, and the agent resends the rest."""
    j = MachineJournal(tmp_path, M, 1 << 20, 60)
    append(j, rec(F.Kind.DATA, 1, payload=b"a" * 4096), rec(F.Kind.MARKER, 2, offset=3, payload=b"m2"))
    append(j, rec(F.Kind.DATA, 3, payload=b"b" * 4096))  # durable (fsynced), segment 1 open
    with j.lock:
        for r in (rec(F.Kind.DATA, 4, payload=b"c" * 512), rec(F.Kind.MARKER, 5, offset=4, payload=b"m5"),
                  rec(F.Kind.DATA, 6, payload=b"d" * 65536)):
            j.append(r[0], RecordBuffer.of(r[1], r[2]))  # appended, never fsynced
    assert j.last_seq == 6
    j.mark_broken(3)
    sealed = j.repair()
    assert j.last_seq == 3 and j.broken_at is None
    assert sealed is not None and sealed.segno == 1 and [r.header.seq for r in iter_records(sealed.path.read_bytes())] == [3]
    state = read_state(j.dir)
    assert (state.last_sealed_seq, state.last_marker_seq, state.last_marker_id, state.next_segno) == (3, 2, "m2", 2)
    assert MachineJournal(tmp_path, M, 1 << 20, 60).last_seq == 3  # and so after a restart
    assert append(j, rec(F.Kind.DATA, 4, payload=b"c" * 512)) is None and j.last_seq == 4


def test_a_repair_that_fails_is_done_again_in_full_by_the_next(tmp_path, monkeypatch):
    """The disk still failing when the journal is repaired: the open segment must be cut and
    sealed by a later repair, not forgotten (apply would wait for its number, and a restart
    would seal records the agent was told to resend)."""
    j = MachineJournal(tmp_path, M, 1 << 20, 60)
    append(j, rec(F.Kind.DATA, 1, payload=b"a" * 4096))  # durable, segment 0 open
    with j.lock:
        r = rec(F.Kind.DATA, 2, payload=b"b" * 65536)
        j.append(r[0], RecordBuffer.of(r[1], r[2]))  # never fsynced
    j.mark_broken(1)
    real_seal_cut = MachineJournal._seal_cut

    def failing_once(self, open_path, end):
        monkeypatch.setattr(MachineJournal, "_seal_cut", real_seal_cut)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(MachineJournal, "_seal_cut", failing_once)
    with pytest.raises(OSError, match="Input/output"):
        j.repair()
    sealed = j.repair()
    assert sealed is not None and sealed.segno == 0 and [r.header.seq for r in iter_records(sealed.path.read_bytes())] == [1]
    assert list(j.dir.glob("*.open")) == [] and j.last_seq == 1
    assert append(j, rec(F.Kind.DATA, 2, payload=b"c" * 512)) is None and j.last_seq == 2
    assert [p.name for p in j.dir.glob("*.open")] == ["000000000001.open"]


def test_each_segment_keeps_the_disk_sizes_its_records_were_checked_against(tmp_path):
    """A session with other sizes (registered again, a disk resized) seals the open segment
    first; the sizes stay with each segment through a restart, and go with it when uploaded."""
    j = MachineJournal(tmp_path, M, 1 << 20, 60)
    assert j.begin_session((8192,)) is None  # nothing open
    append(j, rec(F.Kind.DATA, 1, payload=b"a" * 4096))
    assert j.begin_session((8192,)) is None  # the same sizes (a reconnect): the segment goes on
    append(j, rec(F.Kind.DATA, 2, payload=b"b" * 4096))
    with j.lock:
        j.sync()
    first = j.begin_session((16384,))
    assert first is not None and first.disk_sizes == (8192,) and [r.header.seq for r in iter_records(first.path.read_bytes())] == [1, 2]
    append(j, rec(F.Kind.DATA, 3, offset=8192, payload=b"c" * 4096))
    with j.lock:
        j.sync()
    j.close()  # sealed at 16384
    restarted = MachineJournal(tmp_path, M, 1 << 20, 60)
    assert [(s.segno, s.disk_sizes) for s in restarted.pending()] == [(0, (8192,)), (1, (16384,))]
    first.remove()
    assert [p.name for p in sorted(j.dir.iterdir()) if p.suffix in (".sealed", ".sizes")] == [
        "000000000001.sealed", "000000000001.sizes"]
    # a sizes file outliving its segment (a crash between the two deletions) goes at the next start
    (j.dir / "000000000000.sizes").write_text("[8192]")
    MachineJournal(tmp_path, M, 1 << 20, 60)
    assert not (j.dir / "000000000000.sizes").exists() and (j.dir / "000000000001.sizes").exists()


def test_sizes_of_a_repaired_segment_are_kept(tmp_path):
    j = MachineJournal(tmp_path, M, 1 << 20, 60)
    j.begin_session((8192,))
    append(j, rec(F.Kind.DATA, 1, payload=b"a" * 4096))
    with j.lock:
        j.sync()
    append(j, rec(F.Kind.DATA, 2, payload=b"b" * 4096))
    j.mark_broken(1)  # the write of 2 failed
    sealed = j.repair()
    assert sealed is not None and sealed.disk_sizes == (8192,) and j.last_seq == 1


def state_write_fails(path, data):
    raise OSError(errno.ENOSPC, "No space left on device")


def seal_with_the_state_write_failing(j: MachineJournal, monkeypatch, sizes: tuple[int, ...]) -> None:
    """A session with other sizes seals the open segment, and its state.json write fails."""
    real_write = journal_module._write_json_atomic
    monkeypatch.setattr(journal_module, "_write_json_atomic", state_write_fails)
    with pytest.raises(OSError):
        j.begin_session(sizes)
    monkeypatch.setattr(journal_module, "_write_json_atomic", real_write)


def test_a_seal_that_fails_halfway_is_finished_by_repair_or_handed_over_later(tmp_path, monkeypatch):
    """The rename fails: the segment, closed, is neither left behind for a second open one nor
    lost; the next repair seals it whole. The state write after the rename fails: the sealed
    segment is marked for handover (the monitor submits the pending ones)."""
    j = MachineJournal(tmp_path, M, 1 << 20, 60)
    j.begin_session((8192,))
    append(j, rec(F.Kind.DATA, 1, payload=b"a" * 4096))
    real_replace = os.replace

    def rename_fails(src, dst):
        if str(src).endswith(".open"):
            raise OSError(errno.EIO, "I/O error")
        return real_replace(src, dst)

    monkeypatch.setattr(journal_module.os, "replace", rename_fails)
    with pytest.raises(OSError):
        j.begin_session((16384,))
    monkeypatch.setattr(journal_module.os, "replace", real_replace)
    assert j.broken_at == 1 and [p.name for p in j.dir.glob("*.open")] == ["000000000000.open"]
    with pytest.raises(OSError, match="not repaired"):  # a session still running (the monitor's seal failed)
        append(j, rec(F.Kind.DATA, 2, payload=b"b" * 4096))
    sealed = j.repair()  # as the next session starts
    assert sealed is not None and sealed.segno == 0 and sealed.disk_sizes == (8192,) and j.last_seq == 1
    assert [r.header.seq for r in iter_records(sealed.path.read_bytes())] == [1]
    assert sorted(p.name for p in j.dir.glob("*.open")) == []

    j.begin_session((16384,))
    append(j, rec(F.Kind.DATA, 2, payload=b"b" * 4096))
    seal_with_the_state_write_failing(j, monkeypatch, (8192,))
    real_write = journal_module._write_json_atomic
    assert j.handover_due and [(s.segno, s.disk_sizes) for s in j.pending()] == [(0, (8192,)), (1, (16384,))]
    # Handed over (uploaded, deleted) only once state.json counts them: a restart after that
    # must not give their numbers and sequences out again.
    monkeypatch.setattr(journal_module, "_write_json_atomic", state_write_fails)
    with pytest.raises(OSError):
        j.take_handover()
    monkeypatch.setattr(journal_module, "_write_json_atomic", real_write)
    handed = j.take_handover()
    assert [s.segno for s in handed] == [0, 1] and not j.handover_due and j.take_handover() == []
    for s in handed:
        s.remove()
    restarted = MachineJournal(tmp_path, M, 1 << 20, 60)
    assert (restarted.last_seq, restarted.state.next_segno) == (2, 2)


def test_a_journal_is_drained_only_with_nothing_open_waiting_or_broken(tmp_path, monkeypatch):
    """What a resync's readiness asks. A seal under way (segment closed, not yet renamed
    `.sealed`) must not look drained: the replica's digests would be taken without that
    segment, whose data is applied after them and may undo a block the resync skipped."""
    j = MachineJournal(tmp_path, M, 1 << 20, 60)
    assert j.drained()
    append(j, rec(F.Kind.DATA, 1, payload=b"a" * 4096))
    assert not j.drained()  # open
    renaming, go_on, real_replace = threading.Event(), threading.Event(), os.replace

    def slow_rename(src, dst):
        renaming.set()
        go_on.wait(10)
        real_replace(src, dst)

    monkeypatch.setattr(journal_module.os, "replace", slow_rename)
    sealing = threading.Thread(target=j.seal)
    sealing.start()
    assert renaming.wait(10)
    answers: list[bool] = []
    asking = threading.Thread(target=lambda: answers.append(j.drained()))
    asking.start()
    asking.join(0.5)  # waits for the seal (the old check answered at once: drained)
    go_on.set()
    asking.join(10)
    sealing.join(10)
    assert answers == [False]  # sealed, waiting for upload
    monkeypatch.setattr(journal_module.os, "replace", real_replace)
    for seg in j.pending():
        seg.remove()
    assert j.drained()
    append(j, rec(F.Kind.DATA, 2, payload=b"b" * 4096))

    def failing_rename(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(journal_module.os, "replace", failing_rename)
    with pytest.raises(OSError):
        j.seal()
    monkeypatch.setattr(journal_module.os, "replace", real_replace)
    assert not j.drained()  # closed, not sealed: it waits for a repair to seal it
    assert j.repair() is not None and not j.drained()


def test_a_seal_whose_fsync_fails_leaves_the_segment_to_repair(tmp_path, monkeypatch):
    """The monitor's seal hears of a write-back error first: the error is reported once, so a
    second seal would succeed and count what the disk lost. The journal is broken at what was
    durable, and repair ends the segment there."""
    j = MachineJournal(tmp_path, M, 1 << 20, 60)
    append(j, rec(F.Kind.DATA, 1, payload=b"a" * 4096))  # fsynced
    with j.lock:
        r = rec(F.Kind.DATA, 2, payload=b"b" * 4096)
        j.append(r[0], RecordBuffer.of(r[1], r[2]))  # not yet
    real_fsync = os.fsync

    def fails_once(fd):
        monkeypatch.setattr(journal_module.os, "fsync", real_fsync)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(journal_module.os, "fsync", fails_once)
    with pytest.raises(OSError, match="Input/output"):
        j.seal()
    assert j.broken_at == 1
    with pytest.raises(OSError, match="not repaired"):
        j.seal()
    sealed = j.repair()
    assert sealed is not None and [r.header.seq for r in iter_records(sealed.path.read_bytes())] == [1]
    assert j.last_seq == 1 and MachineJournal(tmp_path, M, 1 << 20, 60).last_seq == 1


def test_a_broken_journal_hands_nothing_over_and_keeps_its_state_file(tmp_path, monkeypatch):
    """A seal's state write failed (handover due), then a marker's fsync failed: the state in
    memory names that lost marker. Handing over would write it to state.json, and the repair
    would keep it; the handover waits for the repair, which writes the state as it ought to be."""
    j = MachineJournal(tmp_path, M, 1 << 20, 60)
    j.begin_session((8192,))
    append(j, rec(F.Kind.DATA, 1, payload=b"a" * 4096))
    seal_with_the_state_write_failing(j, monkeypatch, (16384,))  # segment 0
    assert j.handover_due
    with j.lock:
        r = rec(F.Kind.MARKER, 2, offset=5, payload=b"lost")
        j.append(r[0], RecordBuffer.of(r[1], r[2]))
    j.mark_broken(1)  # the marker's fsync failed
    stored = read_state(j.dir)
    assert j.take_handover() == [] and read_state(j.dir) == stored
    j.repair()
    assert read_state(j.dir).last_marker_seq != 2 and j.last_seq == 1
    # the repair wrote the state counting segment 0 (and sealed 1, cut back to nothing)
    assert [s.segno for s in j.take_handover()] == [0, 1]


def test_a_journal_new_to_the_cache_numbers_on_from_storage_once_told(tmp_path):
    j = MachineJournal(tmp_path, M, 1 << 20, 60)
    assert j.state.numbering_unknown
    assert MachineJournal(tmp_path, M, 1 << 20, 60).state.numbering_unknown  # a restart does not forget it
    j = MachineJournal(tmp_path, M, 1 << 20, 60)
    assert not j.number_after(-1, 0) and not j.state.numbering_unknown  # storage holds nothing: from 0
    j = MachineJournal(tmp_path / "other", M, 1 << 20, 60)
    assert j.number_after(41, 900)  # storage holds segments up to 41, sequences up to 900
    assert not j.state.numbering_unknown and j.last_seq == 900
    sealed = append(j, rec(F.Kind.DATA, 901, payload=b"a" * 512), rec(F.Kind.MARKER, 902, payload=b"m"))
    assert sealed is not None and sealed.segno == 42
    restarted = MachineJournal(tmp_path / "other", M, 1 << 20, 60)
    assert not restarted.state.numbering_unknown and restarted.last_seq == 902
    assert not restarted.number_after(42, 902)  # storage is where the cache is: nothing moves
    # the machine was served elsewhere meanwhile, and came back: on after that
    assert restarted.number_after(50, 1000) and restarted.last_seq == 1000 and restarted.state.next_segno == 51
    assert MachineJournal(tmp_path / "other", M, 1 << 20, 60).last_seq == 1000


def test_a_journal_holding_data_keeps_its_numbering(tmp_path):
    j = MachineJournal(tmp_path, M, 1 << 20, 60)
    j.number_after(-1, 0)
    append(j, rec(F.Kind.DATA, 1, payload=b"a" * 512))  # an open segment
    assert not j.number_after(9, 99) and j.last_seq == 1


def test_a_journal_with_history_here_is_not_new(tmp_path):
    """A state file of an earlier version (without the field), or segments left by a crash
    before the first state write: the journal numbers on from its own."""
    d = tmp_path / str(M)
    d.mkdir()
    (d / "state.json").write_text('{"next_segno": 7, "last_sealed_seq": 70}')
    assert not MachineJournal(tmp_path, M, 1 << 20, 60).state.numbering_unknown
    other = uuid.uuid4()
    (tmp_path / str(other)).mkdir()
    (tmp_path / str(other) / f"{3:012d}.sealed").write_bytes(b"")
    assert not MachineJournal(tmp_path, other, 1 << 20, 60).state.numbering_unknown
