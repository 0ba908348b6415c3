"""Group commit: a connection's thread reads and validates frames, a writer thread appends
them to the journal, and a sync thread fsyncs, so TLS decryption, copying into the page cache
and the cache disk's flushes all proceed at the same time. One fsync covers every record
written before it started; a record is durable (and may be acknowledged) only once such an
fsync has returned, or once its segment was sealed (sealing fsyncs)."""
from __future__ import annotations

import os
import socket
import threading
from collections import deque
from collections.abc import Callable

from ..dataplane.frames import Header, Kind
from .journal import MachineJournal, RecordBuffer, SealedSegment, aligned_capacity

Record = tuple[Header, RecordBuffer]


class GroupCommit:
    def __init__(self, journal: MachineJournal, on_sealed: Callable[[SealedSegment], None],
                 max_queued_bytes: int) -> None:
        self._journal = journal
        self._on_sealed = on_sealed
        self._max_queued = max_queued_bytes
        self._cond = threading.Condition()
        self._records: deque[Record] = deque()
        self._syncs: deque[tuple[int, int, int]] = deque()  # (descriptor to fsync, seq, bytes) written, not yet durable
        self._queued_bytes = 0  # received but not yet durable: bounds what a connection holds
        # record buffers already written to the journal, by capacity: reusing them spares a
        # fresh allocation (page faults) per frame; up to twice max_queued_bytes are kept, as
        # many as can be queued, being received and being written at once
        self._spare: dict[int, list[RecordBuffer]] = {}
        self._spare_bytes = 0
        self._last_queued = journal.last_seq
        self._closing = self._written_all = False
        self._error: OSError | None = None
        self.durable_seq = journal.last_seq
        # a byte arrives here whenever durable_seq advances, so the connection's thread can
        # wait for "more frames or something to acknowledge" in one select()
        self.wakeup, self._wake = socket.socketpair()
        self.wakeup.setblocking(False)
        self._wake.setblocking(False)
        self._threads = [threading.Thread(target=target, name=f"ps-{what}-{journal.machine}", daemon=True)
                         for target, what in ((self._write_loop, "write"), (self._sync_loop, "sync"))]
        for t in self._threads:
            t.start()

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    def record_buffer(self, payload_bytes: int) -> RecordBuffer:
        """A record buffer to receive a payload of `payload_bytes` into (content overwritten)."""
        rec = None
        with self._cond:
            spare = self._spare.get(aligned_capacity(payload_bytes))
            if spare:
                rec = spare.pop()
                self._spare_bytes -= rec.capacity
        if rec is None:
            return RecordBuffer(payload_bytes)
        rec.reuse(payload_bytes)
        return rec

    def put(self, h: Header, record: RecordBuffer) -> None:
        """Queue one validated record; blocks while the queue is full (the socket then stops
        being read and TCP flow control slows the agent)."""
        n = record.length
        with self._cond:
            while self._queued_bytes and self._queued_bytes + n > self._max_queued and self._error is None:
                self._cond.wait()
            self.raise_error()
            self._records.append((h, record))
            self._queued_bytes += n
            self._last_queued = h.seq
            self._cond.notify_all()

    def wait_durable(self) -> int:
        """Wait until everything queued is fsynced; returns the durable sequence."""
        with self._cond:
            while self.durable_seq < self._last_queued and self._error is None:
                self._cond.wait()
            self.raise_error()
            return self.durable_seq

    def close(self) -> None:
        """Commit what is queued (frames that arrived whole are kept when a connection breaks
        mid-batch), then stop the threads."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()
        self.wakeup.close()
        self._wake.close()

    def drain_wakeups(self) -> None:
        try:
            while self.wakeup.recv(4096):
                pass
        except BlockingIOError:
            pass

    def raise_error(self) -> None:
        if self._error is not None:
            raise OSError(f"journal of machine {self._journal.machine} failed: {self._error}") from self._error

    def _fail(self, e: OSError) -> None:
        with self._cond:
            self._error = e
            self._written_all = True
            self._cond.notify_all()
        self._signal()

    def _signal(self) -> None:
        try:
            self._wake.send(b"\0")
        except BlockingIOError:
            pass  # unread wakeups are pending already

    def _durable(self, seq: int, nbytes: int) -> None:
        with self._cond:
            self.durable_seq = max(self.durable_seq, seq)
            self._queued_bytes -= nbytes
            self._cond.notify_all()
        self._signal()

    def _next_batch(self) -> list[Record]:
        with self._cond:
            while not self._records and not self._closing:
                self._cond.wait()
            batch: list[Record] = []
            while self._records:
                batch.append(self._records.popleft())
                if batch[-1][0].kind is Kind.MARKER:
                    break  # a marker ends a batch: its segment is sealed right after it
            return batch

    def _write_loop(self) -> None:
        try:
            while batch := self._next_batch():
                seq, nbytes = batch[-1][0].seq, sum(rec.length for _, rec in batch)
                with self._journal.lock:
                    for h, rec in batch:
                        self._journal.append(h, rec)
                    sealed = self._journal.sync() if self._journal.seal_due() else None
                    fd = None if sealed else self._journal.sync_handle()
                self._keep_spares(batch)
                if sealed is not None:
                    self._on_sealed(sealed)
                    self._durable(seq, nbytes)
                    continue
                with self._cond:
                    self._syncs.append((fd, seq, nbytes))
                    self._cond.notify_all()
        except OSError as e:
            self._fail(e)
            return
        with self._cond:
            self._written_all = True
            self._cond.notify_all()

    def _keep_spares(self, batch: list[Record]) -> None:
        with self._cond:
            for _, rec in batch:
                if self._spare_bytes + rec.capacity <= 2 * self._max_queued:
                    self._spare.setdefault(rec.capacity, []).append(rec)
                    self._spare_bytes += rec.capacity

    def _sync_loop(self) -> None:
        while True:
            with self._cond:
                while not self._syncs and not self._written_all:
                    self._cond.wait()
                if not self._syncs:
                    return
                pending = list(self._syncs)
                self._syncs.clear()
            try:
                # everything in `pending` was written before this fsync starts; the newest
                # descriptor's file holds the records not yet covered by a seal
                os.fsync(pending[-1][0])
            except OSError as e:
                self._fail(e)
            finally:
                for fd, _, _ in pending:
                    os.close(fd)
            if self._error is not None:
                return
            self._durable(pending[-1][1], sum(n for _, _, n in pending))
