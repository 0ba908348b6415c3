"""Record buffers shared by every connection of a process server, and the memory they may hold.

A connection receives each DATA payload into a record buffer and its group commit queues it
until it is written and fsynced. Per connection that queue is bounded (`queue_bytes`); this
pool bounds two things across connections, so that a hundred agents replicating at once do
not make the server hold a hundred queues and a hundred sets of spare buffers:

- spare buffers (written to the journal, ready for another payload) are kept up to
  `spare_bytes` in all, and any connection reuses them: a new connection does not pay the
  page faults of fresh memory again, and an idle one holds none;
- queued bytes in all: above `queued_budget` a connection that already has something queued
  waits (its socket is not read, so TCP slows its agent) until others' records are durable.
  A connection with nothing queued never waits, so every connection makes progress and
  none can starve another; the total stays under the budget plus one frame per connection.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

from .journal import RecordBuffer, aligned_capacity


class RecordBufferPool:
    def __init__(self, spare_bytes: int, queued_budget: int) -> None:
        if spare_bytes < 0 or queued_budget <= 0:
            raise ValueError(f"spare_bytes {spare_bytes} must be >= 0 and queued_budget {queued_budget} > 0")
        self.spare_limit = spare_bytes
        self.queued_budget = queued_budget
        self._cond = threading.Condition()
        self._spare: dict[int, list[RecordBuffer]] = {}
        self.spare_bytes = 0
        self.queued_bytes = 0
        self.allocated = 0  # buffers made (not taken from the spares): what reuse saves

    def prefill(self, payload_bytes: int, total_bytes: int) -> None:
        """Make spares for payloads of `payload_bytes` up to `total_bytes` now, with their memory
        touched, so the first connections do not fault it in while receiving."""
        capacity = aligned_capacity(payload_bytes)
        made: list[RecordBuffer] = []
        while ((len(made) + 1) * capacity <= total_bytes
               and self.spare_bytes + (len(made) + 1) * capacity <= self.spare_limit):
            rec = RecordBuffer(payload_bytes)
            rec.view[::4096] = bytes(len(rec.view[::4096]))  # one write per page
            made.append(rec)
        self.give_back(made)

    def take(self, payload_bytes: int) -> RecordBuffer:
        """A record buffer for a payload of `payload_bytes` (its old content is overwritten)."""
        with self._cond:
            spare = self._spare.get(aligned_capacity(payload_bytes))
            rec = spare.pop() if spare else None
            if rec is not None:
                self.spare_bytes -= rec.capacity
            else:
                self.allocated += 1
        if rec is None:
            return RecordBuffer(payload_bytes)
        rec.reuse(payload_bytes)
        return rec

    def give_back(self, records: list[RecordBuffer]) -> None:
        """Buffers whose records are in the journal: kept for reuse while under the limit."""
        with self._cond:
            for rec in records:
                if self.spare_bytes + rec.capacity <= self.spare_limit:
                    self._spare.setdefault(rec.capacity, []).append(rec)
                    self.spare_bytes += rec.capacity

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
