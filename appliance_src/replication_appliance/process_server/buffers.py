"""Record buffers shared by every connection of a process server, and the memory they may hold.

A connection receives each DATA payload into a record buffer and its group commit queues it
until it is written and fsynced. Per connection that queue is bounded (`queue_bytes`); this
pool bounds two things across connections, so that a hundred agents replicating at once do
not make the server hold a hundred queues and a hundred sets of spare buffers:

- spare buffers (written to the journal, ready for another payload) are kept up to
  `spare_bytes` in all, and any connection reuses them: a new connection does not pay the
  page faults of fresh memory again, and an idle one holds none. Buffers come in size
  classes (payloads rounded up to an eighth of their power of two, at most 12.5 % more), so
  the odd-sized frames of delta cycles reuse each other's buffers, and when the spares are
  full the ones returned longest ago go first, so the pool follows the traffic instead of
  filling up for good with sizes no longer sent;
- queued bytes in all: above `queued_budget` a connection that already has something queued
  waits (its socket is not read, so TCP slows its agent) until others' records are durable.
  A connection with nothing queued never waits, so every connection makes progress and
  none can starve another; the total stays under the budget plus one frame per connection.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from ..dataplane.frames import HEADER_SIZE
from .journal import RecordBuffer, aligned_capacity

_MIN_STEP = 4096


def class_capacity(payload_bytes: int) -> int:
    """The capacity of the pooled buffer for a payload of `payload_bytes`: the payload rounded
    up to a multiple of an eighth of its power of two (4 KiB at least), plus the header and
    the alignment a direct write needs. A 4 MiB payload's class is exactly its size."""
    step = max(_MIN_STEP, (1 << (max(payload_bytes, 1).bit_length() - 1)) // 8)
    return aligned_capacity(-(-payload_bytes // step) * step)


class RecordBufferPool:
    def __init__(self, spare_bytes: int, queued_budget: int) -> None:
        if spare_bytes < 0 or queued_budget <= 0:
            raise ValueError(f"spare_bytes {spare_bytes} must be >= 0 and queued_budget {queued_budget} > 0")
        self.spare_limit = spare_bytes
        self.queued_budget = queued_budget
        self._cond = threading.Condition()
        self._spare: dict[int, list[RecordBuffer]] = {}  # by capacity, the latest returned last
        self._returned: OrderedDict[int, RecordBuffer] = OrderedDict()  # every spare by id(), oldest first
        self.spare_bytes = 0
        self.queued_bytes = 0
        self.allocated = 0  # buffers made (not taken from the spares): what reuse saves

    def prefill(self, payload_bytes: int, total_bytes: int) -> None:
        """Make spares for payloads of `payload_bytes` up to `total_bytes` now, with their memory
        touched, so the first connections do not fault it in while receiving."""
        capacity = class_capacity(payload_bytes)
        made: list[RecordBuffer] = []
        while ((len(made) + 1) * capacity <= total_bytes
               and self.spare_bytes + (len(made) + 1) * capacity <= self.spare_limit):
            rec = RecordBuffer(payload_bytes, capacity)
            rec.view[::4096] = bytes(len(rec.view[::4096]))  # one write per page
            made.append(rec)
        self.give_back(made)

    def take(self, payload_bytes: int) -> RecordBuffer:
        """A record buffer for a payload of `payload_bytes` (its old content is overwritten)."""
        capacity = class_capacity(payload_bytes)
        with self._cond:
            spare = self._spare.get(capacity)
            rec = spare.pop() if spare else None
            if rec is not None:
                del self._returned[id(rec)]
                self.spare_bytes -= rec.capacity
            else:
                self.allocated += 1
        if rec is None:
            return RecordBuffer(payload_bytes, capacity)
        rec.reuse(payload_bytes)
        return rec

    def give_back(self, records: list[RecordBuffer]) -> None:
        """Buffers whose records are in the journal: kept for reuse; past the limit, the spares
        returned longest ago are let go."""
        with self._cond:
            for rec in records:
                if rec.capacity != class_capacity(rec.length - HEADER_SIZE):
                    continue  # not made by take() (a control frame's): no take() would find it
                self._spare.setdefault(rec.capacity, []).append(rec)
                self._returned[id(rec)] = rec
                self.spare_bytes += rec.capacity
            while self.spare_bytes > self.spare_limit:
                _, old = self._returned.popitem(last=False)
                self._spare[old.capacity].remove(old)
                self.spare_bytes -= old.capacity

    def reserve(self, nbytes: int, connection_queued: Callable[[], int]) -> None:
        """Count `nbytes` as queued; waits while that would exceed the budget and the calling
        connection still has bytes queued (`connection_queued()`, looked at again as they drain).
        Must not be called holding a lock that making records durable needs."""
        with self._cond:
            while self.queued_bytes + nbytes > self.queued_budget and connection_queued():
                self._cond.wait(0.05)
            self.queued_bytes += nbytes

    def release(self, nbytes: int) -> None:
        """`nbytes` reserved earlier are durable (or dropped)."""
        with self._cond:
            self.queued_bytes -= nbytes
            self._cond.notify_all()
