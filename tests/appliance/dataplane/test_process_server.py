"""The data port against real TLS: certificates, garbage, validation, back-pressure, health."""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import socket
import ssl
import threading
import time
import uuid
from types import SimpleNamespace

import pytest
from replication_appliance.agent.link import Link, Outbox, RateLimit
from replication_appliance.common.secrets import MasterKey
from replication_appliance.common.tls import CertificateAuthority, client_ssl_context
from replication_appliance.dataplane import frames as F
from replication_appliance.dataplane.segment import SEGMENT_ALIGN, iter_records, replica_name
from replication_appliance.dataplane.session import MachineRecord
from replication_appliance.process_server import journal as journal_module
from replication_appliance.process_server import server as server_module
from replication_appliance.storage import open_store

from .conftest import InProcessServer, refuse_renaming_open_files, wait_until

SIZE = 8 << 20


@pytest.fixture()
def machines():
    return [MachineRecord(uuid.uuid4(), "web01", (SIZE,)), MachineRecord(uuid.uuid4(), "db01", (SIZE, SIZE))]


@pytest.fixture()
def server(pki, tmp_path, machines):
    s = InProcessServer(pki, tmp_path / "cache", machines, open_store(str(tmp_path / "storage")),
                        MasterKey(os.urandom(32)))
    yield s
    s.stop()


def tls(pki, port, machine=None, **kw) -> ssl.SSLSocket:
    ctx = pki.client_context(machine, **kw) if machine else client_ssl_context(pki.ca_pem)
    return ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="127.0.0.1")


def read_frame(sock) -> F.Frame:
    buf = b""
    while True:
        try:
            return F.decode(buf)[0]
        except F.IncompleteFrame as e:
            chunk = sock.recv(e.missing)
            if not chunk:
                raise ConnectionError(f"closed after {len(buf)} bytes")
            buf += chunk


def hello(sock, machine) -> F.Frame:
    sock.sendall(F.encode(F.Frame(F.Kind.HELLO, machine)))
    return read_frame(sock)


def assert_still_serving(pki, server, machine):
    s = tls(pki, server.port, machine)
    assert hello(s, machine).kind is F.Kind.WELCOME
    s.close()


def test_session_acks_only_durable_data(pki, server, machines):
    m = machines[0].machine_id
    s = tls(pki, server.port, m)
    assert hello(s, m).seq == 0
    s.sendall(F.encode(F.Frame(F.Kind.DATA, m, seq=1, offset=4096, payload=b"x" * 4096)))
    ack = read_frame(s)
    assert (ack.kind, ack.seq) == (F.Kind.ACK, 1)
    journal = server.server.journals.get(m)
    segment = next(journal.dir.glob("*.open")).read_bytes()
    assert journal.last_seq == 1 and [(r.header.seq, bytes(r.payload)) for r in iter_records(segment)] == [(1, b"x" * 4096)]
    # written with direct I/O: the record, then zeros up to the next alignment boundary
    assert len(segment) == SEGMENT_ALIGN * 2 and segment[F.HEADER_SIZE + 4096:] == bytes(len(segment) - F.HEADER_SIZE - 4096)
    s.close()
    s = tls(pki, server.port, m)
    assert hello(s, m).seq == 1  # a new session learns where to resume


@pytest.mark.parametrize("garbage, expected", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(64), "MALFORMED: bad frame magic"),
    (F.encode(F.Frame(F.Kind.DATA, uuid.UUID(int=1), seq=1, payload=b"x" * 512)), "NOT_AUTHORIZED"),
    ("data-before-hello", "PROTOCOL: DATA before HELLO"),
    ("seq-gap", "SEQUENCE: sequence 5 out of order: expected 1"),
    ("past-end", "OUT_OF_RANGE: write of 4096 bytes"),
    ("bad-disk", "OUT_OF_RANGE: disk 1 is not registered"),
    ("corrupt", "MALFORMED: DATA frame seq 1 fails its checksum"),
])
def test_garbage_gets_a_clear_error_and_the_server_stays_up(pki, server, machines, garbage, expected):
    m = machines[0].machine_id
    s = tls(pki, server.port, m)
    frame = lambda **kw: F.encode(F.Frame(F.Kind.DATA, m, **kw))
    if garbage == "data-before-hello":
        s.sendall(frame(seq=1, payload=b"x" * 512))
    else:
        assert hello(s, m).kind is F.Kind.WELCOME
        payloads = {"seq-gap": frame(seq=5, payload=b"x" * 512),
                    "past-end": frame(seq=1, offset=SIZE - 512, payload=b"x" * 4096),
                    "bad-disk": frame(seq=1, disk=1, payload=b"x" * 512),
                    "corrupt": frame(seq=1, payload=b"x" * 512)[:-1] + b"y"}
        s.sendall(payloads.get(garbage, garbage) if isinstance(garbage, str) else garbage)
    err = read_frame(s)
    assert err.kind is F.Kind.ERROR and F.error_text(err).startswith(expected), F.error_text(err)
    s.close()
    assert server.server.journals.get(m).last_seq == 0  # nothing of it was journaled
    assert_still_serving(pki, server, m)


