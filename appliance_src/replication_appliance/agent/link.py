"""The agent's end of the data port: one mutual-TLS connection, frames out, ACK/ERROR in.

Frames stay in an outbox until acknowledged; after a reconnect the outbox is replayed from
the server's last durable sequence, so nothing acknowledged is resent and nothing
unacknowledged is lost."""
from __future__ import annotations

import collections
import queue
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from ..common.errors import ApplianceError
from ..dataplane.frames import (
    HEADER_SIZE,
    ErrorCode,
    Flag,
    Frame,
    FrameError,
    IncompleteFrame,
    Kind,
    decode,
    decode_header,
    encode,
    encode_header,
    error_text,
)

# Above this, a frame's header and payload go out as two writes rather than one joined copy.
SEPARATE_PAYLOAD_BYTES = 64 * 1024
# TCP keepalive: a peer silent for KEEPALIVE_IDLE s is probed every KEEPALIVE_INTERVAL s and the
# connection given up after KEEPALIVE_PROBES unanswered probes (about 2 minutes). ACKs themselves
# have no deadline: a throttled process server may withhold them for long.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_PROBES = 60, 10, 6


class LinkLost(ApplianceError):
    """The connection to the process server broke; reconnect and replay."""


class ServerRefused(ApplianceError):
    """The process server answered with an ERROR frame: the message says why."""


def refusal(what: str, error: Frame) -> ApplianceError:
    """An ERROR frame as an exception: INTERNAL (the server cannot serve for now, e.g. its
    database is restarting) is a lost link to reconnect after; any other code is final."""
    text = f"{what}: {error_text(error)}"
    return LinkLost(text) if error.offset == ErrorCode.INTERNAL else ServerRefused(text)


def keep_alive(sock: socket.socket) -> None:
    """Turn on TCP keepalive, so a silently dead peer (host gone, NAT entry dropped) ends in an
    error on the connection rather than a wait for ever."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "SIO_KEEPALIVE_VALS") and hasattr(sock, "ioctl"):  # Windows (probes: 10, fixed)
        sock.ioctl(socket.SIO_KEEPALIVE_VALS, (1, KEEPALIVE_IDLE * 1000, KEEPALIVE_INTERVAL * 1000))
        return
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                        ("TCP_KEEPCNT", KEEPALIVE_PROBES)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


class RateLimit:
    """Token bucket for --max-rate (bytes per second)."""

    def __init__(self, bytes_per_second: float | None) -> None:
        self.rate = bytes_per_second
        self._allowance = 0.0
        self._last = time.monotonic()

    def take(self, n: int) -> None:
        if not self.rate:
            return
        now = time.monotonic()
        self._allowance = min(self.rate, self._allowance + (now - self._last) * self.rate)
        self._last = now
        self._allowance -= n
        if self._allowance < 0:
            time.sleep(-self._allowance / self.rate)


class ReadBuffer:
    """A buffer the agent reads a chunk of a disk into. Frames sent from slices of it keep it
    (no copy of their payload) until acknowledged; then it is reused for another chunk."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.holders = 0


@dataclass
class Pending:
    seq: int
    header: bytes
    payload: bytes | memoryview  # a view of `source` when sent from a read buffer
    on_ack: Callable[[], None] | None
    source: ReadBuffer | None = None

    @property
    def charge(self) -> int:
        """What the frame counts against the window (a read buffer counts once, on its own)."""
        return len(self.header) + (0 if self.source is not None else len(self.payload))


