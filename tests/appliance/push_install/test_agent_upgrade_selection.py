"""Which agents `appliance agents upgrade` pushes to: older ones, with the path of their last
push install; current ones are left alone; one newer than the appliance stops the upgrade."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from replication_appliance.common.datadir import DataDir
from replication_appliance.control.initialise import InitOptions, initialise
from replication_appliance.control.service import default_policy
from replication_appliance.db.engine import datadir_engine, session_factory
from replication_appliance.db.models import Machine
from replication_appliance.push_install import jobs, service
from replication_appliance.push_install.errors import PushInstallError, VersionRefused
from replication_appliance.push_install.plan import Target

from tests.fixtures.ports import free_port


@pytest.fixture
def appliance_db(tmp_path: Path, agent_packages: Path):
    root = tmp_path / "appliance"
    initialise(InitOptions(data_dir=root, admin_password="operator-password-for-tests", hostname="127.0.0.1",
                           addresses=["127.0.0.1"], control_port=free_port(), data_port=free_port()))
    data_dir = DataDir(root)
    shutil.copytree(agent_packages, service.packages_dir(data_dir))
    engine = datadir_engine(data_dir)
    yield data_dir, session_factory(engine)
    engine.dispose()


def pushed(sessions, name: str, port: int, agent_version: str) -> str:
    """A machine registered by a succeeded push install of `agent_version`."""
    with sessions.begin() as session:
        machine = Machine(host_id=f"host-{name}", hostname=name, os_family="linux", agent_version=agent_version,
                          policy=default_policy(session))
        session.add(machine)
        session.flush()
        machine_id = machine.id
    target = Target("127.0.0.1", "linux", port, f"/srv/{name}")
    job_id = jobs.create_job(sessions, "push-install", target, "root-key", agent_version, "test")
    recorder = jobs.JobRecorder(sessions, job_id)
    recorder.start()
    recorder.finish(None, machine_id)
    return machine_id


def test_older_agents_are_planned_current_ones_noted(appliance_db):
    data_dir, sessions = appliance_db
    pushed(sessions, "old", 2201, "0.9.0")
    pushed(sessions, "same", 2202, "1.0.0")
    planned, notes = service.upgrade_jobs(data_dir, sessions, "1.0.0", service.packages_dir(data_dir))
    assert [(j.target.port, j.target.install_root, j.credential, j.package.version) for j in planned] == \
        [(2201, "/srv/old", "root-key", "1.0.0")]
    assert notes == ["same (127.0.0.1:2202 (/srv/same)): agent 1.0.0 is current"]
    only, _ = service.upgrade_jobs(data_dir, sessions, "1.0.0", service.packages_dir(data_dir), machine="same")
    assert only == []
    with pytest.raises(PushInstallError, match="no push-installed machine matches 'nothere'"):
        service.upgrade_jobs(data_dir, sessions, "1.0.0", service.packages_dir(data_dir), machine="nothere")


def test_an_agent_newer_than_the_appliance_stops_the_upgrade(appliance_db):
    data_dir, sessions = appliance_db
    pushed(sessions, "old", 2201, "0.9.0")
    pushed(sessions, "ahead", 2203, "1.0.1")
    with pytest.raises(VersionRefused, match="runs agent 1.0.1, newer than the appliance's 1.0.0: upgrade the appliance first"):
        service.upgrade_jobs(data_dir, sessions, "1.0.0", service.packages_dir(data_dir))


def test_a_missing_package_is_named(appliance_db):
    data_dir, sessions = appliance_db
    pushed(sessions, "old", 2201, "0.9.0")
    with pytest.raises(PushInstallError, match="no linux agent package for version 2.0.0 .* mobility-agent-2.0.0-linux.tar.gz"):
        service.upgrade_jobs(data_dir, sessions, "2.0.0", service.packages_dir(data_dir))


def test_a_damaged_package_is_refused(appliance_db):
    data_dir, _sessions = appliance_db
    package = service.packages_dir(data_dir) / "mobility-agent-1.0.0-linux.tar.gz"
    package.write_bytes(package.read_bytes()[:-10])
    with pytest.raises(PushInstallError, match="does not match its line in .*SHA256SUMS"):
        service.find_package(service.packages_dir(data_dir), "linux", "1.0.0")