def test_plain_tcp_garbage_and_missing_or_foreign_certificates_are_refused(pki, server, machines):
    m = machines[0].machine_id
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: appliance\r\n\r\n")
        assert raw.recv(200).startswith(b"ERROR: this is the replication data port; it speaks TLS 1.2+")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        s = tls(pki, server.port)  # no client certificate
        hello(s, m)
    foreign = CertificateAuthority.create("someone else")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        s = tls(pki, server.port, m, ca=foreign)
        hello(s, m)
    # a certificate the appliance issued, but not for an agent role
    s = tls(pki, server.port, m, role="process-server")
    err = read_frame(s)
    assert F.error_text(err).startswith("NOT_AUTHORIZED: the client certificate does not belong to a registered machine")
    assert_still_serving(pki, server, m)


def test_a_machine_cannot_write_as_another(pki, server, machines):
    web, db = machines[0].machine_id, machines[1].machine_id
    s = tls(pki, server.port, web)
    err = hello(s, db)
    assert F.error_text(err) == (f"NOT_AUTHORIZED: frame names machine {db} but the client certificate belongs to {web}")
    assert server.server.journals.get(db).last_seq == 0


def test_back_pressure_when_cache_free_space_is_low(pki, tmp_path, machines):
    m = machines[0].machine_id
    capacity = 8 << 20
    srv = InProcessServer(pki, tmp_path / "cache", machines, open_store(str(tmp_path / "storage")),
                          MasterKey(os.urandom(32)), cache_capacity_bytes=capacity, segment_max_bytes=1 << 20)
    srv.server.uploader.close()  # storage "stalls": nothing leaves the cache
    try:
        outbox = Outbox(window_bytes=64 << 20)
        link = Link(("127.0.0.1", srv.port), pki.client_context(m), m, outbox, RateLimit(None))
        sent = []

        def pump():
            for seq in range(1, 17):  # 16 MiB into a cache of 8 MiB
                link.send(F.Frame(F.Kind.DATA, m, seq=seq, offset=((seq - 1) % 8) << 20, payload=os.urandom(1 << 20)))
                sent.append(seq)

        t = threading.Thread(target=pump, daemon=True)
        t.start()
        wait_until(lambda: srv.server.health().throttled, 20, "throttling")
        journal = srv.server.journals.get(m)
        # throttled, the session acknowledges what it made durable and takes nothing more
        wait_until(lambda: link.throttled and journal.last_seq == outbox.acked, 20, "the durable frames acknowledged")
        time.sleep(1.0)
        acked = outbox.acked
        report = srv.server.health()
        assert report.throttled and report.cache_used_bytes > 0.8 * capacity and report.throttle_events >= 1
        assert acked < 16 and link.throttled
        assert journal.last_seq == acked  # nothing beyond what is durable was acknowledged, nor taken since
        # space comes back (uploads drain the cache): the agent carries on, nothing was dropped
        def drain():
            for seg in srv.server.journals.get(m).pending():
                seg.path.unlink()
            return outbox.acked == 16

        wait_until(drain, 20, "all 16 frames acknowledged")
        assert srv.server.journals.get(m).last_seq == 16
        link.close()
    finally:
        srv.stop()


