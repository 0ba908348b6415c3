"""The Linux commands of a push install, as built (pure): quoting, sudo, no secret in argv."""
from __future__ import annotations

import shlex
from pathlib import Path

from replication_appliance.push_install.plan import (
    AgentPackage,
    LinuxLayout,
    Registration,
    Target,
    installed_version,
    version_key,
    with_sudo,
)


def layout(tmp_path: Path, root: str = "/") -> LinuxLayout:
    path = tmp_path / "mobility-agent-2.0.1-linux.tar.gz"
    path.write_bytes(b"package")
    return LinuxLayout(Target("db01", "linux", 22, root), AgentPackage.from_file(path))


def test_paths_follow_the_install_root(tmp_path: Path):
    real = layout(tmp_path)
    assert real.staging == "/var/tmp/mobility-agent-push-2.0.1"
    assert real.agent == "/opt/mobility-agent/current/bin/mobility-agent"
    assert real.installer_command("install") == "sh /var/tmp/mobility-agent-push-2.0.1/mobility-agent-2.0.1-linux/install.sh install"
    test_root = layout(tmp_path, "/srv/target one/")
    assert test_root.staging == "/srv/target one/var/tmp/mobility-agent-push-2.0.1"
    assert test_root.installer_command("check").endswith("check --prefix '/srv/target one'")


def test_register_reads_the_passphrase_on_stdin(tmp_path: Path):
    command = layout(tmp_path).register_command(Registration("appliance.example:443", ("/dev/sda", "/dev/sdb"), "db01", "id-1"))
    argv = shlex.split(command)
    assert argv[argv.index("--passphrase-file") + 1] == "/dev/stdin"
    assert argv.count("--disk") == 2 and argv[argv.index("--host-id") + 1] == "id-1"
    assert argv[argv.index("--ca-file") + 1] == "/var/tmp/mobility-agent-push-2.0.1/ca.pem"


def test_sudo_takes_the_password_on_stdin_and_keeps_the_command_whole(tmp_path: Path):
    inner = layout(tmp_path).verify_and_unpack()
    wrapped = with_sudo(inner)
    argv = shlex.split(wrapped)
    assert argv[:5] == ["sudo", "-S", "-p", "", "sh"] and argv[5:7] == ["-c", inner]


def test_checksum_and_unpack_are_one_guarded_command(tmp_path: Path):
    plan = layout(tmp_path)
    command = plan.verify_and_unpack()
    assert plan.package.sha256 in command and "sha256sum -c" in command
    assert command.index("sha256sum") < command.index("tar -xzf")


def test_versions_compare_numerically_and_markers_parse():
    assert version_key("1.10.0") > version_key("1.9.3")
    assert installed_version("1.0.0\n") == "1.0.0"
    assert installed_version('\ufeff{"version": "2.0.0", "venv": "C:\\\\x"}') == "2.0.0"
    assert installed_version("") is None and installed_version(None) is None


def test_check_and_start_are_one_remote_command_each(tmp_path: Path):
    plan = layout(tmp_path)
    (check,) = plan.check_commands()
    assert check.index("sha256sum -c") < check.index("tar -xzf") < check.index("install.sh check")
    (start,) = plan.start_commands(clean_staging=True)
    assert start == f"{plan.control_command('start')} && {plan.cleanup()}"  # staging goes only once started
    assert plan.start_commands(clean_staging=False) == [plan.control_command("start")]
