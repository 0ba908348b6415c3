"""One replication cycle of every disk: initial replication where it is not finished (resumed
from the last acknowledged checkpoint), a delta pass elsewhere, a resync where the replica may
hold data no digest map describes (map lost, a delta cycle broken off after sending, the
agent's state lost), then a consistency marker. The cycle returns once the process server has
durably acknowledged the marker; only then are the digest maps saved."""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from ..common.errors import ApplianceError
from ..dataplane.digests import (
    BLOCK,
    CHUNK,
    DIGEST,
    ZERO_CHUNK_DIGEST,
    ZERO_DIGEST,
    DigestMap,
    changed_runs,
    chunk_digest,
    digest_blocks,
    digest_extents,
    every_run,
)
from ..dataplane.frames import MAX_DATA, Frame, Kind
from ..dataplane.session import MAX_DIGEST_BLOCKS
from .link import Link, LinkLost, Outbox, ReadBuffer
from .source import DiskReader, SourceError, disk_size
from .state import PHASE_DELTA, PHASE_INITIAL, AgentConfig, DiskState, StateDir

log = logging.getLogger(__name__)
FRAME_BYTES = CHUNK  # a chunk with nothing to skip goes out as one frame
# How far beyond the current chunk initial replication may send before it records a new sent
# limit: one small state write per budget; a resumed pass sends up to a budget again in full.
SENT_BUDGET = 256 * 1024 * 1024


class AcknowledgedDataLost(ApplianceError):
    """The process server no longer holds frames it acknowledged: only a resync repairs the replica."""


@dataclass
class CycleReport:
    marker_id: str = ""
    marker_seq: int = 0
    bytes_read: int = 0
    bytes_skipped: int = 0  # known to be holes of an image file: not read
    bytes_sent: int = 0
    frames: int = 0
    reconnects: int = 0
    throttle_events: int = 0
    phases: list[str] = field(default_factory=list)
    seconds: float = 0.0


class _Acked:
    """How far a pass is acknowledged (advanced from the link's reader thread)."""

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def advance(self, offset: int) -> None:
        self.offset = max(self.offset, offset)


class _Initial:
    """What an initial pass records in the disk state for a restarted agent: the acknowledged
    offset (with the digest map) and the sent limit."""

    def __init__(self, state: StateDir, disk: int, st: DiskState, dmap: DigestMap, size: int, budget: int) -> None:
        self.state, self.disk, self.st, self.dmap, self.size, self.budget = state, disk, st, dmap, size, budget

    def checkpoint(self, acked: int, acked_seq: int) -> None:
        self.st.initial_offset = acked
        self.st.acked_seq = acked_seq  # this cycle's server's (the outbox refuses one that went back)
        self.dmap.save(self.state.digests(self.disk))
        self.state.save_disk(self.disk, self.st)

    def raise_limit(self, pos: int) -> int:
        """Durably allow sending up to a budget beyond `pos` (a chunk's start); the new limit."""
        self.st.sent_limit = min(self.size, pos + self.budget)
        self.state.save_disk(self.disk, self.st)
        return self.st.sent_limit


def _fresh(st: DiskState, dmap: DigestMap | None) -> bool:
    """Nothing recorded of this disk: no map, no progress, no sent limit."""
    return st.phase == PHASE_INITIAL and dmap is None and st.initial_offset == 0 and st.sent_limit == 0


def _needs_resync(st: DiskState, dmap: DigestMap | None, agent_state_lost: bool, server_seq: int) -> bool:
    """Whether the replica may hold data that no digest map describes, or lack data one does: the
    process server reports less (`server_seq`) than it acknowledged for this state (it lost
    durable data: its cache was replaced, or the machine moved before the old cache was
    uploaded); the map is missing (lost, or deleted for a resync) after a delta cycle or after initial replication recorded progress;
    or a delta cycle sent frames and never finished (the map predates them: a block that went
    back to what the map says would not be sent again, and the replica would keep the newer
    data); or the agent's whole state is lost (reinstalled, registered again) while the process
    server already holds sequences of the machine, so an earlier agent's data may be in the
    replica (where the source is zero now, a fresh initial pass would leave it). A disk added
    beside replicated ones starts with an empty replica: initial replication. An initial
    replication with a sent limit but no acknowledged progress restarts instead, sending
    everything below the limit in full."""
    if st.phase == PHASE_DELTA:
        return dmap is None or st.sent_limit > 0 or st.acked_seq > server_seq
    if _fresh(st, dmap):
        return agent_state_lost
    return st.initial_offset > 0 and (dmap is None or st.acked_seq > server_seq)