def test_free_space_is_counted_as_df_does(pki, tmp_path, machines, monkeypatch):
    """Blocks reserved for root (or beyond a quota) are neither used nor free to the service: a
    file system with 10 GB used and 90 GB available is 90 % free, however large its raw size."""
    GB = 10**9
    fake = SimpleNamespace(total=400 * GB, used=10 * GB, free=90 * GB)
    monkeypatch.setattr(server_module.shutil, "disk_usage", lambda path: fake)
    srv = InProcessServer(pki, tmp_path / "cache", machines, open_store(str(tmp_path / "storage")),
                          MasterKey(os.urandom(32)))
    try:
        report = srv.server.health()
        assert report.cache_total_bytes == 100 * GB
        assert report.cache_free_fraction == 0.9 and not report.throttled
        fake = SimpleNamespace(total=400 * GB, used=85 * GB, free=15 * GB)  # 15 % free: throttle
        report = srv.server.health()
        assert report.cache_free_fraction == 0.15 and report.throttled
    finally:
        srv.stop()


def test_health_is_served_while_a_reader_holds_the_published_file(pki, tmp_path, machines, monkeypatch):
    """On Windows the published health.json cannot be replaced while someone reads it: the
    server skips that publication (and serves health all the same) and publishes again later."""
    refused: list[str] = []
    refuse_renaming_open_files(monkeypatch, refused)
    srv = InProcessServer(pki, tmp_path / "cache", machines, open_store(str(tmp_path / "storage")),
                          MasterKey(os.urandom(32)))
    published = tmp_path / "cache" / "health.json"
    try:
        with open(published) as reader:
            held = json.loads(reader.read())
            assert srv.server.health().throttled is False  # served, though not published
            assert refused and json.loads(published.read_text()) == held  # the file was left as it was
        wait_until(lambda: json.loads(published.read_text())["updated_at"] > held["updated_at"], 5,
                   "health published again")
        assert not list((tmp_path / "cache").glob("*.tmp"))
    finally:
        srv.stop()


