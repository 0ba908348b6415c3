"""A loopback TCP forwarder that breaks or slows big connections: a real network failure.

Small connections (the SOAP calls) pass untouched; a connection that sends more than
`cut_after` bytes upstream (a disk upload) is reset there, or slowed to `rate` bytes/s.
"""
from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from tests.fixtures.ports import free_port

BIG = 256 * 1024


@dataclass
class FaultyProxy:
    upstream: tuple[str, int]
    cut_after: int | None = None
    rate: float | None = None  # bytes per second once a connection has sent BIG bytes
    port: int = field(default_factory=free_port)
    cuts: int = 0

    def __post_init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._stopping = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stopping.set()
        self._server.close()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, outbound: bool) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                sent += len(data)
                if outbound and self.cut_after is not None and sent > self.cut_after:
                    self.cuts += 1
                    _reset(src)
                    _reset(dst)
                    return
                if outbound and self.rate and sent > BIG:
                    time.sleep(len(data) / self.rate)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _reset(sock: socket.socket) -> None:
    # SO_LINGER 0: close with RST, as a dropped connection looks to the sender.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
