"""The journal on the cache disk: one per machine, records are the frames as received.

    CACHE/<machine>/<segno>.open     the segment being appended (at most one)
    CACHE/<machine>/<segno>.sealed   closed, waiting for upload (deleted once uploaded)
    CACHE/<machine>/<segno>.sizes    the disk sizes its records were checked against (JSON)
    CACHE/<machine>/state.json       next segment number, last sealed sequence, last marker

A segment's records are all checked against one registration's disk sizes: a session that
starts with other sizes (the machine registered again with a disk resized) seals the open
segment first. The sizes go up with the segment, so apply sizes the replica by them whenever
the segment is uploaded.

Segments are written with direct I/O where the file system allows it (O_DIRECT): a large
record goes from the buffer it was received into straight to the disk, with no copy into the
page cache (on this path that copy cost more CPU than everything else the server does to a
byte but TLS). Direct writes start and end on SEGMENT_ALIGN boundaries, so a write ends with
zero padding (segment.py skips it); small records are gathered into one staging buffer first.
`sync()` fsyncs, and only then does the server acknowledge. After a crash the open segment is
cut back to its last whole, checksum-valid record (a torn tail was never acknowledged) and
sealed."""
from __future__ import annotations

import json
import logging
import mmap
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from ..common import fileio
from ..dataplane.frames import HEADER_SIZE, Header, Kind
from ..dataplane.segment import SEGMENT_ALIGN, prefix_through, valid_prefix

# Records at least this long are written from their own buffer; shorter ones are copied into
# the staging buffer and written together.
DIRECT_RECORD_BYTES = 64 * 1024
STAGING_BYTES = 1024 * 1024
O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux; elsewhere the page cache is used
log = logging.getLogger(__name__)


