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
    Flag,
    Frame,
    FrameError,
    IncompleteFrame,
    Kind,
    decode,
    decode_header,
    encode,
    error_text,
)


class LinkLost(ApplianceError):
    """The connection to the process server broke; reconnect and replay."""


class ServerRefused(ApplianceError):
    """The process server answered with an ERROR frame: the message says why."""


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


@dataclass
class Pending:
    seq: int
    data: bytes | bytearray
    on_ack: Callable[[], None] | None


class Outbox:
    """Unacknowledged frames, in sequence order, across reconnects."""

    SPARE_BYTES = 16 * 1024 * 1024

    def __init__(self, window_bytes: int) -> None:
        self.items: collections.deque[Pending] = collections.deque()
        self.bytes = 0
        self.window = window_bytes
        self.acked = 0
        self.cond = threading.Condition()
        # acknowledged frames' buffers, by size: reusing them spares a fresh allocation
        # (page faults and zeroing) per frame
        self._spare: dict[int, list[bytearray]] = {}
        self._spare_bytes = 0

    def buffer(self, n: int) -> bytearray:
        with self.cond:
            spare = self._spare.get(n)
            if spare:
                self._spare_bytes -= n
                return spare.pop()
        return bytearray(n)

    def add(self, p: Pending) -> None:
        with self.cond:
            self.items.append(p)
            self.bytes += len(p.data)

    def ack(self, seq: int) -> None:
        done: list[Pending] = []
        with self.cond:
            while self.items and self.items[0].seq <= seq:
                p = self.items.popleft()
                self.bytes -= len(p.data)
                done.append(p)
                if isinstance(p.data, bytearray) and self._spare_bytes + len(p.data) <= self.SPARE_BYTES:
                    self._spare.setdefault(len(p.data), []).append(p.data)
                    self._spare_bytes += len(p.data)
            self.acked = max(self.acked, seq)
            self.cond.notify_all()
        for p in done:
            if p.on_ack:
                p.on_ack()


class Link:
    def __init__(self, address: tuple[str, int], ctx: ssl.SSLContext, machine: uuid.UUID, outbox: Outbox,
                 rate: RateLimit, connect_timeout: float = 15.0) -> None:
        self.machine = machine
        self.outbox = outbox
        self.rate = rate
        self.throttled = False
        self.throttle_events = 0
        self.error: ApplianceError | None = None
        self._closed = threading.Event()
        self._digests: queue.Queue[Frame] = queue.Queue()
        raw = socket.create_connection(address, timeout=connect_timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # frames are written whole anyway
        try:
            self.sock = ctx.wrap_socket(raw, server_hostname=address[0])
        except (ssl.SSLError, OSError):
            raw.close()
            raise
        self.sock.settimeout(None)
        self.sock.sendall(encode(Frame(Kind.HELLO, machine)))
        welcome = self._read_frame()
        if welcome.kind is Kind.ERROR:
            raise ServerRefused(f"process server refused the session: {error_text(welcome)}")
        if welcome.kind is not Kind.WELCOME:
            raise ServerRefused(f"process server answered HELLO with {welcome.kind.name}")
        self.server_seq = welcome.seq
        self.resync_requested = bool(welcome.flags & Flag.RESYNC)
        outbox.ack(welcome.seq)
        self._reader = threading.Thread(target=self._read_loop, name="agent-acks", daemon=True)
        self._reader.start()

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
                    self.error = ServerRefused(f"process server refused a frame: {error_text(f)}")
                    break
        except (OSError, LinkLost, FrameError, IncompleteFrame) as e:
            if self.error is None:
                self.error = LinkLost(f"connection to the process server lost: {e}")
        finally:
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
            self._write(p.data)

    def _write(self, data: bytes | bytearray) -> None:
        self._check()
        self.rate.take(len(data))
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise self.error or LinkLost(f"connection to the process server lost: {e}") from None

    def send(self, frame: Frame, on_ack: Callable[[], None] | None = None) -> None:
        data = encode(frame, self.outbox.buffer(HEADER_SIZE + len(frame.payload)))
        with self.outbox.cond:
            while self.outbox.bytes + len(data) > self.outbox.window and self.outbox.items:
                self._check()
                self.outbox.cond.wait(0.5)
        self.outbox.add(Pending(frame.seq, data, on_ack))
        self._write(data)

    def wait_acked(self, seq: int, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.outbox.cond:
            while self.outbox.acked < seq:
                self._check()
                if deadline is not None and time.monotonic() > deadline:
                    raise LinkLost(f"no acknowledgement of sequence {seq} within {timeout:.0f}s")
                self.outbox.cond.wait(0.5)

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
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._reader.join(timeout=5)
