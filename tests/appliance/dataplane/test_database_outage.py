"""MySQL restarting under the built-in process server (the appliance's database is a Windows
service that updates restart): the process server looks machines up in it for every session
and every upload. While it is down, agents are told to come back later (not that they are
unregistered) and uploads wait; once it is back, both carry on by themselves, without a
restart of the process server, and every recovery point is still the source."""
from __future__ import annotations

import logging
import os
import threading
import time

import pytest
from cryptography import x509
from replication_appliance.agent.link import Link, RateLimit
from replication_appliance.agent.replicator import Replicator
from replication_appliance.common.secrets import MasterKey
from replication_appliance.common.tls import cert_fingerprint, client_ssl_context
from replication_appliance.db import migrate
from replication_appliance.db.engine import make_engine, parse_db_url, session_factory
from replication_appliance.db.models import Disk, Machine, Policy, ProcessServer
from replication_appliance.process_server.appliance_hook import DatabaseDirectory
from replication_appliance.process_server.server import ProcessServer as DataPort
from replication_appliance.process_server.server import ProcessServerConfig
from replication_appliance.storage import open_store
from sqlalchemy import select

from tests.fixtures.mariadb import restart_mariadb, start_mariadb, stop_mariadb

from .conftest import make_machine, random_writes, sha256, verify_points, wait_until

MiB = 1 << 20


@pytest.fixture()
def own_mariadb(tmp_path):
    server = start_mariadb(tmp_path / "mariadb")
    yield server
    if server.process.poll() is None:
        stop_mariadb(server)


def register(sessions, m, cert_pem: bytes) -> None:
    """The rows `mobility-agent register` leaves: the machine, its disks, its certificate's
    fingerprint, assigned to the built-in process server."""
    with sessions.begin() as s:
        ps = ProcessServer(name="builtin", address="127.0.0.1:9443", builtin=True)
        s.add(ps)
        s.flush()
        s.add(Machine(id=str(m.id), host_id=f"host-{m.id}", hostname=m.record.hostname, os_family="linux",
                      cert_fingerprint=cert_fingerprint(x509.load_pem_x509_certificate(cert_pem)),
                      process_server_id=ps.id,
                      policy_id=s.scalars(select(Policy.id)).one(),
                      disks=[Disk(name=str(p), index=i, size_bytes=size)
                             for i, (p, size) in enumerate(zip(m.images, m.record.disk_sizes))]))


def test_agents_and_uploads_wait_out_a_database_restart(tmp_path, pki, azurite, own_mariadb, caplog):
    caplog.set_level(logging.INFO)
    engine = make_engine(parse_db_url(own_mariadb.url(own_mariadb.new_database(), with_password=True)))
    migrate.upgrade(engine)
    m = make_machine(tmp_path, "sql01", [24 * MiB], seed=31, ps_port=0)
    cert, key = pki.agent(m.id)
    register(session_factory(engine), m, cert.read_bytes())
    store, master = open_store(azurite.connection_string), MasterKey(os.urandom(32))

    def data_port(**cfg) -> DataPort:
        server = DataPort(ProcessServerConfig(tmp_path / "cache", port=0, segment_max_age=0.5, **cfg),
                          pki.server_context(), DatabaseDirectory(session_factory(engine)), store, master)
        server.start()
        return server

    def agent(server: DataPort) -> Replicator:
        ctx = client_ssl_context(pki.ca_pem, cert, key)
        return Replicator(m.config, m.state,
                          lambda outbox: Link(("127.0.0.1", server.port), ctx, m.id, outbox, RateLimit(None)),
                          reconnect_for=120)

    # Initial replication with the database up; its segments stay in the cache (no uploads yet).
    server = data_port(upload_concurrency=0)
    try:
        first = agent(server).run_cycle()
    finally:
        server.stop()
    states = {first.marker_seq: [sha256(m.images[0])]}
    random_writes(m.images[0], 200, seed=32)

    stop_mariadb(own_mariadb)
    server = data_port(upload_backoff_max=1.0)  # submits the waiting segments at once
    try:
        wait_until(lambda: server.health().upload_failures >= 2, 30, "uploads to fail while MySQL is down")
        health = server.health()
        assert "configuration database cannot be read" in health.last_upload_error
        assert health.backlog_segments >= 1 and not health.kept_segments  # waiting, not given up

        result: dict = {}

        def delta() -> None:
            try:
                result["report"] = agent(server).run_cycle()
            except Exception as e:  # noqa: BLE001 - the assertion below reports it
                result["error"] = e

        t = threading.Thread(target=delta, daemon=True)
        t.start()
        wait_until(lambda: _refused_for_the_database(caplog), 30, "the agent to be told to retry later")
        time.sleep(2.0)  # a few more refusals and failed uploads while MySQL stays down
        assert t.is_alive() and server.health().backlog_segments >= 1

        restart_mariadb(own_mariadb)
        t.join(120)
        assert not t.is_alive() and "error" not in result, result.get("error")
        second = result["report"]
        assert second.reconnects >= 1
        states[second.marker_seq] = [sha256(m.images[0])]
        wait_until(lambda: server.health().backlog_bytes == 0, 60, "the cache to drain once MySQL is back")
        assert server.health().last_upload_error == ""
    finally:
        server.stop()
    verify_points(store, master, m, states, tmp_path)
    # nothing in the agent's or the server's log calls the machine unregistered
    assert not any("register the agent first" in r.getMessage() for r in caplog.records)


def _refused_for_the_database(caplog) -> bool:
    return any("no session with the process server" in r.getMessage() and "INTERNAL" in r.getMessage()
               and "configuration database cannot be read" in r.getMessage() for r in caplog.records)