class Replicator:
    def __init__(self, config: AgentConfig, state: StateDir, connect: Callable[[Outbox], Link],
                 window_bytes: int = 64 * 1024 * 1024, checkpoint_every: float = 2.0,
                 reconnect_for: float = 300.0, frame_bytes: int = FRAME_BYTES, resync_wait: float = 600.0,
                 sent_budget: int = SENT_BUDGET) -> None:
        if frame_bytes % BLOCK or not 0 < frame_bytes <= MAX_DATA:
            raise ValueError(f"frame size {frame_bytes} must be a multiple of {BLOCK} up to {MAX_DATA}")
        if sent_budget % CHUNK or sent_budget <= 0:
            raise ValueError(f"sent budget {sent_budget} must be a positive multiple of {CHUNK}")
        self.config = config
        self.state = state
        self._connect = connect
        self._window = window_bytes
        self._checkpoint_every = checkpoint_every
        self._reconnect_for = reconnect_for
        self._frame_blocks = frame_bytes // BLOCK
        self._resync_wait = resync_wait
        self._sent_budget = sent_budget
        self.link: Link | None = None
        self.outbox = Outbox(window_bytes)
        self.next_seq = 1
        self.report = CycleReport()

    # -- connection -----------------------------------------------------------------------
    def _open(self, fresh: bool = False) -> None:
        """Connect; a fresh cycle continues the machine's sequence from the server's, a
        reconnect replays the outbox (frames not yet queued keep the numbers they were given)."""
        acked = self.outbox.acked  # before this connection's WELCOME (the outbox keeps the highest)
        link = self._connect(self.outbox)
        try:
            if link.server_seq < acked:  # retrying cannot bring those frames back
                raise AcknowledgedDataLost(
                    f"the process server reports sequence {link.server_seq} but had acknowledged {acked}: it lost "
                    "data it had made durable (was its cache disk replaced or restored?). Request a resync of "
                    f"{self.config.hostname} on the appliance (action `resync`), or without a configuration server "
                    f"delete {self.state.root / 'disk-*.digests'}, then run the agent again")
            if fresh:
                self.next_seq = link.server_seq + 1
            link.replay()
        except BaseException:
            link.close()  # a retry must not leave this connection and its two threads behind
            raise
        self.link = link

    def _reconnect(self, why: Exception, fresh: bool = False) -> None:
        deadline = time.monotonic() + self._reconnect_for
        delay = 0.2
        log.warning("no session with the process server (%s); retrying for up to %.0fs", why, self._reconnect_for)
        if self.link is not None:
            self.report.throttle_events += self.link.throttle_events
            self.link.close()
            self.link = None
        while True:
            try:
                self._open(fresh)
                self.report.reconnects += 1
                return
            except (OSError, LinkLost) as e:
                if time.monotonic() > deadline:
                    raise LinkLost(f"process server unreachable for {self._reconnect_for:.0f}s: {e}") from None
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _send(self, frame_kind: Kind, disk: int = 0, offset: int = 0, payload: bytes | memoryview = b"",
              on_ack: Callable[[], None] | None = None, source: ReadBuffer | None = None) -> int:
        seq = self.next_seq
        self.next_seq += 1
        frame = Frame(frame_kind, self.config.machine, disk=disk, seq=seq, offset=offset, payload=payload)
        while True:
            try:
                assert self.link is not None
                self.link.send(frame, on_ack, source)
                break
            except LinkLost as e:
                queued = any(p.seq == seq for p in list(self.outbox.items))
                self._reconnect(e)
                if queued:  # the replay after reconnecting has sent it
                    break
        self.report.frames += 1
        if frame_kind is Kind.DATA:
            self.report.bytes_sent += len(payload)
        return seq

    def _wait(self, seq: int, timeout: float | None = None) -> bool:
        """Whether `seq` was acknowledged within `timeout` (None: wait for it), reconnecting as needed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                assert self.link is not None
                return self.link.wait_acked(seq, None if deadline is None else max(0.0, deadline - time.monotonic()))
            except LinkLost as e:
                self._reconnect(e)

    # -- passes ---------------------------------------------------------------------------
    def _pass(self, disk: int, reader: DiskReader, dmap: DigestMap, start: int, initial: _Initial | None,
              before_sending: Callable[[], None] | None = None) -> None:
        """A delta pass, or with `initial` initial replication from `start` (a chunk boundary).
        `before_sending` runs once, before the pass's first frame goes out."""
        pos = start
        last_save = time.monotonic()
        progress = _Acked(start)
        # Below the recorded sent limit, a resumed initial pass cannot tell what reached the process
        # server after the last checkpoint: it sends every block, zeros and holes included.
        limit = initial.st.sent_limit if initial else 0
        resend_to = limit

        while pos < reader.size:
            want = min(CHUNK, reader.size - pos)
            resend = pos < resend_to
            extents = reader.data_extents(pos, want, BLOCK)
            if (not extents and want == CHUNK and not resend
                    and (initial or dmap.chunk_matches(pos, ZERO_CHUNK_DIGEST))):
                # an image file's unallocated chunk that the replica holds as zeros already (initial
                # replication starts from an all-zero replica): nothing to read, hash or send
                self.report.bytes_skipped += CHUNK
                if initial:
                    dmap.update(pos, ZERO_DIGEST * (CHUNK // BLOCK), ZERO_CHUNK_DIGEST)
                if not self.outbox.items:
                    progress.advance(pos + CHUNK)
                pos += CHUNK
                continue
            # frames are sent from slices of the buffer the chunk is read into (no copy); an image
            # file's holes are not read but filled with the zeros they hold
            buf = self.outbox.read_buffer(CHUNK)
            chunk = reader.read_extents_into(pos, memoryview(buf.data), extents)
            data_bytes = sum(hi - lo for lo, hi in extents)
            self.report.bytes_read += data_bytes
            self.report.bytes_skipped += len(chunk) - data_bytes
            end = pos + len(chunk)
            whole = chunk_digest(chunk)
            if not initial and dmap.chunk_matches(pos, whole):
                self.outbox.release(buf)
                pos = end  # unchanged since it was last sent
                continue
            digests = digest_extents(chunk, [(lo - pos, hi - pos) for lo, hi in extents])
            first_block = pos // BLOCK
            if resend:
                runs = every_run(len(digests) // DIGEST, self._frame_blocks)
            else:
                runs = changed_runs(b"" if initial else bytes(dmap.slice(first_block, len(digests) // DIGEST)),
                                    digests, self._frame_blocks, skip_zero=initial is not None)
            if initial and runs and end > limit:
                limit = initial.raise_limit(pos)  # durable before any of these frames goes out
            if runs and before_sending is not None:
                before_sending()
                before_sending = None
            for i, run in enumerate(runs):
                lo, hi = run.first * BLOCK, min((run.first + run.count) * BLOCK, len(chunk))
                # the chunk's last frame, once acknowledged, covers the whole chunk
                done = (lambda e=end: progress.advance(e)) if i == len(runs) - 1 else None
                self._send(Kind.DATA, disk, pos + lo, chunk[lo:hi], done, buf)
            self.outbox.release(buf)  # the frames sent from it hold it until acknowledged
            if not runs and not self.outbox.items:
                progress.advance(end)  # nothing to send and nothing outstanding
            dmap.update(pos, digests, whole)
            pos = end
            if initial and time.monotonic() - last_save > self._checkpoint_every:
                initial.checkpoint(progress.offset, self.outbox.acked)
                last_save = time.monotonic()
        if initial:
            # the whole disk is read and queued; checkpoints go on while the rest is acknowledged
            while not self._wait(self.next_seq - 1, last_save + self._checkpoint_every - time.monotonic()):
                initial.checkpoint(progress.offset, self.outbox.acked)
                last_save = time.monotonic()

    def _remote_digests(self, disk: int, offset: int, blocks: int) -> bytes:
        """The replica's digests; waits while the appliance is still applying what it received."""
        deadline = time.monotonic() + self._resync_wait
        while True:
            try:
                assert self.link is not None
                digests = self.link.request_digests(disk, offset, blocks)
            except LinkLost as e:
                self._reconnect(e)
                continue
            if digests is not None:
                return digests
            if time.monotonic() > deadline:
                raise LinkLost(f"the replica of disk {disk} did not catch up within {self._resync_wait:.0f}s: "
                               "is `appliance apply` running?")
            time.sleep(1.0)

    def _resync_pass(self, disk: int, reader: DiskReader, dmap: DigestMap) -> None:
        """Compare the source with the replica's digests and send only the blocks that differ."""
        span = MAX_DIGEST_BLOCKS * BLOCK
        for start in range(0, reader.size, span):
            end = min(start + span, reader.size)
            remote = self._remote_digests(disk, start, -(-(end - start) // BLOCK))
            pos = start
            while pos < end:
                chunk = reader.read(pos)[:end - pos]
                self.report.bytes_read += len(chunk)
                digests = digest_blocks(chunk)
                first = (pos - start) // BLOCK * DIGEST
                runs = changed_runs(remote[first:first + len(digests)], digests, self._frame_blocks, skip_zero=False)
                for run in runs:
                    lo, hi = run.first * BLOCK, min((run.first + run.count) * BLOCK, len(chunk))
                    self._send(Kind.DATA, disk, pos + lo, chunk[lo:hi])
                dmap.update(pos, digests, chunk_digest(chunk))
                pos += len(chunk)

    def run_cycle(self) -> CycleReport:
        started = time.monotonic()
        self.report = CycleReport()
        self.outbox = Outbox(self._window)
        states = [self.state.load_disk(d) for d in range(len(self.config.disks))]
        self.outbox.acked_before = max(st.acked_seq for st in states)
        try:
            self._open(fresh=True)
        except (OSError, LinkLost) as e:  # unreachable, or it cannot serve yet (e.g. its database is restarting)
            self._reconnect(e, fresh=True)
        try:
            maps: list[DigestMap | None] = []
            for disk, dcfg in enumerate(self.config.disks):
                size = disk_size(dcfg.path)
                if size != dcfg.size:
                    raise SourceError(f"disk {disk} ({dcfg.path}) is now {size} bytes but was registered "
                                      f"with {dcfg.size}: re-register the agent after resizing a disk")
                maps.append(DigestMap.load(self.state.digests(disk), size))
            # Resyncs first: the replica's digests are only served once everything received
            # is applied, so nothing of this cycle may be in flight yet.
            # every disk fresh, yet the process server holds sequences of this machine (its WELCOME)
            state_lost = self.next_seq > 1 and all(_fresh(st, dmap) for st, dmap in zip(states, maps))
            server_seq = self.next_seq - 1  # the WELCOME's
            resync = [_needs_resync(st, dmap, state_lost, server_seq) for st, dmap in zip(states, maps)]
            lost = [d for d, st in enumerate(states) if resync[d] and st.acked_seq > server_seq]
            if lost:
                log.warning("the process server holds this machine's sequence up to %d, but had acknowledged up to %d: "
                            "it lost data it had made durable (cache replaced, or the machine moved before its old "
                            "cache was uploaded); resyncing disk(s) %s", server_seq,
                            max(states[d].acked_seq for d in lost), ", ".join(map(str, lost)))
                for d in lost:  # durably, before any frame: a later WELCOME will no longer show the loss
                    self.state.digests(d).unlink(missing_ok=True)
            order = sorted(range(len(states)), key=lambda d: not resync[d])
            for disk in order:
                st, dmap = states[disk], maps[disk]
                with DiskReader(self.config.disks[disk].path, CHUNK) as reader:
                    if resync[disk]:
                        self.report.phases.append(f"disk {disk}: resync")
                        dmap = DigestMap(reader.size)
                        self._resync_pass(disk, reader, dmap)
                        st.resyncs += 1
                    elif st.phase == PHASE_INITIAL:
                        self.report.phases.append(f"disk {disk}: initial from {st.initial_offset}")
                        dmap = dmap if (dmap and st.initial_offset) else DigestMap(reader.size)
                        self._pass(disk, reader, dmap, st.initial_offset - st.initial_offset % CHUNK,
                                   _Initial(self.state, disk, st, dmap, reader.size, self._sent_budget))
                    else:
                        self.report.phases.append(f"disk {disk}: delta")

                        def sending(disk=disk, st=st, size=reader.size) -> None:
                            st.sent_limit = size  # cleared when the cycle's marker is acknowledged
                            self.state.save_disk(disk, st)

                        self._pass(disk, reader, dmap, 0, None, sending)
                maps[disk] = dmap
            marker_id = uuid.uuid4().hex
            seq = self._send(Kind.MARKER, 0, time.time_ns(), marker_id.encode())
            self._wait(seq)
            for disk, (st, dmap) in enumerate(zip(states, maps)):
                assert dmap is not None
                if dmap.dirty:
                    dmap.save(self.state.digests(disk))
                st.phase, st.initial_offset = PHASE_DELTA, self.config.disks[disk].size
                st.sent_limit = 0  # everything sent is in the map now
                st.cycles += 1
                st.last_marker_id = marker_id
                st.acked_seq = seq
                self.state.save_disk(disk, st)
            self.report.marker_id, self.report.marker_seq = marker_id, seq
        finally:
            if self.link is not None:
                self.report.throttle_events += self.link.throttle_events
                self.link.close()
                self.link = None
        self.report.seconds = time.monotonic() - started
        return self.report
