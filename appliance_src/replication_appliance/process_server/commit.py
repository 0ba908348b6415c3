"""Group commit: a connection's thread reads and validates frames, a writer thread appends
them to the journal, and a sync thread fsyncs, so TLS decryption, copying into the page cache
and the cache disk's flushes all proceed at the same time. One fsync covers every record
written before it started; a record is durable (and may be acknowledged) only once such an
fsync has returned, or once its segment was sealed (sealing fsyncs). On Windows, which cannot
rename a file while a descriptor of it is open, the writer fsyncs itself instead."""
from __future__ import annotations

import logging
import os
import socket
import threading
from collections import deque
from collections.abc import Callable

from ..common import fileio
from ..dataplane.frames import Header, Kind
from .buffers import RecordBufferPool
from .journal import MachineJournal, RecordBuffer, SealedSegment

Record = tuple[Header, RecordBuffer]
log = logging.getLogger(__name__)


class GroupCommit:
    def __init__(self, journal: MachineJournal, on_sealed: Callable[[SealedSegment], None],
                 max_queued_bytes: int, pool: RecordBufferPool | None = None) -> None:
        self._journal = journal
        self._on_sealed = on_sealed
        self._max_queued = max_queued_bytes
        # shared with the server's other connections; on its own (tests) as much as this
        # connection can hold: its queue, being received and being written
        self._pool = pool or RecordBufferPool(2 * max_queued_bytes, max_queued_bytes)
        self._cond = threading.Condition()
        self._records: deque[Record] = deque()
        self._syncs: deque[tuple[int, int, int]] = deque()  # (descriptor to fsync, seq, bytes) written, not yet durable
        self._queued_bytes = 0  # received but not yet durable: bounds what a connection holds
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
        return self._pool.take(payload_bytes)

    def put(self, h: Header, record: RecordBuffer) -> None:
        """Queue one validated record; blocks while this connection's queue is full, or the
        server's queues are in all (the socket then stops being read and TCP flow control slows
        the agent)."""
        n = record.length
        # a failed journal never drains: then stop waiting and let raise_error() say why
        self._pool.reserve(n, lambda: self._queued_bytes if self._error is None else 0)
        with self._cond:
            while self._queued_bytes and self._queued_bytes + n > self._max_queued and self._error is None:
                self._cond.wait()
            if self._error is not None:
                self._pool.release(n)
                self.raise_error()
            self._records.append((h, record))
            self._queued_bytes += n
            self._last_queued = h.seq
            self._cond.notify_all()

    def numbered_on(self, seq: int) -> None:
        """The journal's numbering moved on to `seq` before anything was queued here (the
        session's HELLO found storage further than the cache)."""
        with self._cond:
            assert not self._records and not self._syncs
            self._last_queued = self.durable_seq = seq

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
        with self._cond:  # what a failed journal left queued will never be durable
            left, self._queued_bytes = self._queued_bytes, 0
            unsynced, self._syncs = list(self._syncs), deque()
        self._pool.release(left)
        for fd, _, _ in unsynced:  # written after the sync thread failed
            os.close(fd)
        self.wakeup.close()
        self._wake.close()
        if self._error is not None:
            # What was appended after the last durable record may be lost: the journal must
            # end there again before anyone is told where it ends.
            self._journal.mark_broken(self.durable_seq)
            try:
                sealed = self._journal.repair()
            except OSError as e:
                log.error("journal of machine %s could not be repaired (%s): the next session tries again",
                          self._journal.machine, e)
            else:
                if sealed is not None:
                    self._on_sealed(sealed)

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
        # at once, not when the session ends: the monitor's age-based seal must not flush and
        # count what the failed write left staged
        self._journal.mark_broken(self.durable_seq)
        self._signal()

    def _signal(self) -> None:
        try:
            self._wake.send(b"\0")
        except BlockingIOError:
            pass  # unread wakeups are pending already

    def _durable(self, seq: int, nbytes: int) -> None:
        self._journal.note_durable(seq)
        with self._cond:
            self.durable_seq = max(self.durable_seq, seq)
            self._queued_bytes -= nbytes
            self._cond.notify_all()
        self._pool.release(nbytes)
        self._signal()

    def _next_batch(self) -> list[Record]:
        with self._cond:
            while not self._records and not self._closing and self._error is None:
                self._cond.wait()
            batch: list[Record] = []
            if self._error is not None:
                return batch  # after a failed fsync nothing more is written to this journal
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
                    try:
                        for h, rec in batch:
                            self._journal.append(h, rec)
                        if self._journal.seal_due() or not fileio.RENAME_OPEN:
                            # sealing renames the segment, which Windows refuses while the sync
                            # thread holds a descriptor of it: there every fsync is made here
                            fd, sealed = None, self._journal.sync()
                        else:
                            fd, sealed = self._journal.sync_handle(), None
                    except OSError:
                        # before the lock goes: the monitor's age seal would flush and count a
                        # record the failed write left staged, or keep one it left half written
                        self._journal.mark_broken(self.durable_seq)
                        raise
                self._pool.give_back([rec for _, rec in batch])
                if fd is None:
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
