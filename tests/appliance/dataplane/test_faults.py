"""Faults: the process server SIGKILLed mid-stream, the agent killed mid-initial replication,
storage taken away mid-upload while the cache fills, the connection cut mid-stream. After
each, nothing acknowledged is lost and every recovery point equals the source at its marker."""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from replication_appliance.agent.link import Link, Outbox, RateLimit
from replication_appliance.apply.recovery_points import recovery_points
from replication_appliance.storage import open_store

from tests.fixtures.azurite import Azurite

from .conftest import (
    ServerProcess,
    make_machine,
    random_writes,
    replicator,
    sha256,
    verify_points,
    wait_until,
)

MiB = 1 << 20


def install_certs(pki, m) -> None:
    cert, key = pki.agent(m.id)
    for name, src in (("ca.pem", pki.ca_pem), ("agent.pem", cert), ("agent-key.pem", key)):
        (m.state.root / name).write_bytes(Path(src).read_bytes())


class CycleThread(threading.Thread):
    def __init__(self, rep) -> None:
        super().__init__(daemon=True)
        self.rep, self.report, self.error = rep, None, None

    def run(self) -> None:
        try:
            self.report = self.rep.run_cycle()
        except Exception as e:  # noqa: BLE001 - the test reports whatever ended the cycle
            self.error = e


def run_cycle_with(rep, during, timeout: float = 120):
    t = CycleThread(rep)
    t.start()
    during(t)
    t.join(timeout)
    assert not t.is_alive(), "cycle did not finish"
    assert t.error is None, f"cycle failed: {t.error!r}"
    return t.report


@pytest.fixture()
def own_azurite(tmp_path):
    az = Azurite(tmp_path / "azurite")
    az.start()
    yield az
    az.stop()


def throttled_connect(pki, m, port, rate):
    ctx = pki.client_context(m.id)
    return lambda outbox: Link(("127.0.0.1", port), ctx, m.id, outbox, RateLimit(rate))


@pytest.mark.slow
def test_process_server_sigkill_during_initial_and_delta(tmp_path, pki, own_azurite):
    m = make_machine(tmp_path, "app01", [96 * MiB], seed=11, ps_port=0)
    ps = ServerProcess(pki, tmp_path / "appliance", [m.record], own_azurite.connection_string)
    ps.start()
    rng = random.Random(5)
    states = {}
    try:
        from replication_appliance.agent.replicator import Replicator

        rep = Replicator(m.config, m.state, throttled_connect(pki, m, ps.port, 40 * MiB), reconnect_for=60)

        def kill_and_restart(t):
            for _ in range(2):
                time.sleep(rng.uniform(0.3, 0.9))
                if not t.is_alive():
                    break
                ps.kill()
                ps.start()

        report = run_cycle_with(rep, kill_and_restart)
        assert report.reconnects >= 1 and "initial" in report.phases[0]
        states[report.marker_seq] = [sha256(m.images[0])]
        for cycle in range(2):
            random_writes(m.images[0], 2000, seed=cycle)
            report = run_cycle_with(rep, kill_and_restart)
            states[report.marker_seq] = [sha256(m.images[0])]
        store = open_store(own_azurite.connection_string)
        verify_points(store, ps.master(), m, states, tmp_path)
        wait_until(lambda: ps.health()["backlog_bytes"] == 0, 30, "the cache to drain")
    finally:
        ps.stop()


@pytest.mark.slow
def test_agent_killed_mid_initial_resumes_from_last_acknowledged_position(tmp_path, pki, own_azurite):
    m = make_machine(tmp_path, "file01", [128 * MiB], seed=12, ps_port=0)
    ps = ServerProcess(pki, tmp_path / "appliance", [m.record], own_azurite.connection_string)
    ps.start()
    m.config.process_server = f"127.0.0.1:{ps.port}"
    m.state.save_config(m.config)
    install_certs(pki, m)
    try:
        cmd = [sys.executable, "-m", "replication_appliance.agent.cli", "run", "--state-dir", str(m.state.root),
               "--once", "--no-heartbeat", "--max-rate", "30M"]
        agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_until(lambda: m.state.load_disk(0).initial_offset > 16 * MiB, 30, "an initial replication checkpoint")
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        checkpoint = m.state.load_disk(0).initial_offset
        assert 0 < checkpoint < 128 * MiB
        out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        read = int(out.stdout.split("read ")[1].split(" bytes")[0])
        skipped = int(out.stdout.split("skipped ")[1].split(" bytes")[0])  # the image's holes are not read
        assert read + skipped == 128 * MiB - checkpoint, "the resumed run must start at the checkpoint, not at zero"
        store = open_store(own_azurite.connection_string)
        seq = int(out.stdout.split("(seq ")[1].split(")")[0])
        verify_points(store, ps.master(), m, {seq: [sha256(m.images[0])]}, tmp_path)
    finally:
        ps.stop()


OUTAGE_SECONDS = 30  # the outage: storage gone for 30 s mid-upload


