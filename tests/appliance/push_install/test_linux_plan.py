"""The Linux commands of a push install, as built (pure): quoting, sudo, no secret in argv.
What they do on a target is tested over a real sshd (test_ssh_transport.py, test_linux_push_install.py)."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from replication_appliance.push_install.plan import (
    AgentPackage,
    LinuxLayout,
    Registration,
    Target,
    installed_version,
    version_key,
    with_sudo,
)

FOLDER = "mobility-agent-push-Ab3dE5gH9k"  # as mktemp would name it


def layout(tmp_path: Path, root: str = "/") -> LinuxLayout:
    """A layout whose staging folder was made (as prepare_staging's output gives it)."""
    path = tmp_path / "mobility-agent-2.0.1-linux.tar.gz"
    path.write_bytes(b"package")
    plan = LinuxLayout(Target("db01", "linux", 22, root), AgentPackage.from_file(path))
    return plan.staged(f"{plan.staging_parent}/{FOLDER}\n")


def test_paths_follow_the_install_root(tmp_path: Path):
    real = layout(tmp_path)
    assert real.staging == f"/var/tmp/{FOLDER}"
    assert real.agent == "/opt/mobility-agent/current/bin/mobility-agent"
    assert real.installer_command("install") == f"sh /var/tmp/{FOLDER}/mobility-agent-2.0.1-linux/install.sh install"
    test_root = layout(tmp_path, "/srv/target one/")
    assert test_root.staging == f"/srv/target one/var/tmp/{FOLDER}"
    assert test_root.installer_command("check").endswith("check --prefix '/srv/target one'")


def test_the_staging_folder_is_made_fresh_and_only_what_mktemp_printed_is_used(tmp_path: Path):
    plan = layout(tmp_path, "/srv/target one/")
    command = plan.prepare_staging("deploy")
    assert "mktemp -d '/srv/target one/var/tmp'/mobility-agent-push-XXXXXXXXXX" in command
    assert "mkdir -p '/srv/target one/var/tmp'" in command and "chown deploy" in command
    unstaged = LinuxLayout(plan.target, plan.package)
    with pytest.raises(RuntimeError, match="no staging folder yet"):
        _ = unstaged.archive
    # Its output decides the folder; anything but a new folder in the right place is refused.
    for printed in ("", "/srv/target one/var/tmp", "/var/tmp/mobility-agent-push-Ab3dE5gH9k",
                    "/srv/target one/var/tmp/mobility-agent-push-2.0.1", "/srv/target one/var/tmp/x/../../etc",
                    "/srv/target one/var/tmp/mobility-agent-push-Ab3dE5gH9k\n/etc"):
        with pytest.raises(ValueError, match="not a new folder in /srv/target one/var/tmp"):
            unstaged.staged(printed)


def test_register_reads_the_passphrase_on_stdin(tmp_path: Path):
    command = layout(tmp_path).register_command(Registration("appliance.example:443", ("/dev/sda", "/dev/sdb"), "db01", "id-1"))
    argv = shlex.split(command)
    assert argv[argv.index("--passphrase-file") + 1] == "/dev/stdin"
    assert argv.count("--disk") == 2 and argv[argv.index("--host-id") + 1] == "id-1"
    assert argv[argv.index("--ca-file") + 1] == f"/var/tmp/{FOLDER}/ca.pem"


def test_sudo_never_uses_cached_credentials_and_keeps_the_command_whole(tmp_path: Path):
    inner = layout(tmp_path).verify_and_unpack()
    with_password = shlex.split(with_sudo(inner, password=True))
    # The password is the first line of stdin, handed on through a pipe with the command's input.
    assert with_password[:2] == ["cat", "|"]
    assert with_password[2:7] == ["sudo", "-S", "-k", "-p", ""] and with_password[7:] == ["sh", "-c", inner]
    without = shlex.split(with_sudo(inner, password=False))
    assert without == ["sudo", "-n", "-k", "sh", "-c", inner]


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
