"""SshTransport against a real sshd: one remote shell serves every command, and each command
still gets its own exit code, exact stdout and stderr, and its own standard input."""
from __future__ import annotations

from pathlib import Path

from replication_appliance.push_install.credentials import Credential
from replication_appliance.push_install.plan import Target
from replication_appliance.push_install.transport import SshTransport

from tests.fixtures.sshd import SshServer


def connect(sshd: SshServer, tmp_path: Path) -> SshTransport:
    credential = Credential("root-key", "root", "key", sshd.key_path.read_text())
    return SshTransport(Target(sshd.host, "linux", sshd.port), credential, tmp_path / "known-hosts")


def test_commands_share_one_shell_but_not_their_state(sshd: SshServer, tmp_path: Path):
    transport = connect(sshd, tmp_path)
    try:
        first = transport.run("echo out; echo err >&2; printf 'no newline'; exit 7")
        assert (first.exit_code, first.stdout, first.stderr) == (7, "out\nno newline", "err\n")
        # One shell ($$ is the same), but `exit` and `cd` ended with the command's own subshell.
        shell_pid = transport.run(f"cd {tmp_path}; echo $$").stdout
        again = transport.run("echo $$; pwd")
        assert again.exit_code == 0 and again.stdout.splitlines()[0] == shell_pid.strip()
        assert again.stdout.splitlines()[1] != str(tmp_path)
        # Standard input reaches the command verbatim (nothing expanded) and only that command.
        secret = "pa$$ `word` $(id) 'q'"
        fed = transport.run("cat", stdin=secret + "\n")
        assert fed.stdout == secret + "\n"
        assert transport.run("cat").stdout == ""  # no input left over for the next command
        assert transport.run("false").exit_code == 1
    finally:
        transport.close()


def test_reads_go_over_sftp_and_missing_files_are_none(sshd: SshServer, tmp_path: Path):
    transport = connect(sshd, tmp_path)
    try:
        present = tmp_path / "marker"
        present.write_text("1.2.3\n")
        assert transport.read_text(str(present)) == "1.2.3\n"
        assert transport.read_text(str(tmp_path / "missing" / "marker")) is None
    finally:
        transport.close()
