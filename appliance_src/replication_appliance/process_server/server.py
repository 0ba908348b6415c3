"""The data port: mutual TLS, one session per machine, every frame validated, journaled, and
acknowledged only once fsynced. Below the throttle threshold of cache free space the server
stops reading (TCP flow control slows the agent; nothing is dropped) and says so in ACKs."""
from __future__ import annotations

import logging
import select
import shutil
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..common.errors import DatabaseError
from ..common.secrets import MasterKey
from ..common.tls import ROLE_AGENT, identity_from_der
from ..dataplane.frames import (
    HEADER_SIZE,
    MAX_DATA,
    ErrorCode,
    Flag,
    Frame,
    FrameError,
    Kind,
    check_payload,
    decode_header,
    encode,
    error_frame,
)
from ..dataplane.session import (
    MachineDirectory,
    MachineRecord,
    Session,
    digest_block_count,
)
from ..storage.base import BlobStore, StorageError
from ..storage.keyring import DataKeyring
from .buffers import RecordBufferPool
from .commit import GroupCommit
from .journal import Journals, MachineJournal, RecordBuffer
from .manifests import stored_through_in
from .resync import logs_applied, replica_digests
from .stats import HealthReport, Stats, write_report
from .uploader import Uploader

log = logging.getLogger(__name__)
T = TypeVar("T")
NIL = uuid.UUID(int=0)
HEALTH_FILE = "health.json"
TLS_HANDSHAKE = b"\x16"
NOT_TLS_MESSAGE = (b"ERROR: this is the replication data port; it speaks TLS 1.2+ with an appliance-issued "
                   b"client certificate and the replication frame protocol\n")


@dataclass
class ProcessServerConfig:
    cache_dir: Path
    host: str = "127.0.0.1"
    port: int = 9443
    segment_max_bytes: int = 32 * 1024 * 1024
    segment_max_age: float = 5.0
    throttle_free_fraction: float = 0.20
    # The cache disk's usable size; None = the whole file system holding cache_dir.
    cache_capacity_bytes: int | None = None
    upload_concurrency: int = 4
    upload_backoff_max: float = 15.0
    zstd_level: int = 1
    # Frames a connection may have read but not yet written and fsynced (group commit).
    queue_bytes: int = 32 * 1024 * 1024
    # The same for all connections together, and the spare record buffers kept for reuse
    # (buffers.py): many agents at once do not make the server hold many queues.
    queued_budget_bytes: int = 256 * 1024 * 1024
    idle_timeout: float = 300.0
    # How long a session of a machine this cache has numbered before waits for storage's
    # numbering (the machine may have been served elsewhere meanwhile) before going on without.
    storage_check_wait: float = 3.0


class _PeerClosed(Exception):
    pass


class _Reader:
    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock

    def exact(self, n: int, buf: bytearray | memoryview | None = None) -> bytearray | memoryview:
        """Read `n` bytes (into `buf`, of that size, when given)."""
        buf = bytearray(n) if buf is None else buf
        mv = memoryview(buf)
        got = 0
        while got < n:
            r = self.sock.recv_into(mv[got:], n - got)
            if r == 0:
                if got == 0:
                    raise _PeerClosed()
                raise FrameError(ErrorCode.MALFORMED, f"connection closed inside a frame ({got} of {n} bytes)")
            got += r
        return buf

    def more_waiting(self) -> bool:
        return self.sock.pending() > 0 or bool(select.select([self.sock], [], [], 0)[0])

    def wait(self, other: socket.socket, timeout: float) -> None:
        """Until a frame arrives or `other` is readable."""
        if not self.sock.pending():
            select.select([self.sock, other], [], [], timeout)


