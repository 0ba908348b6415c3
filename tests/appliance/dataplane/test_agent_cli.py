"""`mobility-agent run` as a user runs it: an unreachable process server is one line and exit 1
with --once, and without --once a failed cycle that the next one tries again; a resync is not
repeated because the heartbeat after it failed."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from replication_appliance.agent import cli, control_client
from replication_appliance.agent.control_client import Desired
from replication_appliance.apply.applier import MachineApplier
from replication_appliance.apply.recovery_points import export_disk
from replication_appliance.common.secrets import MasterKey
from replication_appliance.dataplane.session import StaticDirectory
from replication_appliance.process_server.server import (
    ProcessServer,
    ProcessServerConfig,
)
from replication_appliance.storage import open_store
from replication_appliance.storage.keyring import DataKeyring

from tests.fixtures.ports import free_port

from .conftest import InProcessServer, make_machine, replicator, sha256, wait_until, wait_uploaded

MiB = 1 << 20
AGENT = [sys.executable, "-m", "replication_appliance.agent.cli"]


def registered(tmp_path, pki, name: str, port: int, size: int = 4 * MiB):
    """A machine whose state directory holds what `mobility-agent register` leaves there."""
    m = make_machine(tmp_path, name, [size], seed=81, ps_port=port)
    cert, key = pki.agent(m.id)
    for target, src in ((m.state.ca, pki.ca_pem), (m.state.cert, cert), (m.state.key, key)):
        target.write_bytes(Path(src).read_bytes())
    return m


def test_run_once_without_a_process_server_is_one_line_and_exit_1(tmp_path, pki):
    port = free_port()  # nothing listens there
    m = registered(tmp_path, pki, "once01", port)
    out = subprocess.run([*AGENT, "run", "--once", "--no-heartbeat", "--state-dir", str(m.state.root),
                          "--reconnect-for", "1"], check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("mobility-agent run: process server unreachable for 1s: cannot connect to the process "
                           f"server at 127.0.0.1:{port}: "), last
    assert "Connection refused" in last


def test_continuous_run_outlives_a_process_server_outage_and_replicates_once_it_is_back(tmp_path, pki):
    port = free_port()
    m = registered(tmp_path, pki, "cont01", port)
    store = open_store(str(tmp_path / "storage"))
    master = MasterKey(os.urandom(32))
    out_path, err_path = tmp_path / "agent.out", tmp_path / "agent.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        agent = subprocess.Popen([*AGENT, "run", "--no-heartbeat", "--state-dir", str(m.state.root), "--interval", "0.2",
                                  "--reconnect-for", "0.5"], stdout=out, stderr=err)
    server = None
    try:
        wait_until(lambda: err_path.read_text().count("cycle failed") >= 2, 30, "two failed cycles")
        assert agent.poll() is None, err_path.read_text()
        assert f"127.0.0.1:{port}" in err_path.read_text()
        # the process server is back (on the address the agent was given)
        server = ProcessServer(ProcessServerConfig(tmp_path / "cache", port=port, segment_max_age=0.2),
                               pki.server_context(), StaticDirectory([m.record]), store, master)
        server.start()
        wait_until(lambda: "cycle done" in out_path.read_text(), 60, "a cycle to complete")
        assert agent.poll() is None
        agent.terminate()
        agent.wait(30)
        wait_uploaded(server)
    finally:
        agent.terminate()
        agent.wait(30)
        if server is not None:
            server.stop()
    assert "Traceback" not in err_path.read_text()
    seq = int(out_path.read_text().split("(seq ")[1].split(")")[0])
    MachineApplier(store, DataKeyring(store, master), m.record).apply_until(seq, 60)
    replica = tmp_path / "replica.img"
    export_disk(store, m.record, 0, replica, None)
    assert sha256(replica) == sha256(m.images[0])


def test_after_a_failed_heartbeat_a_resync_done_is_not_asked_for_again():
    resync = Desired("resync", "127.0.0.1:9443", False, 300.0)
    assert cli.next_desired(None, resync) == dataclasses.replace(resync, state="replicate")
    assert cli.next_desired(resync, resync) is resync  # the appliance may ask again: then it is done again
    pause = dataclasses.replace(resync, state="pause")
    assert cli.next_desired(None, pause) is pause
    assert cli.next_desired(None, None) is None


class StopAgent(BaseException):
    """Ends `mobility-agent run`'s loop in the test."""


def test_run_does_not_repeat_a_resync_when_the_heartbeat_after_it_fails(tmp_path, pki, monkeypatch):
    store = open_store(str(tmp_path / "storage"))
    master = MasterKey(os.urandom(32))
    m = registered(tmp_path, pki, "hb01", 0)
    srv = InProcessServer(pki, tmp_path / "cache", [m.record], store, master, segment_max_age=0.2)
    m.config.process_server = f"127.0.0.1:{srv.port}"
    m.state.save_config(m.config)
    stop = threading.Event()

    def apply_continuously() -> None:  # a resync is served once the replica caught up
        applier = MachineApplier(store, DataKeyring(store, master), m.record)
        while not stop.wait(0.2):
            applier.apply_available()

    applying = threading.Thread(target=apply_continuously, daemon=True)
    reported: list[str] = []

    def heartbeat(config, state, body) -> Desired:
        """The configuration server asks for a resync, then cannot be reached."""
        reported.append(body["state"])
        if len(reported) == 1:
            return Desired("resync", m.config.process_server, False, 300.0)
        if len(reported) == 5:
            raise StopAgent
        raise control_client.ControlError(f"configuration server {config.control_server} unreachable: test")

    monkeypatch.setattr(control_client, "heartbeat", heartbeat)
    try:
        replicator(pki, m, srv.port).run_cycle()  # initial replication done
        applying.start()
        with pytest.raises(StopAgent):
            cli.main(["run", "--state-dir", str(m.state.root), "--interval", "0.1"])
    finally:
        stop.set()
        srv.stop()
    # before each cycle and after it: the resync cycle, then a delta cycle (no second resync)
    assert reported == ["continuous", "resync", "continuous", "continuous", "continuous"]
    st = m.state.load_disk(0)
    assert (st.cycles, st.resyncs) == (3, 1)


def test_a_second_agent_on_one_state_folder_is_refused(tmp_path, pki):
    """Two agents on one state folder would number the machine's frames twice over and
    overwrite each other's maps: the second stops with one line; once the first is gone it runs."""
    port = free_port()
    m = registered(tmp_path, pki, "twice01", port)
    args = [*AGENT, "run", "--once", "--no-heartbeat", "--state-dir", str(m.state.root), "--reconnect-for", "0"]
    with m.state.exclusive():  # a running agent
        out = subprocess.run(args, check=False, capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert out.stderr.strip().splitlines()[-1] == (
            f"mobility-agent run: another mobility-agent is using {m.state.root} (it holds "
            f"{m.state.root / 'agent.lock'}): stop it first, or give this one a state folder of its own")
    out = subprocess.run(args, check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "process server unreachable" in out.stderr  # past the lock this time
    missing = tmp_path / "no-such-agent"
    out = subprocess.run([*AGENT, "run", "--once", "--state-dir", str(missing)], check=False, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and "holds no registered agent (no such folder)" in out.stderr
    assert not missing.exists()  # a mistyped folder is not made