class Outbox:
    """Unacknowledged frames, in sequence order, across reconnects. `bytes` is the memory they
    hold: their own bytes, and every read buffer until no frame (and not the reader) holds it,
    so a chunk sent as a few small frames still counts whole against the window."""

    def __init__(self, window_bytes: int) -> None:
        self.items: collections.deque[Pending] = collections.deque()
        self.bytes = 0
        self.window = window_bytes
        self.acked = 0
        # The most any process server acknowledged to this agent before (its disks' states): the
        # HELLO says so, and a server that cannot tell where the machine stands must not number
        # below it (the machine was served elsewhere meanwhile).
        self.acked_before = 0
        self.cond = threading.Condition()
        # read buffers no frame holds any more: reusing them spares a fresh allocation (page
        # faults and zeroing) per chunk; as many are kept as the window can hold at once
        self._spare: list[ReadBuffer] = []
        self._spare_bytes = 0

    def read_buffer(self, size: int) -> ReadBuffer:
        """A buffer of `size` bytes, held by the caller until `release()`."""
        with self.cond:
            while self._spare:
                buf = self._spare.pop()
                self._spare_bytes -= len(buf.data)
                if len(buf.data) == size:
                    break
            else:
                buf = ReadBuffer(size)
            buf.holders = 1
            self.bytes += size
            return buf

    def release(self, buf: ReadBuffer) -> None:
        with self.cond:
            self._drop(buf)

    def _drop(self, buf: ReadBuffer) -> None:
        buf.holders -= 1
        if buf.holders:
            return
        self.bytes -= len(buf.data)
        self.cond.notify_all()
        if self._spare_bytes + len(buf.data) <= self.window:
            self._spare.append(buf)
            self._spare_bytes += len(buf.data)

    def add(self, p: Pending) -> None:
        with self.cond:
            self.items.append(p)
            self.bytes += p.charge
            if p.source is not None:
                p.source.holders += 1

    def ack(self, seq: int) -> None:
        done: list[Pending] = []
        with self.cond:
            while self.items and self.items[0].seq <= seq:
                p = self.items.popleft()
                self.bytes -= p.charge
                done.append(p)
                if p.source is not None:
                    self._drop(p.source)
            self.acked = max(self.acked, seq)
            self.cond.notify_all()
        for p in done:
            if p.on_ack:
                p.on_ack()