class ProcessServer:
    def __init__(self, config: ProcessServerConfig, ssl_context: ssl.SSLContext, directory: MachineDirectory,
                 store: BlobStore, master_key: MasterKey) -> None:
        self.config = config
        self._ctx = ssl_context
        self._directory = directory
        self._store = store
        self.stats = Stats()
        self.buffers = RecordBufferPool(config.queued_budget_bytes, config.queued_budget_bytes)
        self.journals = Journals(config.cache_dir, config.segment_max_bytes, config.segment_max_age)
        self.stats.recovered_torn_bytes = sum(j.recovered_torn_bytes for j in self.journals.all())
        self.uploader = Uploader(store, DataKeyring(store, master_key), self._machine, self.stats,
                                 config.upload_concurrency, config.zstd_level, backoff_max=config.upload_backoff_max)
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sessions: dict[uuid.UUID, socket.socket] = {}
        self._session_locks: dict[uuid.UUID, threading.Lock] = {}
        self._lock = threading.Lock()
        self._serving = 0  # sessions between registering and ending (stop() waits for them)
        self._served = threading.Condition(self._lock)
        self._throttled = False
        self._commits: set[GroupCommit] = set()
        self._free_at_scan = 0
        self._total_at_scan = 0
        self._written_since_scan = 0
        self._report: HealthReport | None = None
        self._publishing = threading.Lock()  # the monitor and health() both publish, through one temporary file
        self.port = config.port

    def _machine(self, machine: uuid.UUID) -> MachineRecord:
        rec = self._directory.machine(machine)
        if rec is None:
            raise StorageError(f"machine {machine} has journaled data but is no longer registered; its segments stay in the cache")
        return rec

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> int:
        for j in self.journals.all():
            for seg in j.pending():
                self.uploader.submit(seg)
        # the buffers one connection at full speed cycles through, touched before anyone connects
        self.buffers.prefill(MAX_DATA, 2 * self.config.queue_bytes)
        self._listener = socket.create_server((self.config.host, self.config.port), backlog=64)
        self.port = self._listener.getsockname()[1]
        self._refresh()
        for target, name in ((self._accept_loop, "ps-accept"), (self._monitor_loop, "ps-monitor")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("process server listening on %s:%d", self.config.host, self.port)
        return self.port

    def stop(self, session_wait: float = 10.0) -> None:
        with self._lock:
            self._stop.set()  # under the lock: a session registers only while not stopping
        for t in self._threads:
            t.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            for s in self._sessions.values():
                _cut_off(s)
            # The sessions' commits write to the journals closed below: one still writing would
            # open a segment after the close (and a server started again on this cache in the
            # same process would find a second writer in its journal).
            deadline = time.monotonic() + session_wait
            while self._serving and (left := deadline - time.monotonic()) > 0:
                self._served.wait(left)
            if self._serving:
                log.warning("%d session(s) did not end within %.0fs of stopping", self._serving, session_wait)
        self.journals.close()
        self.uploader.close(wait=False)

    # -- health and back-pressure ---------------------------------------------------------
    def health(self) -> HealthReport:
        return self._refresh()

    def _refresh(self, publish: bool = True) -> HealthReport:
        cache = self.config.cache_dir
        with self._lock:
            # frames arriving from now on are counted on top of this scan; queued ones will be written
            self._written_since_scan = 0
            queued = sum(c.queued_bytes for c in self._commits)
        used = backlog = segments = 0
        for p in cache.glob("*/*"):
            if p.suffix in (".open", ".sealed"):
                try:
                    size = p.stat().st_size
                except FileNotFoundError:
                    continue
                used += size
                backlog += size
                segments += p.suffix == ".sealed"
        # the file system's size as `df` counts it: what is used plus what this account may still
        # use (blocks reserved for root are neither); shutil works on Windows too, os.statvfs does not
        usage = shutil.disk_usage(cache)
        fs_total, fs_free = usage.used + usage.free, usage.free
        cap = self.config.cache_capacity_bytes
        total = cap if cap else fs_total
        free = min(fs_free, max(total - used, 0)) if cap else fs_free
        free = max(free - queued, 0)
        fraction = free / total if total else 0.0
        self._free_at_scan, self._total_at_scan = free, total
        self._throttled = fraction < self.config.throttle_free_fraction
        self.stats.set_throttled(self._throttled)
        report = self.stats.report(total, used, fraction, backlog, segments)
        if publish:
            with self._publishing:
                write_report(cache / HEALTH_FILE, report)
        self._report = report
        return report

    def _check_throttle(self, written: int) -> None:
        """Notice a filling cache between the monitor's scans without scanning for every frame:
        free space is estimated down from the last scan by what arrived since, and only an
        estimate under the threshold costs a real scan."""
        with self._lock:
            self._written_since_scan += written
            estimate = self._free_at_scan - self._written_since_scan
        if estimate < self.config.throttle_free_fraction * self._total_at_scan:
            self._refresh(publish=False)

    def _monitor_loop(self) -> None:
        held: set[uuid.UUID] = set()  # journals whose handover waits for their state to be written
        while not self._stop.wait(0.5):
            try:
                for j in self.journals.all():
                    try:
                        for seg in j.take_handover():  # a seal failed after its rename
                            self.uploader.submit(seg)
                        held.discard(j.machine)
                    except OSError as e:
                        if j.machine not in held:  # once, not every half second
                            held.add(j.machine)
                            log.warning("journal of %s: sealed segments wait in the cache until its state can be "
                                        "written (%s)", j.machine, e)
                    seg = j.seal_if_old()
                    if seg is not None:
                        self.uploader.submit(seg)
                self._refresh()
            except Exception:
                log.exception("process server monitor failed")

    # -- connections ----------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        self._listener.settimeout(0.5)  # wake up to notice stop()
        while not self._stop.is_set():
            try:
                raw, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if self._stop.is_set():
                    return  # stop() closed the listener
                # Out of descriptors, or a connection that failed before it was accepted: the
                # port must stay open for everyone else.
                log.warning("accepting a connection failed (%s); going on", e)
                time.sleep(0.1)
                continue
            try:
                threading.Thread(target=self._serve, args=(raw, addr), name=f"ps-conn-{addr[1]}", daemon=True).start()
            except RuntimeError as e:  # no thread to be had: this connection, not the port, is lost
                log.warning("cannot serve the connection from %s (%s)", addr[0], e)
                raw.close()

    def _serve(self, raw: socket.socket, addr) -> None:
        raw.settimeout(30)
        # ACKs are small and answer small frames: without this, Nagle + delayed ACK add 40 ms.
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            first = raw.recv(1, socket.MSG_PEEK)
            if first and first != TLS_HANDSHAKE:
                # Not TLS at all: say in plain words what this port speaks, then hang up.
                raw.sendall(NOT_TLS_MESSAGE)
                raw.shutdown(socket.SHUT_WR)
                raise ssl.SSLError("client did not start a TLS handshake")
            sock = self._ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as e:
            log.warning("TLS handshake from %s refused: %s", addr[0], e)
            raw.close()
            return
        self.stats.connection(+1)
        try:
            sock.settimeout(self.config.idle_timeout)
            self._session(sock, addr)
        except (OSError, _PeerClosed) as e:
            log.info("connection from %s ended: %s", addr[0], e)
        except Exception:  # a bug must not pass silently, nor leave the agent guessing why it was cut off
            log.exception("session from %s failed", addr[0])
            self._refuse(sock, NIL, FrameError(ErrorCode.INTERNAL, "internal error in the process server (see its log): retry later"))
        finally:
            self.stats.connection(-1)
            _shutdown(sock)

    def _send(self, sock: ssl.SSLSocket, frame: Frame) -> None:
        sock.sendall(encode(frame))

    def _refuse(self, sock: ssl.SSLSocket, machine: uuid.UUID, err: FrameError) -> None:
        log.warning("refused frame from machine %s: %s", machine, err)
        try:
            self._send(sock, error_frame(machine, err.code, str(err)))
        except OSError:
            pass

    def _session(self, sock: ssl.SSLSocket, addr) -> None:
        der = sock.getpeercert(binary_form=True)
        ident = identity_from_der(der) if der else None
        machine_id: uuid.UUID | None = None
        if ident is not None and ident.role == ROLE_AGENT:
            try:
                machine_id = uuid.UUID(ident.subject_id)
            except ValueError:
                machine_id = None
        try:
            record = self._directory.machine(machine_id) if machine_id else None
        except DatabaseError as e:
            # INTERNAL tells the agent to come back later; refusing as unregistered would stop it.
            return self._refuse(sock, NIL, FrameError(ErrorCode.INTERNAL, f"the process server cannot check this "
                                                      f"machine's registration right now ({e}): retry later"))
        if record is not None and record.cert_fingerprint and ident is not None and ident.fingerprint != record.cert_fingerprint:
            return self._refuse(sock, NIL, FrameError(ErrorCode.NOT_AUTHORIZED,
                                "this certificate was replaced by a newer registration of the machine: use the current one"))
        if record is None:
            return self._refuse(sock, NIL, FrameError(ErrorCode.NOT_AUTHORIZED,
                                "the client certificate does not belong to a registered machine: register the agent first"))
        with self._lock:
            if self._stop.is_set():
                stopping = True
            else:
                stopping = False
                old = self._sessions.get(record.machine_id)
                self._sessions[record.machine_id] = sock  # from now on an old session knows it was taken over
                lock = self._session_locks.setdefault(record.machine_id, threading.Lock())
                self._serving += 1
        if stopping:
            return self._refuse(sock, record.machine_id, FrameError(ErrorCode.INTERNAL, "the process server is "
                                                                    "stopping: retry later"))
        try:
            if old is not None:
                _cut_off(old)  # a reconnecting agent takes over from its dead connection
            if not lock.acquire(timeout=30):
                # INTERNAL, not PROTOCOL: the old session is on its way out and the agent should come back
                return self._refuse(sock, record.machine_id, FrameError(ErrorCode.INTERNAL, "another session of this "
                                                                        "machine is still ending: retry later"))
            try:
                self._run_session(sock, record, self.journals.get(record.machine_id))
            finally:
                lock.release()
        finally:
            with self._lock:
                if self._sessions.get(record.machine_id) is sock:
                    del self._sessions[record.machine_id]
                self._serving -= 1
                self._served.notify_all()

    def _taken_over(self, machine: uuid.UUID, sock: socket.socket) -> bool:
        with self._lock:
            return self._sessions.get(machine) is not sock

    def _run_session(self, sock: ssl.SSLSocket, record, journal: MachineJournal) -> None:
        if journal.broken_at is not None:  # the last session's write or fsync failed
            try:
                sealed = journal.repair()
            except OSError as e:
                return self._refuse(sock, record.machine_id, FrameError(
                    ErrorCode.INTERNAL, f"the process server's cache disk is failing ({e}): retry later"))
            if sealed is not None:
                self.uploader.submit(sealed)
            for seg in journal.pending():  # one sealed just before the failure may not have been handed over
                self.uploader.submit(seg)
        try:
            sealed = journal.begin_session(record.disk_sizes)  # a segment holds records of one registration
        except OSError as e:  # the seal could not finish: a repair (next session) or the monitor completes it
            return self._refuse(sock, record.machine_id, FrameError(
                ErrorCode.INTERNAL, f"the process server's cache disk is failing ({e}): retry later"))
        if sealed is not None:
            self.uploader.submit(sealed)
        reader = _Reader(sock)
        session = Session(record, journal.last_seq)
        commit = GroupCommit(journal, self.uploader.submit, self.config.queue_bytes, self.buffers)
        with self._lock:
            self._commits.add(commit)
        acked = last = journal.last_seq

        def ack(seq: int) -> None:
            nonlocal acked
            self._send(sock, Frame(Kind.ACK, record.machine_id, seq=seq,
                                   flags=Flag.THROTTLED if self._throttled else Flag(0)))
            acked = seq

        def ack_all() -> None:
            ack(commit.wait_durable())

        try:
            while not self._stop.is_set():
                if self._throttled and session.greeted:  # a newcomer gets its WELCOME first
                    ack_all()
                    while (self._throttled and not self._stop.is_set()
                           and not self._taken_over(record.machine_id, sock)):  # a reconnect of this machine
                        time.sleep(0.2)
                commit.raise_error()
                if commit.durable_seq > acked:
                    ack(commit.durable_seq)  # acknowledgements flow while the stream goes on
                if last > acked and not reader.more_waiting():
                    commit.drain_wakeups()  # then look again: progress made since arrives as a new wakeup
                    if commit.durable_seq == acked:
                        reader.wait(commit.wakeup, self.config.idle_timeout)  # more frames, or durable progress
                    continue
                try:
                    hb = reader.exact(HEADER_SIZE)
                except _PeerClosed:
                    break
                h = decode_header(hb)
                session.check(h)
                # a DATA payload is received straight into the record buffer the journal writes from
                entry = commit.record_buffer(h.length) if h.kind is Kind.DATA else None
                payload = reader.exact(h.length, entry.payload() if entry else None)
                check_payload(hb, h, payload)
                if h.kind is Kind.HELLO:
                    if journal.state.numbering_unknown or journal.drained():
                        self._number_after_storage(record, journal, h.seq)  # raises the refusal
                        session.expected_seq = journal.last_seq + 1  # nothing arrived before the HELLO
                        commit.numbered_on(journal.last_seq)
                        acked = last = journal.last_seq
                    self._send(sock, Frame(Kind.WELCOME, record.machine_id, seq=journal.last_seq))
                    continue
                if h.kind is Kind.DIGEST_REQUEST:
                    if last > acked:
                        ack_all()
                    self._send(sock, self._digests(record, journal, h, payload))
                    continue
                if entry is None:
                    entry = RecordBuffer.of(hb, payload)
                else:
                    entry.set_header(hb)
                commit.put(h, entry)
                self.stats.ingest(h.length)
                last = h.seq
                self._check_throttle(HEADER_SIZE + h.length)  # notice a filling cache within a batch
        except FrameError as e:
            if last > acked:
                ack_all()
            self._refuse(sock, record.machine_id, e)
        finally:
            commit.close()  # the connection broke mid-batch: keep what arrived whole (the agent will learn it)
            with self._lock:
                self._commits.discard(commit)

    def _number_after_storage(self, record: MachineRecord, journal: MachineJournal, acked_before: int) -> None:
        """With nothing of the machine in this cache: number on after what storage holds of it
        if that is further (first seen here, moved here, moved back, the cache disk replaced or
        restored). Storage must be read for a journal new here, or when the agent was
        acknowledged beyond this cache's numbering (`acked_before`, its HELLO's: served
        elsewhere meanwhile); else a storage outage is waited out briefly and the cache's own
        numbering goes on. Raises the refusal to send when that cannot be done."""
        must_know = journal.state.numbering_unknown or acked_before > journal.last_seq
        try:
            if must_know:
                segno, seq = stored_through_in(self._store, record.machine_id)
            else:
                segno, seq = _within(self.config.storage_check_wait, stored_through_in, self._store, record.machine_id)
        except (StorageError, TimeoutError) as e:
            if must_know:
                raise FrameError(ErrorCode.INTERNAL, f"the process server cannot read where {record.hostname}'s logs "
                                 f"stand in cache storage ({e}): retry later") from None
            log.warning("machine %s: cannot read where its logs stand in cache storage (%s); numbering on from this "
                        "cache's", record.hostname, e)
            return
        try:
            moved = journal.number_after(segno, seq)
        except OSError as e:
            raise FrameError(ErrorCode.INTERNAL, f"the process server's cache disk is failing ({e}): retry later") from None
        if moved:
            # what this server last knew of the machine's manifest may be stale too
            self.uploader.forget(record.machine_id)
            log.info("machine %s: storage holds its logs through segment %d (sequence %d), further than this cache: "
                     "numbering on from there", record.hostname, segno, seq)

    def _digests(self, record: MachineRecord, journal: MachineJournal, h, payload) -> Frame:
        size = record.disk_sizes[h.disk]
        blocks = digest_block_count(payload, h.offset, size)
        try:
            # everything received is uploaded (nothing in the journal) and applied; not "applied up to
            # the journal's last sequence": a disk registered again after it was dropped has no
            # log past its replica's position, and its position stays where the drop left it
            ready = journal.drained() and logs_applied(self._store, record.machine_id, len(record.disk_sizes))
            if not ready:
                return Frame(Kind.DIGESTS, record.machine_id, disk=h.disk, offset=h.offset, flags=Flag.NOT_READY)
            data = replica_digests(self._store, record.machine_id, h.disk, h.offset, blocks, size)
        except StorageError as e:
            log.warning("resync digests of %s disk %d unavailable: %s", record.machine_id, h.disk, e)
            return Frame(Kind.DIGESTS, record.machine_id, disk=h.disk, offset=h.offset, flags=Flag.NOT_READY)
        return Frame(Kind.DIGESTS, record.machine_id, disk=h.disk, offset=h.offset, payload=data)


def _within(seconds: float, fn: Callable[..., T], *args) -> T:
    """`fn(*args)`, or TimeoutError once it has taken `seconds` (it runs on in its daemon
    thread, its answer unused: a storage call in an outage hangs for the client's timeouts)."""
    done: dict[str, Any] = {}

    def run() -> None:
        try:
            done["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the caller, who raises it
            done["error"] = e

    t = threading.Thread(target=run, name="within", daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise TimeoutError(f"no answer within {seconds:g}s")
    if "error" in done:
        raise done["error"]
    return done["value"]


def _shutdown(sock: socket.socket) -> None:
    """Hang up a socket this thread serves."""
    _cut_off(sock)
    try:
        sock.close()
    except OSError:
        pass


def _cut_off(sock: socket.socket) -> None:
    """Hang up a socket another thread serves: woken, that thread ends and closes it. Closing it
    here could free its descriptor while that thread is still inside a read (OpenSSL holds the
    number): a file opened meanwhile would take the number, and the alert OpenSSL sends on
    reading it would land in that file (a journal segment, a manifest)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