def aligned(n: int) -> int:
    return -(-n // SEGMENT_ALIGN) * SEGMENT_ALIGN


def aligned_capacity(payload_bytes: int) -> int:
    """The size of a RecordBuffer for a payload of `payload_bytes`."""
    return aligned(HEADER_SIZE + payload_bytes)


def _anonymous_memory(size: int) -> mmap.mmap:
    """Page-aligned memory: private where the platform lets us say so (a shared anonymous
    mapping would be backed by shmem, whose page faults cost more)."""
    if hasattr(mmap, "MAP_PRIVATE"):
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return mmap.mmap(-1, size)


class RecordBuffer:
    """One journal record (frame header + payload) in page-aligned memory, with room for the
    padding a direct write needs: the server receives a payload straight into it."""

    def __init__(self, payload_bytes: int, capacity: int = 0) -> None:
        """Room for a payload of `payload_bytes`, or `capacity` bytes if that is more."""
        self.mem = _anonymous_memory(max(aligned_capacity(payload_bytes), capacity))
        self.view = memoryview(self.mem)
        self.length = HEADER_SIZE + payload_bytes

    @classmethod
    def of(cls, header_bytes: bytes, payload: bytes | memoryview) -> RecordBuffer:
        rec = cls(len(payload))
        rec.view[:HEADER_SIZE] = header_bytes
        rec.view[HEADER_SIZE:rec.length] = payload
        return rec

    @property
    def capacity(self) -> int:
        return len(self.mem)

    def reuse(self, payload_bytes: int) -> None:
        self.length = HEADER_SIZE + payload_bytes

    def payload(self) -> memoryview:
        return self.view[HEADER_SIZE:self.length]

    def set_header(self, header_bytes: bytes | bytearray) -> None:
        self.view[:HEADER_SIZE] = header_bytes

    def padded(self) -> memoryview:
        """The record and zeros up to the next SEGMENT_ALIGN boundary."""
        end = aligned(self.length)
        self.view[self.length:end] = bytes(end - self.length)
        return self.view[:end]


@dataclass
class JournalState:
    next_segno: int = 0
    last_sealed_seq: int = 0
    last_marker_seq: int = 0
    last_marker_id: str = ""
    last_marker_time_ns: int = 0
    # A journal new to this cache numbers on from what storage holds of the machine (uploaded
    # from another cache, or this one before it was replaced): until it has learnt that, the
    # process server opens no session for the machine (False in states written before this
    # was recorded: those journals number on from their own).
    numbering_unknown: bool = False


@dataclass(frozen=True)
class SealedSegment:
    machine: uuid.UUID
    segno: int
    path: Path
    size: int
    disk_sizes: tuple[int, ...] | None = None  # None: not recorded (a segment of an earlier version)

    @classmethod
    def at(cls, machine: uuid.UUID, path: Path, size: int | None = None) -> SealedSegment:
        return cls(machine, int(path.stem), path, path.stat().st_size if size is None else size, _read_sizes(path))

    def remove(self) -> None:
        """Once uploaded: the segment, then its sizes (one left behind goes at the next start)."""
        self.path.unlink()
        self.path.with_suffix(".sizes").unlink(missing_ok=True)


def _read_sizes(segment: Path) -> tuple[int, ...] | None:
    path = segment.with_suffix(".sizes")
    try:
        return tuple(int(n) for n in json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as e:  # damaged (it is written whole): uploaded as an earlier version's
        log.error("%s cannot be read (%s): the segment is uploaded without its disk sizes", path, e)
        return None


def _write_json_atomic(path: Path, data: dict) -> None:
    # durable, folder included: the uploader deletes segments on the strength of this state
    fileio.replace_file(path, json.dumps(data).encode())


def read_state(machine_dir: Path) -> JournalState:
    try:
        return JournalState(**json.loads((machine_dir / "state.json").read_text()))
    except FileNotFoundError:
        return JournalState()


class MachineJournal:
    def __init__(self, root: Path, machine: uuid.UUID, max_segment_bytes: int, max_segment_age: float) -> None:
        self.machine = machine
        self.dir = root / str(machine)
        self.dir.mkdir(parents=True, exist_ok=True)
        new_here = not (self.dir / "state.json").exists() and not any(self.dir.glob("*.open")) \
            and not any(self.dir.glob("*.sealed"))
        self.max_segment_bytes = max_segment_bytes
        self.max_segment_age = max_segment_age
        self.lock = threading.RLock()
        self.state = read_state(self.dir)
        self.state.numbering_unknown = self.state.numbering_unknown or new_here
        self._fd: int | None = None
        self._segno = -1
        self._file_bytes = 0  # written to the open segment (a multiple of SEGMENT_ALIGN)
        self._staging = RecordBuffer(STAGING_BYTES - HEADER_SIZE)
        self._staged = 0  # records copied into the staging buffer, not yet written
        self._opened_at = 0.0
        self._unsynced = False
        self._cut_pending = False  # repair() closed the open segment but could not cut it yet
        self._sizes: tuple[int, ...] | None = None  # of the session appending (None: not given)
        self._open_sizes: tuple[int, ...] | None = None  # the open segment's
        # A seal failed after its rename: the segment is sealed but was never handed over for upload
        self.handover_due = False
        self.last_seq = self.state.last_sealed_seq
        self.durable_seq = 0  # appended and made durable (by an fsync here, or a group commit's)
        self.recovered_torn_bytes = 0
        # After a failed write or fsync: the sequence up to which the journal is known durable;
        # the rest must be cut away (repair()) before anyone is told where the journal ends.
        self.broken_at: int | None = None
        self._recover()
        self.durable_seq = self.last_seq  # whatever recovery kept was fsynced by it

    # -- recovery -------------------------------------------------------------------------
    def _recover(self) -> None:
        # A crash between a seal's rename and its state.json leaves the state behind the
        # sealed segments: they are the truth (so state.json, written below, catches up).
        # Segments numbered below the stored next_segno were sealed and counted before that
        # state was written: only newer ones are read (an upload backlog of hundreds of GB
        # would otherwise be read through before the port opens).
        counted = self.state.next_segno
        for p in sorted(self.dir.glob("*.sealed")):
            segno = int(p.stem)
            if segno < counted:
                continue
            self.state.next_segno = max(self.state.next_segno, segno + 1)
            data = p.read_bytes()
            end, last = valid_prefix(data)
            self.last_seq = max(self.last_seq, last)
            self.state.last_sealed_seq = max(self.state.last_sealed_seq, last)
            self._note_markers(data[:end])
        for p in sorted(self.dir.glob("*.open")):
            data = p.read_bytes()
            end, last = valid_prefix(data)
            self.recovered_torn_bytes += len(data) - end
            self._seal_cut(p, end)
            segno = int(p.stem)
            self.state.next_segno = max(self.state.next_segno, segno + 1)
            # Even with no whole record in it the segment is sealed (and uploaded, empty): the
            # cloud side applies segments by consecutive number and must not wait for a gap.
            self.last_seq = max(self.last_seq, last)
            self._note_markers(data[:end])
            self.state.last_sealed_seq = max(self.state.last_sealed_seq, last)
        for p in self.dir.glob("*.sizes"):  # of a segment uploaded (or never opened, its number untaken)
            if not p.with_suffix(".sealed").exists():
                p.unlink()
        for p in self.dir.glob("*.sizes.tmp"):  # a crash while writing one
            p.unlink()
        fileio.fsync_dir(self.dir)
        _write_json_atomic(self.dir / "state.json", asdict(self.state))

    def _seal_cut(self, open_path: Path, end: int) -> Path:
        """Cut an open segment (not open here) back to `end`, make it durable, seal it: its
        whole records may never have been fsynced (a crash of the process, not the machine)."""
        with open(open_path, "r+b") as f:
            if os.fstat(f.fileno()).st_size != end:
                f.truncate(end)
            os.fsync(f.fileno())
        sealed = open_path.with_suffix(".sealed")
        os.replace(open_path, sealed)
        return sealed

    def mark_broken(self, durable_seq: int) -> None:
        """A write or fsync of this journal failed: only records up to `durable_seq` (made
        durable before the failure) may be trusted; what was appended after may be lost.
        Nothing is written or sealed from then on until `repair()`. Called again as the
        session ends: an fsync already under way may still have made more durable (one
        session at a time, and a session starts by repairing, so the sequence only grows)."""
        with self.lock:
            self.broken_at = durable_seq if self.broken_at is None else max(self.broken_at, durable_seq)

    def repair(self) -> SealedSegment | None:
        """After a failure: cut the open segment back to the last durable record, make that
        durable and seal it, so the journal ends where its acknowledgements did and the agent
        resends the rest (from the WELCOME's sequence). Raises OSError while the disk fails."""
        with self.lock:
            if self.broken_at is None:
                return None
            keep = max(self.broken_at, self.state.last_sealed_seq)  # a sealed segment was fsynced whole
            sealed: SealedSegment | None = None
            if self._fd is not None:
                try:
                    os.close(self._fd)
                except OSError:
                    pass
                self._fd = None
                self._staged = 0
                self._unsynced = False
                # until the cut below succeeds: if it fails (the disk still failing) the next
                # repair must cut this segment, not forget it (apply would wait for its number)
                self._cut_pending = True
            if self._cut_pending:
                open_path = self.dir / f"{self._segno:012d}.open"
                data = open_path.read_bytes()
                end = prefix_through(data, keep)
                path = self._seal_cut(open_path, end)
                self._cut_pending = False
                sealed = SealedSegment.at(self.machine, path, end)
            # markers appended after `keep` never happened: start again from the stored state
            persisted = read_state(self.dir)
            for field in ("last_marker_seq", "last_marker_id", "last_marker_time_ns"):
                setattr(self.state, field, getattr(persisted, field))
            if sealed is not None:
                self._note_markers(data[:end])
            self.last_seq = self.state.last_sealed_seq = self.durable_seq = keep
            fileio.fsync_dir(self.dir)
            _write_json_atomic(self.dir / "state.json", asdict(self.state))
            self.broken_at = None
            return sealed

    def _note_markers(self, data: bytes) -> None:
        from ..dataplane.segment import iter_records

        for rec in iter_records(data):
            if rec.header.kind is Kind.MARKER:
                self._marker(rec.header, rec.payload)

    def _marker(self, h: Header, payload) -> None:
        if h.seq < self.state.last_marker_seq:
            return  # an older segment still waiting for upload
        self.state.last_marker_seq = h.seq
        self.state.last_marker_id = bytes(payload).decode("ascii", "replace")
        self.state.last_marker_time_ns = h.offset

    def number_after(self, stored_segno: int, stored_seq: int) -> bool:
        """Number on after what storage holds of the machine, when that is further than this
        journal got: its newest segment (-1: none) and the newest sequence in it. Else a journal
        new to this cache would number from 0 again, and one the machine comes back to (moved
        away and back, or a cache restored from a backup) from where it left off: below what
        apply has passed, which would skip those records while the agent counts its cycles
        done. Only with nothing in the cache (a segment waiting here keeps its number). Whether
        the numbering moved."""
        with self.lock:
            if self._fd is not None or self.broken_at is not None:
                return False
            moved = stored_segno >= self.state.next_segno or stored_seq > self.state.last_sealed_seq
            if not moved and not self.state.numbering_unknown:
                return False
            self.state.next_segno = max(self.state.next_segno, stored_segno + 1)
            self.state.last_sealed_seq = max(self.state.last_sealed_seq, stored_seq)
            self.last_seq = self.durable_seq = self.state.last_sealed_seq
            self.state.numbering_unknown = False
            _write_json_atomic(self.dir / "state.json", asdict(self.state))
            return moved

    # -- appending ------------------------------------------------------------------------
    def begin_session(self, disk_sizes: tuple[int, ...]) -> SealedSegment | None:
        """A session checks its records against these sizes: an open segment checked against
        others is sealed first (returned), so each segment has one set of sizes."""
        with self.lock:
            sealed = None
            if self._fd is not None and self._open_sizes != tuple(disk_sizes):
                sealed = self.seal()
            self._sizes = tuple(disk_sizes)
            return sealed

    def append(self, h: Header, record: RecordBuffer) -> None:
        """Write one record (not yet durable). Caller holds `lock` across append..sync."""
        if self.broken_at is not None:
            # e.g. the monitor's seal failed under a running session: its segment is closed but
            # not sealed, and a write now would open the next one beside it
            raise OSError(f"the journal of {self.machine} failed and is not repaired yet")
        if self._fd is None:
            self._open_segment()
        if record.length >= DIRECT_RECORD_BYTES:
            self._flush_staging()
            self._write(record.padded())
        else:
            if self._staged + record.length > len(self._staging.mem):
                self._flush_staging()
            self._staging.view[self._staged:self._staged + record.length] = record.view[:record.length]
            self._staged += record.length
        self._unsynced = True
        self.last_seq = h.seq
        if h.kind is Kind.MARKER:
            self._marker(h, record.payload())

    def _open_segment(self) -> None:
        segno = self.state.next_segno
        path = self.dir / f"{segno:012d}.open"
        if self._sizes is not None:  # before the segment: no segment of this version is without them
            fileio.replace_file(path.with_suffix(".sizes"), json.dumps(self._sizes).encode())
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            self._fd = fileio.open_fd(path, flags | O_DIRECT, 0o600)
        except OSError:  # no direct I/O on this file system (tmpfs, say): through the page cache
            path.unlink(missing_ok=True)
            self._fd = fileio.open_fd(path, flags, 0o600)
        # Only now is the number taken: one skipped would stall apply, which goes by number.
        self._segno, self.state.next_segno = segno, segno + 1
        self._open_sizes = self._sizes
        self._file_bytes = self._staged = 0
        self._opened_at = time.monotonic()
        fileio.fsync_dir(self.dir)

    @property
    def _open_bytes(self) -> int:
        return self._file_bytes + self._staged

    def _write(self, data: memoryview) -> None:
        """Append aligned bytes at the segment's end (the position is kept here: direct I/O
        and O_APPEND do not mix everywhere)."""
        assert self._fd is not None
        written = 0
        while written < len(data):
            n = fileio.pwrite(self._fd, data[written:], self._file_bytes + written)
            if n <= 0 or n % SEGMENT_ALIGN:
                raise OSError(f"short write to the journal of {self.machine} ({n} of {len(data) - written} bytes)")
            written += n
        self._file_bytes += written

    def _flush_staging(self) -> None:
        if self._staged:
            self._staging.length = self._staged
            self._write(self._staging.padded())
            self._staged = 0

    def sync(self) -> SealedSegment | None:
        """Make everything appended durable; seal the segment when it is full or ends with a
        marker (so a consistency point reaches storage without waiting). Returns what was sealed."""
        self._fsync_open()
        if self.seal_due():
            return self.seal()
        return None

    def _fsync_open(self) -> None:
        if self._fd is not None and self._unsynced:
            try:
                self._flush_staging()
                os.fsync(self._fd)
            except OSError:
                # A write-back error is reported once: a later fsync would succeed, and a seal
                # count what the disk lost. Only repair() may end this segment now.
                self.mark_broken(self.durable_seq)
                raise
            self._unsynced = False
            self.durable_seq = self.last_seq

    def note_durable(self, seq: int) -> None:
        """A group commit's fsync (of its own descriptor) made everything up to `seq` durable."""
        self.durable_seq = max(self.durable_seq, seq)

    def seal_due(self) -> bool:
        """`sync()` would seal the open segment: it is full or ends with a marker."""
        return self._fd is not None and (self._open_bytes >= self.max_segment_bytes
                                         or self.state.last_marker_seq == self.last_seq)

    def sync_handle(self) -> int:
        """A new descriptor of the open segment, for an fsync outside the lock while appends
        go on (group commit); the caller closes it. Sealing fsyncs too, so a segment sealed
        before that fsync runs loses nothing. Opened anew, not a dup: a write-back error is
        reported once per open file, and the seal's fsync must hear of one the sync thread's
        fsync heard of first (or it would seal, and count, records the disk lost)."""
        assert self._fd is not None
        self._flush_staging()
        return fileio.open_fd(self.dir / f"{self._segno:012d}.open", os.O_RDONLY)

    def seal_if_old(self) -> SealedSegment | None:
        with self.lock:
            if (self._fd is not None and self.broken_at is None
                    and time.monotonic() - self._opened_at >= self.max_segment_age):
                return self.seal()
        return None

    def seal(self) -> SealedSegment | None:
        """Make the open segment durable and hand it over for upload."""
        with self.lock:
            if self._fd is None:
                return None
            if self.broken_at is not None:
                # Sealing would flush what the failed write left staged (or keep a torn record
                # after the last whole one) and count it: only repair() may end this segment.
                raise OSError(f"the journal of {self.machine} failed and is not repaired yet")
            self._fsync_open()
            os.close(self._fd)
            self._fd = None
            open_path = self.dir / f"{self._segno:012d}.open"
            sealed = open_path.with_suffix(".sealed")
            try:
                os.replace(open_path, sealed)
            except OSError:
                # Closed, not sealed: only repair() may end it now (all of it is durable: no cut),
                # or the next write would open another segment beside it.
                self._cut_pending, self.broken_at = True, self.last_seq
                raise
            self.state.last_sealed_seq = self.last_seq
            try:
                fileio.fsync_dir(self.dir)
                _write_json_atomic(self.dir / "state.json", asdict(self.state))
            except OSError:
                self.handover_due = True  # sealed, yet the caller hears of a failure: hand it over later
                raise
            return SealedSegment(self.machine, self._segno, sealed, self._open_bytes, self._open_sizes)

    def take_handover(self) -> list[SealedSegment]:
        """The segments to hand over for upload after a seal failed past its rename, once
        state.json counts them (raises while it cannot be written): uploaded and deleted
        uncounted, a restart would find neither them nor their count, and give their segment
        numbers and sequences out again (the agent resending into numbers apply has passed)."""
        with self.lock:
            if not self.handover_due or self.broken_at is not None:
                # broken: the state here may count records the disk lost (a marker's, say);
                # repair() writes the state as it ought to be, and its session hands them over
                return []
            fileio.fsync_dir(self.dir)
            _write_json_atomic(self.dir / "state.json", asdict(self.state))
            self.handover_due = False
            return self.pending()

    def pending(self) -> list[SealedSegment]:
        found = []
        for p in sorted(self.dir.glob("*.sealed")):
            try:
                found.append(SealedSegment.at(self.machine, p))
            except FileNotFoundError:  # uploaded and removed since the listing
                continue
        return found

    def drained(self) -> bool:
        """Everything received has left the cache: no segment open, none sealed and waiting
        for upload (no listing of them all: asked on every resync request), none left closed
        and unsealed by a failure. Under the lock: a seal under way has closed its segment but
        not yet renamed it, and would be missed."""
        with self.lock:
            return self._fd is None and self.broken_at is None and next(self.dir.glob("*.sealed"), None) is None

    def close(self) -> None:
        """Seal the open segment (cut back first, if a write failed); it is uploaded after the
        next start, like every pending one."""
        with self.lock:
            if self.broken_at is not None:
                self.repair()
            else:
                self.seal()


class Journals:
    """Every machine's journal under one cache directory."""

    def __init__(self, root: Path, max_segment_bytes: int, max_segment_age: float) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._max_bytes = max_segment_bytes
        self._max_age = max_segment_age
        self._journals: dict[uuid.UUID, MachineJournal] = {}
        self._lock = threading.Lock()
        for d in sorted(self.root.iterdir()):
            try:
                machine = uuid.UUID(d.name)
            except ValueError:
                continue
            self.get(machine)

    def get(self, machine: uuid.UUID) -> MachineJournal:
        with self._lock:
            j = self._journals.get(machine)
            if j is None:
                j = self._journals[machine] = MachineJournal(self.root, machine, self._max_bytes, self._max_age)
            return j

    def all(self) -> list[MachineJournal]:
        with self._lock:
            return list(self._journals.values())

    def close(self) -> None:
        for j in self.all():
            try:
                j.close()
            except OSError as e:  # the others still get sealed; this one is repaired at the next start
                log.error("journal of machine %s could not be sealed (%s)", j.machine, e)
