"""The agent's connection to the process server: a server that cannot be reached at a cycle's
start is retried then reported as LinkLost naming the address; a peer that never answers ends
in LinkLost within the handshake timeout; keepalive is on; a process server that lost frames
it acknowledged ends the cycle at once, with no connection left open."""
from __future__ import annotations

import os
import socket
import threading
import time
import uuid

import pytest
from replication_appliance.agent.link import (
    KEEPALIVE_IDLE,
    KEEPALIVE_INTERVAL,
    KEEPALIVE_PROBES,
    Link,
    LinkLost,
    Outbox,
    RateLimit,
)
from replication_appliance.agent.replicator import AcknowledgedDataLost, Replicator
from replication_appliance.common.secrets import MasterKey
from replication_appliance.dataplane.session import MachineRecord
from replication_appliance.storage import open_store

from tests.fixtures.ports import free_port

from .conftest import InProcessServer, make_machine, replicator, wait_until

MiB = 1 << 20


def link_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name in ("agent-acks", "agent-send")]


def test_unreachable_process_server_at_cycle_start_is_retried_then_link_lost(tmp_path, pki, caplog):
    port = free_port()  # nothing listens there
    m = make_machine(tmp_path, "down01", [MiB], seed=1, ps_port=port)
    started = time.monotonic()
    with pytest.raises(LinkLost, match=rf"unreachable for 1s: cannot connect to the process server at 127\.0\.0\.1:{port}: "
                                       r".*Connection refused"):
        replicator(pki, m, port, reconnect_for=1).run_cycle()
    assert 1 <= time.monotonic() - started < 10
    assert "retrying for up to 1s" in caplog.text


class SilentServer:
    """Accepts connections and never answers: with a TLS context it completes the handshake and
    reads the HELLO first."""

    def __init__(self, ctx=None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.ctx = ctx
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
                if self.ctx is not None:
                    conn = self.ctx.wrap_socket(conn, server_side=True)
                    conn.recv(65536)
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.listener.close()
        for s in self.held:
            s.close()


@pytest.mark.parametrize("tls", [False, True], ids=["no-tls-handshake", "no-welcome"])
def test_a_peer_that_never_answers_ends_in_link_lost_within_the_timeout(pki, tls):
    server = SilentServer(pki.server_context() if tls else None)
    machine = uuid.uuid4()
    ctx = pki.client_context(machine)
    outcome: list[BaseException] = []

    def connect() -> None:
        try:
            Link(("127.0.0.1", server.port), ctx, machine, Outbox(MiB), RateLimit(None), handshake_timeout=1)
        except BaseException as e:  # noqa: BLE001 - the test looks at whatever ended it
            outcome.append(e)

    started = time.monotonic()
    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(15)
    try:
        assert not t.is_alive(), "the agent still waits for an answer"
        assert time.monotonic() - started < 5
        assert len(outcome) == 1 and isinstance(outcome[0], LinkLost), outcome
        assert f"127.0.0.1:{server.port}" in str(outcome[0])
        if tls:
            assert "did not answer HELLO within 1s" in str(outcome[0])
    finally:
        server.close()


def test_the_data_connection_has_tcp_keepalive(tmp_path, pki):
    record = MachineRecord(uuid.uuid4(), "keepalive01", (MiB,))
    srv = InProcessServer(pki, tmp_path / "cache", [record], open_store(str(tmp_path / "storage")),
                          MasterKey(os.urandom(32)))
    link = Link(("127.0.0.1", srv.port), pki.client_context(record.machine_id), record.machine_id, Outbox(MiB),
                RateLimit(None))
    try:
        assert link.sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                            ("TCP_KEEPCNT", KEEPALIVE_PROBES)):
            if hasattr(socket, name):
                assert link.sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, name)) == value, name
        assert link.sock.gettimeout() is None  # ACKs may be withheld for long: no deadline on them
    finally:
        link.close()
        srv.stop()


def test_the_link_closes_its_socket_only_once_no_thread_can_be_inside_a_call_on_it(tmp_path, pki):
    """A thread still inside a read when the descriptor is closed could read (and answer with a
    TLS alert) a file opened meanwhile under the same number: close() waits, and when a thread
    is slow to leave, the socket is closed once it has."""
    record = MachineRecord(uuid.uuid4(), "close01", (MiB,))
    srv = InProcessServer(pki, tmp_path / "cache", [record], open_store(str(tmp_path / "storage")),
                          MasterKey(os.urandom(32)))
    link = Link(("127.0.0.1", srv.port), pki.client_context(record.machine_id), record.machine_id, Outbox(MiB),
                RateLimit(None))
    release = threading.Event()
    real_reader = link._reader
    link._reader = threading.Thread(target=release.wait, args=(30,), daemon=True)  # stands for a read not yet returned
    link._reader.start()
    try:
        started = time.monotonic()
        link.close()
        assert time.monotonic() - started >= 4.5  # it waited for the reader
        assert link.sock.fileno() != -1  # and, the reader still in, left the socket open
        real_reader.join(5)
        release.set()
        wait_until(lambda: link.sock.fileno() == -1, 10, "the socket closed once the reader left")
    finally:
        release.set()
        srv.stop()


def test_a_process_server_that_lost_acknowledged_frames_ends_the_cycle_at_once(tmp_path, pki):
    store = open_store(str(tmp_path / "storage"))
    master = MasterKey(os.urandom(32))
    m = make_machine(tmp_path, "lost01", [16 * MiB], seed=61, ps_port=0)
    servers = [InProcessServer(pki, tmp_path / "cache", [m.record], store, master)]
    ctx = pki.client_context(m.id)
    sent = 0

    class Replaced(Link):
        """After 5 acknowledged frames the process server is replaced by one with an empty cache."""

        def send(self, frame, on_ack=None, source=None):
            nonlocal sent
            super().send(frame, on_ack, source)
            sent += 1
            if sent == 5:
                self.wait_acked(frame.seq)
                servers[0].stop()
                servers[0] = InProcessServer(pki, tmp_path / "empty-cache", [m.record], store, master)

    rep = Replicator(m.config, m.state, lambda outbox: Replaced(("127.0.0.1", servers[0].port), ctx, m.id, outbox,
                                                                RateLimit(None)),
                     frame_bytes=256 * 1024, reconnect_for=10)
    started = time.monotonic()
    try:
        with pytest.raises(AcknowledgedDataLost, match=r"reports sequence 0 but had acknowledged 5: .*resync"):
            rep.run_cycle()
        # retrying would go on for reconnect_for (10 s); the rest (a server stopped and another
        # started, 64 MiB of buffers touched) takes well under that even on a loaded machine
        assert time.monotonic() - started < 9, "retried although retrying cannot help"
        assert rep.link is None
        wait_until(lambda: not link_threads(), 5, "the agent's connections to be closed")
        assert m.state.load_disk(0).cycles == 0
    finally:
        for s in servers:
            s.stop()
