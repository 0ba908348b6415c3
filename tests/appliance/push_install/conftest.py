"""Fixtures for push-install tests: the agent packages (built once per session, wheel downloads
cached in a session folder), a real appliance (`appliance serve` on free loopback ports, SQLite)
and real OpenSSH servers (tests/fixtures/sshd.py) as Linux targets, installing under a
temporary prefix so this machine is not changed."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from replication_appliance.common.datadir import DataDir
from replication_appliance.control.initialise import InitOptions, initialise
from replication_appliance.db.engine import datadir_engine, session_factory

from appliance_build.packaging.agent_packages import build_agent_packages
from tests.appliance.appliance_harness import calm_process_server
from tests.fixtures.ports import free_port, wait_for_port
from tests.fixtures.sshd import (
    SshServer,
    running_sshd,
    sshd,  # noqa: F401 - re-exported fixture
)

APPLIANCE = str(Path(sys.executable).with_name("appliance"))


@pytest.fixture(scope="session")
def wheel_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("wheel-cache")


@pytest.fixture(scope="session")
def agent_packages(tmp_path_factory, wheel_cache) -> Path:
    """dist/ with the agent packages of the appliance's version and SHA256SUMS."""
    dist = tmp_path_factory.mktemp("dist")
    build_agent_packages(dist, cache_dir=wheel_cache)
    return dist


@dataclass
class Appliance:
    data_dir: DataDir
    control_port: int
    process: subprocess.Popen

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.control_port}"

    def cli(self, *args: str, env: dict[str, str] | None = None, check: bool = False) -> subprocess.CompletedProcess:
        result = subprocess.run([APPLIANCE, *args], capture_output=True, text=True, timeout=600,
                                env={**os.environ, **(env or {})})
        if check:
            assert result.returncode == 0, f"appliance {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        return result

    def sessions(self):
        return session_factory(datadir_engine(self.data_dir))

    def calm_process_server(self) -> None:
        """Record an idle load for the built-in process server.

        Here the targets' installs run on the appliance's own 2 cores, so its CPU sample would
        count them and the appliance would (rightly) refuse to assign new machines; on a real
        network they run on their own machines. Tests of that rule belong to the control plane.
        """
        calm_process_server(self.data_dir)


@pytest.fixture
def appliance(tmp_path, agent_packages) -> Iterator[Appliance]:
    root = tmp_path / "appliance"
    initialise(InitOptions(data_dir=root, admin_password="operator-password-for-tests", hostname="127.0.0.1",
                           addresses=["127.0.0.1"], control_port=free_port(), data_port=free_port(),
                           cache_quota_bytes=2**30))
    data_dir = DataDir(root)
    shutil.copytree(agent_packages, root / "agent-packages")
    config = data_dir.load_config()
    log = (tmp_path / "appliance.log").open("wb")
    proc = subprocess.Popen([APPLIANCE, "serve", "--data-dir", str(root), "--bind", "127.0.0.1", "--log-level", "warning"],
                            stdout=log, stderr=log)
    try:
        wait_for_port(config.control_port)
        yield Appliance(data_dir, config.control_port, proc)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@dataclass
class LinuxTarget:
    """An SSH target and the prefix the agent is installed under on it."""

    ssh: SshServer
    root: Path
    disk: Path

    @property
    def installed_version(self) -> str | None:
        marker = self.root / "opt" / "mobility-agent" / "current" / "INSTALLED"
        return marker.read_text().strip() if marker.exists() else None

    @property
    def state_dir(self) -> Path:
        return self.root / "var" / "lib" / "mobility-agent"

    def agent_pid(self) -> int | None:
        pidfile = self.state_dir / "agent.pid"
        if not pidfile.exists():
            return None
        pid = int(pidfile.read_text())
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def stop_agent(self) -> None:
        """Stop the agent the test started (its pid file), as install.sh stop does."""
        pid = self.agent_pid()
        if pid is not None:
            os.kill(pid, 15)


def make_target(ssh: SshServer, root: Path) -> LinuxTarget:
    root.mkdir(parents=True, exist_ok=True)
    disk = root / "disk0.img"
    disk.write_bytes(os.urandom(1 << 20))
    return LinuxTarget(ssh, root, disk)


@pytest.fixture
def linux_target(sshd, tmp_path) -> Iterator[LinuxTarget]:  # noqa: F811 - the fixture, not a redefinition
    target = make_target(sshd, tmp_path / "target-root")
    try:
        yield target
    finally:
        target.stop_agent()


@pytest.fixture
def second_sshd(tmp_path) -> Iterator[SshServer]:
    with running_sshd(tmp_path / "sshd2") as server:
        yield server
