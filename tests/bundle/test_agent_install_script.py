"""install.sh of the Linux agent package, run for real under a temporary prefix (no SSH here;
the push-install tests run it over SSH), and its systemd unit checked by systemd-analyze."""
from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from appliance_build.packaging.agent_packages import package_paths
from appliance_build.version import APPLIANCE_VERSION


@pytest.fixture(scope="module")
def installed(dist: Path, tmp_path_factory) -> tuple[Path, Path]:
    """(the unpacked package's install.sh, the prefix it installed into)."""
    work = tmp_path_factory.mktemp("agent-install")
    with tarfile.open(package_paths(dist)[0]) as tf:
        tf.extractall(work / "package", filter="data")
    script = work / "package" / f"mobility-agent-{APPLIANCE_VERSION}-linux" / "install.sh"
    prefix = work / "root"
    result = run(script, "install", prefix)
    assert result.returncode == 0, result.stderr
    assert f"installed {APPLIANCE_VERSION} under {prefix}" in result.stdout
    return script, prefix


def run(script: Path, action: str, prefix: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(script), action, "--prefix", str(prefix), *extra], capture_output=True, text=True,
                          timeout=300)


def test_install_is_idempotent_and_keeps_a_control_script(installed):
    script, prefix = installed
    again = run(script, "install", prefix)
    assert again.returncode == 0 and "is already installed: nothing to do" in again.stdout
    control = prefix / "opt" / "mobility-agent" / "current" / "install.sh"
    assert control.is_file()
    site = next((prefix / "opt" / "mobility-agent" / "current" / "lib").glob("python3*/site-packages"))
    assert (site / "replication_appliance" / "agent" / "cli.py").is_file()
    assert not (site / "pip").exists()  # pip ran from its wheel, the venv carries only the agent
    status = subprocess.run(["sh", str(control), "status", "--prefix", str(prefix)], capture_output=True, text=True)
    assert status.stdout.strip() == f"installed {APPLIANCE_VERSION} stopped"
    assert (prefix / "var" / "lib" / "mobility-agent").stat().st_mode & 0o077 == 0


def test_a_downgrade_is_refused_unless_forced(installed, tmp_path: Path):
    script, prefix = installed
    # A copy of the package that claims an older version.
    older = tmp_path / "older"
    shutil.copytree(script.parent, older)
    manifest = older / "manifest.json"
    manifest.write_text(manifest.read_text().replace(f'\n "version": "{APPLIANCE_VERSION}",', '\n "version": "0.0.1",'))
    refused = run(older / "install.sh", "install", prefix)
    assert refused.returncode == 4
    assert f"version {APPLIANCE_VERSION} is installed, newer than this package (0.0.1)" in refused.stderr
    assert (prefix / "opt" / "mobility-agent" / "current" / "INSTALLED").read_text().strip() == APPLIANCE_VERSION


def test_the_systemd_unit_verifies(installed, tmp_path: Path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    script, prefix = installed
    unit = tmp_path / "mobility-agent.service"
    unit.write_text((script.parent / "mobility-agent.service").read_text().replace("@PREFIX@", str(prefix)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
    # The check can fail: a unit whose command does not exist is reported.
    unit.write_text(unit.read_text().replace(str(prefix), str(tmp_path / "missing")))
    broken = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert broken.returncode != 0 and "not executable" in broken.stderr


def test_uninstall_keeps_the_registration_state(installed, tmp_path: Path):
    script, prefix = installed
    state = prefix / "var" / "lib" / "mobility-agent"
    (state / "agent.json").write_text('{"machine_id": "kept"}')
    result = run(script, "uninstall", prefix)
    assert result.returncode == 0 and "registration and state kept" in result.stdout
    assert not (prefix / "opt" / "mobility-agent").exists()
    assert (state / "agent.json").read_text() == '{"machine_id": "kept"}'
