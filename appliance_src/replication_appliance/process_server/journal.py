"""The journal on the cache disk: one per machine, records are the frames as received.

    CACHE/<machine>/<segno>.open     the segment being appended (at most one)
    CACHE/<machine>/<segno>.sealed   closed, waiting for upload (deleted once uploaded)
    CACHE/<machine>/state.json       next segment number, last sealed sequence, last marker

Appends go to the page cache; `sync()` fsyncs, and only then does the server acknowledge.
After a crash the open segment is cut back to its last whole, checksum-valid record (a
torn tail was never acknowledged) and sealed."""
from __future__ import annotations

import json
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from ..dataplane.frames import Header, Kind
from ..dataplane.segment import valid_prefix


@dataclass
class JournalState:
    next_segno: int = 0
    last_sealed_seq: int = 0
    last_marker_seq: int = 0
    last_marker_id: str = ""
    last_marker_time_ns: int = 0


@dataclass(frozen=True)
class SealedSegment:
    machine: uuid.UUID
    segno: int
    path: Path
    size: int


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        self.max_segment_bytes = max_segment_bytes
        self.max_segment_age = max_segment_age
        self.lock = threading.RLock()
        self.state = read_state(self.dir)
        self._fd: int | None = None
        self._segno = -1
        self._open_bytes = 0
        self._opened_at = 0.0
        self._unsynced = False
        self.last_seq = self.state.last_sealed_seq
        self.recovered_torn_bytes = 0
        self._recover()

    # -- recovery -------------------------------------------------------------------------
    def _recover(self) -> None:
        for p in sorted(self.dir.glob("*.sealed")):
            segno = int(p.stem)
            self.state.next_segno = max(self.state.next_segno, segno + 1)
            _, last = valid_prefix(p.read_bytes())
            self.last_seq = max(self.last_seq, last)
        for p in sorted(self.dir.glob("*.open")):
            data = p.read_bytes()
            end, last = valid_prefix(data)
            if end < len(data):
                self.recovered_torn_bytes += len(data) - end
                with open(p, "r+b") as f:
                    f.truncate(end)
                    os.fsync(f.fileno())
            segno = int(p.stem)
            self.state.next_segno = max(self.state.next_segno, segno + 1)
            if end == 0:
                p.unlink()
                continue
            self.last_seq = max(self.last_seq, last)
            self._note_markers(data[:end])
            os.replace(p, p.with_suffix(".sealed"))
            self.state.last_sealed_seq = max(self.state.last_sealed_seq, last)
        _fsync_dir(self.dir)
        _write_json_atomic(self.dir / "state.json", asdict(self.state))

    def _note_markers(self, data: bytes) -> None:
        from ..dataplane.segment import iter_records

        for rec in iter_records(data):
            if rec.header.kind is Kind.MARKER:
                self._marker(rec.header, rec.payload)

    def _marker(self, h: Header, payload) -> None:
        self.state.last_marker_seq = h.seq
        self.state.last_marker_id = bytes(payload).decode("ascii", "replace")
        self.state.last_marker_time_ns = h.offset

    # -- appending ------------------------------------------------------------------------
    def append(self, h: Header, header_bytes: bytes, payload: bytes | memoryview) -> None:
        """Write one record (not yet durable). Caller holds `lock` across append..sync."""
        if self._fd is None:
            self._segno = self.state.next_segno
            self.state.next_segno += 1
            self._fd = os.open(self.dir / f"{self._segno:012d}.open", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._open_bytes = 0
            self._opened_at = time.monotonic()
            _fsync_dir(self.dir)
        n = os.writev(self._fd, [header_bytes, payload])
        if n != len(header_bytes) + len(payload):
            raise OSError(f"short write to journal of {self.machine}")
        self._open_bytes += n
        self._unsynced = True
        self.last_seq = h.seq
        if h.kind is Kind.MARKER:
            self._marker(h, payload)

    def sync(self) -> SealedSegment | None:
        """Make everything appended durable; seal the segment when it is full or ends with a
        marker (so a consistency point reaches storage without waiting). Returns what was sealed."""
        if self._fd is not None and self._unsynced:
            os.fsync(self._fd)
            self._unsynced = False
        if self.seal_due():
            return self.seal()
        return None

    def seal_due(self) -> bool:
        """`sync()` would seal the open segment: it is full or ends with a marker."""
        return self._fd is not None and (self._open_bytes >= self.max_segment_bytes
                                         or self.state.last_marker_seq == self.last_seq)

    def sync_handle(self) -> int:
        """A new descriptor of the open segment, for an fsync outside the lock while appends
        go on (group commit); the caller closes it. Sealing fsyncs too, so a segment sealed
        before that fsync runs loses nothing."""
        assert self._fd is not None
        return os.dup(self._fd)

    def seal_if_old(self) -> SealedSegment | None:
        with self.lock:
            if self._fd is not None and time.monotonic() - self._opened_at >= self.max_segment_age:
                if self._unsynced:
                    os.fsync(self._fd)
                    self._unsynced = False
                return self.seal()
        return None

    def seal(self) -> SealedSegment | None:
        with self.lock:
            if self._fd is None:
                return None
            os.close(self._fd)
            self._fd = None
            open_path = self.dir / f"{self._segno:012d}.open"
            sealed = open_path.with_suffix(".sealed")
            os.replace(open_path, sealed)
            self.state.last_sealed_seq = self.last_seq
            _fsync_dir(self.dir)
            _write_json_atomic(self.dir / "state.json", asdict(self.state))
            return SealedSegment(self.machine, self._segno, sealed, self._open_bytes)

    def pending(self) -> list[SealedSegment]:
        return [SealedSegment(self.machine, int(p.stem), p, p.stat().st_size) for p in sorted(self.dir.glob("*.sealed"))]

    def open_bytes(self) -> int:
        return self._open_bytes if self._fd is not None else 0

    def close(self) -> None:
        with self.lock:
            if self._fd is not None:
                os.fsync(self._fd)
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
            j.close()