def test_health_asked_from_several_threads_at_once_is_published_whole(pki, tmp_path, machines):
    """The monitor publishes health.json every 0.5 s and `health()` (the heartbeat) publishes
    too: publications from two threads at once must neither fail nor leave a torn file."""
    srv = InProcessServer(pki, tmp_path / "cache", machines, open_store(str(tmp_path / "storage")),
                          MasterKey(os.urandom(32)))
    errors: list[BaseException] = []
    published = tmp_path / "cache" / "health.json"

    def ask(n: int) -> None:
        try:
            for _ in range(n):
                srv.server.health()
                json.loads(published.read_text())
        except BaseException as e:  # noqa: BLE001 - any failure is the finding
            errors.append(e)

    try:
        threads = [threading.Thread(target=ask, args=(300,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
    finally:
        srv.stop()


def test_a_corrupt_sealed_segment_is_kept_and_reported_and_the_rest_uploaded(pki, tmp_path, machines, caplog):
    """Retrying cannot mend a segment damaged on the cache disk: it stays there (for the
    operator), health names it, and the uploader neither spins on it nor stops on it."""
    web, db = machines[0].machine_id, machines[1].machine_id
    store, master = open_store(str(tmp_path / "storage")), MasterKey(os.urandom(32))
    srv = InProcessServer(pki, tmp_path / "cache", machines, store, master, upload_concurrency=0)
    try:
        for m in (web, db):
            s = tls(pki, srv.port, m)
            hello(s, m)
            s.sendall(F.encode(F.Frame(F.Kind.DATA, m, seq=1, offset=0, payload=os.urandom(4096))))
            assert read_frame(s).kind is F.Kind.ACK
            s.close()
    finally:
        srv.stop()  # seals both segments, none uploaded
    damaged = next((tmp_path / "cache" / str(web)).glob("*.sealed"))
    with open(damaged, "r+b") as f:
        f.seek(F.HEADER_SIZE + 100)  # inside the record's payload: its checksum no longer matches
        f.write(b"\xff" * 8)
    srv = InProcessServer(pki, tmp_path / "cache", machines, store, master, upload_backoff_max=0.5)
    try:
        wait_until(lambda: srv.server.health().kept_segments, 20, "the damaged segment reported")
        wait_until(lambda: not list((tmp_path / "cache" / str(db)).glob("*.sealed")), 20, "the sound segment uploaded")
        report = srv.server.health()
        assert report.kept_segments == [str(damaged)] and damaged.exists()
        assert any("cannot be uploaded" in r.message and "corrupt at byte" in r.message for r in caplog.records)
        failures = report.upload_failures
        time.sleep(1.5)  # three backoffs' time: not retried
        assert srv.server.health().upload_failures == failures == 1
        names = [b.name for b in store.list_blobs("logs/")]
        assert not any(n.startswith(f"logs/{web}/") for n in names)
        assert any(n.startswith(f"logs/{db}/") for n in names)
        published = json.loads((tmp_path / "cache" / "health.json").read_text())
        assert published["kept_segments"] == [str(damaged)]
    finally:
        srv.stop()


def journal_seqs(cache, machine) -> list[int]:
    seqs = []
    for p in sorted((cache / str(machine)).glob("*.*")):
        if p.suffix in (".open", ".sealed"):
            seqs += [r.header.seq for r in iter_records(p.read_bytes())]
    return seqs


def test_after_a_failed_journal_write_the_next_session_starts_from_what_is_on_disk(pki, tmp_path, machines,
                                                                                   monkeypatch):
    """A small record waits in the staging buffer until the next write; when that write fails
    (the cache disk full or failing), the record is not on disk. The next WELCOME must not
    count it: the agent drops whatever the WELCOME covers from its outbox and would never
    send it again."""
    m = machines[0].machine_id
    failing = [True]
    real_pwrite = journal_module.fileio.pwrite

    def pwrite(fd, data, offset):
        # the first write into a segment fails (state files go through pwrite too)
        if failing and os.readlink(f"/proc/self/fd/{fd}").endswith(".open") and failing.pop():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(journal_module.fileio, "pwrite", pwrite)
    cache = tmp_path / "cache"
    srv = InProcessServer(pki, cache, machines, open_store(str(tmp_path / "storage")), MasterKey(os.urandom(32)),
                          upload_concurrency=0)
    frames = [F.Frame(F.Kind.DATA, m, seq=1, offset=0, payload=b"s" * 4096),  # staged
              F.Frame(F.Kind.DATA, m, seq=2, offset=1 << 20, payload=os.urandom(256 << 10))]
    try:
        s = tls(pki, srv.port, m)
        assert hello(s, m).seq == 0
        s.sendall(b"".join(F.encode(f) for f in frames))
        with pytest.raises((ConnectionError, OSError)):
            while True:
                assert read_frame(s).kind is not F.Kind.ACK  # nothing was durable: nothing acknowledged
        s.close()
        s = tls(pki, srv.port, m)
        welcome = hello(s, m)
        assert welcome.seq == 0 and journal_seqs(cache, m) == []
        s.sendall(b"".join(F.encode(f) for f in frames))  # the agent resends from the WELCOME's sequence
        assert read_frame(s).seq in (1, 2)
        wait_until(lambda: srv.server.journals.get(m).last_seq == 2, 10, "both records journaled")
        s.close()
    finally:
        srv.stop()
    assert journal_seqs(cache, m) == [1, 2]


def test_the_port_stays_open_after_accept_fails(pki, server, machines):
    """Out of descriptors (EMFILE), or a connection reset before it was accepted: accept()
    fails for that one connection, and the server must go on accepting the others."""
    real = server.server._listener

    class Failing:
        failed = False

        def accept(self):
            if not Failing.failed:
                Failing.failed = True
                raise OSError(errno.EMFILE, "Too many open files")
            return real.accept()

        def __getattr__(self, name):
            return getattr(real, name)

    server.server._listener = Failing()
    wait_until(lambda: Failing.failed, 5, "the failing accept")
    assert_still_serving(pki, server, machines[0].machine_id)


def test_a_reconnecting_agent_gets_in_while_the_cache_is_throttled(pki, tmp_path, machines):
    """While throttled the old session waits for space; an agent that reconnects (its old
    connection dropped) must take over at once, not be told after 30 s that a session is
    still active (a final error to it)."""
    m = machines[0].machine_id
    capacity = 4 << 20
    srv = InProcessServer(pki, tmp_path / "cache", machines, open_store(str(tmp_path / "storage")),
                          MasterKey(os.urandom(32)), cache_capacity_bytes=capacity, segment_max_bytes=1 << 20,
                          upload_concurrency=0)
    try:
        old = tls(pki, srv.port, m)
        hello(old, m)
        for seq in range(1, 5):  # 4 MiB into a 4 MiB cache: throttled
            old.sendall(F.encode(F.Frame(F.Kind.DATA, m, seq=seq, offset=(seq - 1) << 20, payload=os.urandom(1 << 20))))
        wait_until(lambda: srv.server.health().throttled, 20, "throttling")
        started = time.monotonic()
        new = tls(pki, srv.port, m)
        welcome = hello(new, m)
        assert welcome.kind is F.Kind.WELCOME, F.error_text(welcome)
        assert time.monotonic() - started < 10
        new.close()
        old.close()
    finally:
        srv.stop()


def test_apply_refuses_a_log_whose_metadata_was_altered(pki, machines, tmp_path):
    """A log blob's last sequence moves apply's position: someone able to write metadata (but
    without the keys) could otherwise make apply skip every record after it."""
    from replication_appliance.apply.applier import MachineApplier, find_machine
    from replication_appliance.dataplane.segment import SegmentError, blob_name
    from replication_appliance.storage.keyring import DataKeyring

    m = machines[0].machine_id
    store, master = open_store(str(tmp_path / "storage")), MasterKey(os.urandom(32))
    srv = InProcessServer(pki, tmp_path / "cache", machines, store, master)
    try:
        s = tls(pki, srv.port, m)
        hello(s, m)
        s.sendall(F.encode(F.Frame(F.Kind.DATA, m, seq=1, offset=0, payload=os.urandom(4096))))
        s.sendall(F.encode(F.Frame(F.Kind.MARKER, m, seq=2, offset=time.time_ns(), payload=b"m2")))
        assert read_frame(s).kind is F.Kind.ACK
        s.close()
        name = blob_name(m, 0, 0)
        wait_until(lambda: any(b.name == name for b in store.list_blobs("logs/")), 20, "the log uploaded")
    finally:
        srv.stop()
    blob, meta = store.get_blob(name)
    store.put_blob(name, blob, {**meta, "last_seq": str(10**18)})  # same bytes, altered metadata
    applier = MachineApplier(store, DataKeyring(store, master), find_machine(store, str(m)))
    with pytest.raises(SegmentError, match="fails authentication"):
        applier.apply_available()
    assert applier.applied_seq() == 0


def test_apply_deletes_each_log_it_applied_and_one_uploaded_again_after_it(pki, machines, tmp_path):
    """Cache storage is a staging area: a log goes once applied. A process server restarted
    after an upload it had not yet recorded uploads that segment again; apply deletes such a
    log (below its recorded position) when it starts, and does not apply it twice."""
    from replication_appliance.apply.applier import MachineApplier, find_machine
    from replication_appliance.dataplane.segment import blob_name
    from replication_appliance.storage.keyring import DataKeyring

    m = machines[0].machine_id
    store, master = open_store(str(tmp_path / "storage")), MasterKey(os.urandom(32))
    srv = InProcessServer(pki, tmp_path / "cache", machines, store, master)
    first, second = os.urandom(4096), os.urandom(4096)
    try:
        s = tls(pki, srv.port, m)
        hello(s, m)
        for seq, frame in enumerate([F.Frame(F.Kind.DATA, m, offset=0, payload=first),
                                     F.Frame(F.Kind.MARKER, m, offset=time.time_ns(), payload=b"m2"),
                                     F.Frame(F.Kind.DATA, m, offset=0, payload=second),
                                     F.Frame(F.Kind.MARKER, m, offset=time.time_ns(), payload=b"m4")], 1):
            s.sendall(F.encode(dataclasses.replace(frame, seq=seq)))
            if frame.kind is F.Kind.MARKER:  # a marker seals its segment: logs 0 and 1
                while read_frame(s).seq < seq:
                    pass
        s.close()
        logs = [blob_name(m, 0, 0), blob_name(m, 0, 1)]
        wait_until(lambda: {b.name for b in store.list_blobs(f"logs/{m}/0/")} == set(logs), 20, "both logs uploaded")
    finally:
        srv.stop()
    keyring = DataKeyring(store, master)
    log0 = store.get_blob(logs[0])
    applier = MachineApplier(store, keyring, find_machine(store, str(m)))
    assert applier.disks[0].apply_next()  # log 0 only
    assert [b.name for b in store.list_blobs(f"logs/{m}/0/")] == [logs[1]]
    store.put_blob(logs[0], *log0)  # uploaded again by a restarted process server
    applier = MachineApplier(store, keyring, find_machine(store, str(m)))
    assert [b.name for b in store.list_blobs(f"logs/{m}/0/")] == [logs[1]]  # not yet applied: kept
    assert applier.apply_available() == 1 and applier.applied_seq() == 4
    assert store.list_blobs(f"logs/{m}/") == []
    assert store.read_pages(replica_name(m, 0), 0, 4096) == second  # log 0 was not applied over log 1


def test_stop_closes_the_journals_only_after_every_session_ended(pki, tmp_path, machines, monkeypatch):
    """A session still starting (or writing) when stop() is called writes to its journal: were
    the journals closed first, it would open a segment after the close, and a server started
    again on the same cache in this process would share that journal with it."""
    m = machines[0].machine_id
    entered, go_on, events = threading.Event(), threading.Event(), []
    real_begin, real_close = journal_module.MachineJournal.begin_session, journal_module.Journals.close

    def held_begin(self, sizes):
        entered.set()
        go_on.wait(10)
        events.append("session wrote")
        return real_begin(self, sizes)

    def recorded_close(self):
        events.append("journals closed")
        real_close(self)

    monkeypatch.setattr(journal_module.MachineJournal, "begin_session", held_begin)
    monkeypatch.setattr(journal_module.Journals, "close", recorded_close)
    srv = InProcessServer(pki, tmp_path / "cache", machines, open_store(str(tmp_path / "storage")),
                          MasterKey(os.urandom(32)), upload_concurrency=0)
    s = tls(pki, srv.port, m)
    try:
        assert entered.wait(10)
        stopping = threading.Thread(target=srv.stop)
        stopping.start()
        stopping.join(0.5)
        assert stopping.is_alive()  # waiting for the session
        go_on.set()
        stopping.join(20)
        assert not stopping.is_alive() and events == ["session wrote", "journals closed"]
    finally:
        go_on.set()
        s.close()


def test_the_monitor_hands_a_segment_over_only_once_its_state_is_written(pki, tmp_path, machines, monkeypatch):
    """A seal's state write failed after the rename: uploaded (and deleted) while state.json
    does not count it, a restart would give its number and sequences out again."""
    m = machines[0].machine_id
    store = open_store(str(tmp_path / "storage"))
    srv = InProcessServer(pki, tmp_path / "cache", machines, store, MasterKey(os.urandom(32)))
    try:
        j = srv.server.journals.get(m)
        j.begin_session(machines[0].disk_sizes)
        raw = F.encode(F.Frame(F.Kind.DATA, m, seq=1, offset=0, payload=os.urandom(4096)))
        with j.lock:
            j.append(F.decode_header(raw[:F.HEADER_SIZE]), journal_module.RecordBuffer.of(raw[:F.HEADER_SIZE],
                                                                                          raw[F.HEADER_SIZE:]))
            j.sync()
        real_write = journal_module._write_json_atomic

        def state_write_fails(path, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(journal_module, "_write_json_atomic", state_write_fails)
        with pytest.raises(OSError):
            j.begin_session(tuple(2 * n for n in machines[0].disk_sizes))  # seals segment 0
        time.sleep(1.5)  # three rounds of the monitor
        assert j.handover_due and store.list_blobs(f"logs/{m}/") == []
        monkeypatch.setattr(journal_module, "_write_json_atomic", real_write)
        wait_until(lambda: store.list_blobs(f"logs/{m}/"), 20, "the segment uploaded once its state is written")
        assert journal_module.read_state(j.dir).next_segno == 1
    finally:
        srv.stop()


def test_a_connection_whose_handshake_ends_after_stop_is_told_to_retry(pki, tmp_path, machines):
    """Accepted before stop(), its TLS handshake finished after it (the client slow to say
    hello): the journals are closed by then, so it must not start a session, and the agent
    must hear that the server is going away, not a bare hang-up."""
    m = machines[0].machine_id
    srv = InProcessServer(pki, tmp_path / "cache", machines, open_store(str(tmp_path / "storage")),
                          MasterKey(os.urandom(32)), upload_concurrency=0)
    raw = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    serving = f"ps-conn-{raw.getsockname()[1]}"  # accepted: its thread waits for the client's first byte
    wait_until(lambda: any(t.name == serving for t in threading.enumerate()), 10, "the connection accepted")
    srv.stop()
    s = pki.client_context(m).wrap_socket(raw, server_hostname="127.0.0.1")
    try:
        err = read_frame(s)
        assert err.kind is F.Kind.ERROR and F.error_text(err) == "INTERNAL: the process server is stopping: retry later"
        assert list((tmp_path / "cache").glob(f"{m}/*.open")) == []
    finally:
        s.close()