class Link:
    def __init__(self, address: tuple[str, int], ctx: ssl.SSLContext, machine: uuid.UUID, outbox: Outbox,
                 rate: RateLimit, connect_timeout: float = 15.0, handshake_timeout: float = 60.0) -> None:
        self.machine = machine
        self.outbox = outbox
        self.rate = rate
        self.throttled = False
        self.throttle_events = 0
        self.error: ApplianceError | None = None
        self._closed = threading.Event()
        self._digests: queue.Queue[Frame] = queue.Queue()
        where = f"{address[0]}:{address[1]}"
        try:
            raw = socket.create_connection(address, timeout=connect_timeout)
        except OSError as e:
            raise LinkLost(f"cannot connect to the process server at {where}: {e}") from None
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # frames are written whole anyway
            keep_alive(raw)
            # a peer that accepts connections but never answers must not hold the agent for ever
            raw.settimeout(handshake_timeout)
            self.sock = ctx.wrap_socket(raw, server_hostname=address[0])
        except OSError as e:  # ssl.SSLError included
            raw.close()
            raise LinkLost(f"no TLS session with the process server at {where}: {e}") from None
        try:
            self.sock.sendall(encode(Frame(Kind.HELLO, machine, seq=max(outbox.acked, outbox.acked_before))))
            welcome = self._read_frame()
            if welcome.kind is Kind.ERROR:
                raise refusal("process server refused the session", welcome)
            if welcome.kind is not Kind.WELCOME:
                raise ServerRefused(f"process server answered HELLO with {welcome.kind.name}")
        except TimeoutError:
            self.sock.close()
            raise LinkLost(f"the process server at {where} did not answer HELLO within {handshake_timeout:.0f}s") from None
        except OSError as e:
            self.sock.close()
            raise LinkLost(f"connection to the process server at {where} lost before the session began: {e}") from None
        except BaseException:
            self.sock.close()  # a reconnect loop would otherwise leave one socket per attempt to the collector
            raise
        self.sock.settimeout(None)  # from here a dead peer is found by keepalive; ACKs may come late
        self.server_seq = welcome.seq
        self.resync_requested = bool(welcome.flags & Flag.RESYNC)
        outbox.ack(welcome.seq)
        self._reader = threading.Thread(target=self._read_loop, name="agent-acks", daemon=True)
        self._reader.start()
        # Frames are encrypted and written by a thread of their own, so reading and hashing the
        # next chunk of the disk goes on meanwhile.
        self._to_write: queue.SimpleQueue[tuple[bytes, bytes | memoryview] | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="agent-send", daemon=True)
        self._writer.start()

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise LinkLost("process server closed the connection")
            buf += chunk
        return bytes(buf)

    def _read_frame(self) -> Frame:
        hb = self._recv_exact(HEADER_SIZE)
        h = decode_header(hb)
        frame, _ = decode(hb + self._recv_exact(h.length))
        return frame

    def _read_loop(self) -> None:
        try:
            while True:
                f = self._read_frame()
                if f.kind is Kind.ACK:
                    if f.flags & Flag.THROTTLED and not self.throttled:
                        self.throttle_events += 1
                    self.throttled = bool(f.flags & Flag.THROTTLED)
                    self.outbox.ack(f.seq)
                elif f.kind is Kind.DIGESTS:
                    self._digests.put(f)
                elif f.kind is Kind.ERROR:
                    self.error = refusal("process server refused a frame", f)
                    break
        except (OSError, LinkLost, FrameError, IncompleteFrame) as e:
            self._lost(e)
        finally:
            self._lost(None)

    def _lost(self, cause: Exception | None) -> None:
        if self.error is None and cause is not None:
            self.error = LinkLost(f"connection to the process server lost: {cause}")
        self._closed.set()
        with self.outbox.cond:
            self.outbox.cond.notify_all()

    def _check(self) -> None:
        if self._closed.is_set():
            raise self.error or LinkLost("connection to the process server lost")

    def replay(self) -> None:
        """Resend every frame the server has not made durable."""
        with self.outbox.cond:
            items = [p for p in self.outbox.items if p.seq > self.server_seq]
        for p in items:
            self._write(p.header, p.payload)

    def _write(self, header: bytes, payload: bytes | memoryview = b"") -> None:
        """Hand a frame to the writer thread (frames go out in the order they are handed over)."""
        self._check()
        self._to_write.put((header, payload))

    def _write_loop(self) -> None:
        try:
            while (item := self._to_write.get()) is not None and not self._closed.is_set():
                header, payload = item
                self.rate.take(len(header) + len(payload))
                if len(payload) > SEPARATE_PAYLOAD_BYTES:  # the header as its own TLS record, not a copy of the payload
                    self.sock.sendall(header)
                    self.sock.sendall(payload)
                else:
                    self.sock.sendall(header + payload)
        except OSError as e:
            self._lost(e)

    def send(self, frame: Frame, on_ack: Callable[[], None] | None = None, source: ReadBuffer | None = None) -> None:
        """Queue and write one frame. With `source`, the payload is a view of that read buffer,
        which the frame holds until acknowledged; without, a view's bytes are copied."""
        payload = frame.payload if source is not None or isinstance(frame.payload, bytes) else bytes(frame.payload)
        pending = Pending(frame.seq, encode_header(frame), payload, on_ack, source)
        with self.outbox.cond:
            while self.outbox.bytes + pending.charge > self.outbox.window and self.outbox.items:
                self._check()
                self.outbox.cond.wait(0.5)
        self.outbox.add(pending)
        self._write(pending.header, pending.payload)

    def wait_acked(self, seq: int, timeout: float | None = None) -> bool:
        """Whether everything up to `seq` was acknowledged within `timeout` (None: wait for it)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.outbox.cond:
            while self.outbox.acked < seq:
                self._check()
                left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
                if left <= 0:
                    return False
                self.outbox.cond.wait(left)
        return True

    def request_digests(self, disk: int, offset: int, blocks: int, timeout: float = 600.0) -> bytes | None:
        """The replica's block digests from `offset`, or None while it is still catching up."""
        self._write(encode(Frame(Kind.DIGEST_REQUEST, self.machine, disk=disk, offset=offset,
                                 payload=blocks.to_bytes(4, "big"))))
        deadline = time.monotonic() + timeout
        while True:
            self._check()
            try:
                reply = self._digests.get(timeout=0.5)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise LinkLost(f"no digests from the process server within {timeout:.0f}s") from None
                continue
            return None if reply.flags & Flag.NOT_READY else reply.payload

    def close(self) -> None:
        self._to_write.put(None)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes both threads
        except OSError:
            pass
        # The socket is closed only once neither thread can be inside a call on it: OpenSSL holds
        # the descriptor's number, and a file opened meanwhile could take it (the alert OpenSSL
        # sends on reading garbage would land in that file).
        self._writer.join(timeout=5)
        self._reader.join(timeout=5)
        if self._writer.is_alive() or self._reader.is_alive():
            threading.Thread(target=self._close_when_done, name="agent-link-close", daemon=True).start()
        else:
            self.sock.close()

    def _close_when_done(self) -> None:
        self._writer.join()
        self._reader.join()
        self.sock.close()