@pytest.mark.slow
def test_storage_outage_fills_the_cache_agent_is_throttled_nothing_is_lost(tmp_path, pki, own_azurite):
    m = make_machine(tmp_path, "db01", [96 * MiB], seed=13, ps_port=0)
    # A 32 MiB cache disk: throttling starts at 80 % use, well before the image is through.
    ps = ServerProcess(pki, tmp_path / "appliance", [m.record], own_azurite.connection_string,
                       extra=["--cache-capacity", str(32 * MiB), "--segment-bytes", str(4 * MiB),
                              "--upload-backoff-max", "2"])
    ps.start()
    try:
        # The agent has met this process server before the outage: a machine new to a cache is
        # numbered on from what storage holds of it, so its first session needs storage.
        Link(("127.0.0.1", ps.port), pki.client_context(m.id), m.id, Outbox(MiB), RateLimit(None)).close()
        rep = replicator(pki, m, ps.port, reconnect_for=60)
        seen = {}

        def outage(t):
            stopped = time.monotonic()
            own_azurite.stop()
            wait_until(lambda: ps.health()["throttled"] and ps.health()["upload_failures"], 60,
                       "the process server to throttle and report failed uploads")
            seen.update(ps.health())
            time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - stopped)))
            late = ps.health()  # the whole outage long: still up, still holding the agent back, retrying
            assert late["throttled"] and late["upload_failures"] > seen["upload_failures"]
            own_azurite.start()

        report = run_cycle_with(rep, outage)
        assert seen["throttled"] and seen["upload_failures"] > 0 and seen["last_upload_error"]
        assert seen["cache_used_bytes"] <= 32 * MiB
        assert report.throttle_events >= 1
        wait_until(lambda: ps.health()["backlog_bytes"] == 0, 90, "the cache to drain after storage returned")
        health = ps.health()
        assert not health["throttled"] and health["last_upload_error"] == ""
        store = open_store(own_azurite.connection_string)
        verify_points(store, ps.master(), m, {report.marker_seq: [sha256(m.images[0])]}, tmp_path)
    finally:
        ps.stop()


class CuttingProxy:
    """Forwards TCP to the process server; the first connection is cut after `cut_after` bytes."""

    def __init__(self, target_port: int, cut_after: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target = target_port
        self.cut_after = cut_after
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection(("127.0.0.1", self.target))
            limit = self.cut_after if self.connections == 1 else None
            threading.Thread(target=self._pipe, args=(client, upstream, limit), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, None), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        moved = 0
        try:
            while data := src.recv(65536):
                if limit is not None and moved + len(data) >= limit:
                    dst.sendall(data[:limit - moved])
                    break
                dst.sendall(data)
                moved += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.listener.close()


@pytest.mark.slow
def test_connection_cut_mid_stream(tmp_path, pki, own_azurite):
    m = make_machine(tmp_path, "web02", [48 * MiB, 8 * MiB], seed=14, ps_port=0)
    ps = ServerProcess(pki, tmp_path / "appliance", [m.record], own_azurite.connection_string)
    ps.start()
    proxy = CuttingProxy(ps.port, cut_after=5 * MiB + 12345)  # mid-frame
    try:
        rep = replicator(pki, m, proxy.port, reconnect_for=30)
        report = rep.run_cycle()
        assert report.reconnects == 1 and proxy.connections == 2
        store = open_store(own_azurite.connection_string)
        verify_points(store, ps.master(), m, {report.marker_seq: [sha256(p) for p in m.images]}, tmp_path)
    finally:
        proxy.close()
        ps.stop()


@pytest.mark.slow
def test_continuous_apply_rides_out_a_storage_outage(tmp_path, pki, own_azurite):
    """`appliance apply` without --once runs as the cloud side's service: storage going away
    for a while must not end it, and logs arriving after it comes back are applied."""
    m = make_machine(tmp_path, "app01", [16 * MiB], seed=17, ps_port=0)
    ps = ServerProcess(pki, tmp_path / "appliance", [m.record], own_azurite.connection_string,
                       extra=["--upload-backoff-max", "1"])
    ps.start()
    store = open_store(own_azurite.connection_string)
    apply = None
    try:
        rep = replicator(pki, m, ps.port, reconnect_for=60)
        first = rep.run_cycle()
        states = {first.marker_seq: [sha256(m.images[0])]}
        wait_until(lambda: ps.health()["backlog_bytes"] == 0, 60, "the first cycle uploaded")
        env = {**os.environ, "APPLIANCE_STORAGE_CONNECTION_STRING": own_azurite.connection_string}
        with open(tmp_path / "apply.log", "wb") as out:
            apply = subprocess.Popen([sys.executable, "-m", "replication_appliance.cli", "apply", "--data-dir",
                                      str(ps.workdir), "--machine", "app01", "--poll", "0.2"],
                                     stdout=out, stderr=subprocess.STDOUT, env=env)

        def points() -> set[int]:
            return {p.seq for p in recovery_points(store, m.record)}

        wait_until(lambda: first.marker_seq in points(), 60, "the first recovery point applied")
        second_apply = subprocess.run([sys.executable, "-m", "replication_appliance.cli", "apply", "--data-dir",
                                       str(ps.workdir), "--machine", "app01", "--once"],
                                      capture_output=True, text=True, env=env, timeout=60, check=False)
        assert second_apply.returncode == 1 and "another `appliance apply` for app01 is running" in second_apply.stderr
        assert f"process {apply.pid}" in second_apply.stderr

        own_azurite.stop()
        wait_until(lambda: "storage unavailable" in (tmp_path / "apply.log").read_text(), 60,
                   "apply to report the outage")
        time.sleep(3)  # several failed polls
        assert apply.poll() is None, (tmp_path / "apply.log").read_text()
        random_writes(m.images[0], 300, seed=18)
        own_azurite.start()

        second = rep.run_cycle()
        states[second.marker_seq] = [sha256(m.images[0])]
        wait_until(lambda: second.marker_seq in points(), 90, "the second recovery point applied after the outage")
        assert apply.poll() is None
    finally:
        if apply is not None:
            apply.terminate()
            apply.wait(timeout=30)
        ps.stop()
    log = (tmp_path / "apply.log").read_text()
    assert "applied" in log and "Traceback" not in log
    verify_points(store, ps.master(), m, states, tmp_path)
