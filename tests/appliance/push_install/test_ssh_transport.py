"""SshTransport against a real sshd: one remote shell serves every command, and each command
still gets its own exit code, exact stdout and stderr, and its own standard input, also through
sudo; a failed upload is a clear error.

sudo is not installed here and sshd lets only root in: for the sudo tests the transport is told
to treat its login as a sudoer's, and its remote shell finds a stand-in `sudo` first on PATH
that behaves like sudo with NOPASSWD, or like sudo asking for the password on stdin (-S), with
cached credentials (skipped prompts) unless -k."""
from __future__ import annotations

import shlex
import shutil
from contextlib import closing
from pathlib import Path

import paramiko
import pytest
from replication_appliance.push_install.credentials import Credential
from replication_appliance.push_install.errors import TargetAuthError, TransferFailed
from replication_appliance.push_install.plan import Target
from replication_appliance.push_install.transport import SshTransport

from tests.fixtures.sshd import SshServer

PASSPHRASE = "Passphrase-For-Tests-123456"
SUDO_PASSWORD = "sudo-Pa$$ `word`"

STAND_IN_SUDO = r"""#!/bin/sh
# Stand-in for sudo: MODE is nopasswd (never reads stdin) or password (-S: reads one line of stdin,
# byte by byte as sudo does, up to 3 tries; remembers a success for later calls unless -k).
here=$(dirname "$0")
n= k= S=
while [ $# -gt 0 ]; do
  case $1 in
    -n) n=1 ;;
    -k) k=1 ;;
    -S) S=1 ;;
    -p) shift ;;
    -*) echo "sudo: unknown option $1" >&2; exit 1 ;;
    *) break ;;
  esac
  shift
done
echo "${n:+-n }${k:+-k }${S:+-S }$1" >> "$here/calls"
[ "$(cat "$here/mode")" = nopasswd ] && exec "$@"
[ -z "$k" ] && [ -e "$here/timestamp" ] && exec "$@"
[ -n "$n" ] && { echo "sudo: a password is required" >&2; exit 1; }
[ -n "$S" ] || { echo "sudo: a terminal is required to read the password" >&2; exit 1; }
for try in 1 2 3; do
  IFS= read -r typed || { echo "sudo: no password was provided" >&2; exit 1; }
  printf '%s
' "$typed" >> "$here/typed"
  if [ "$typed" = "$(cat "$here/password")" ]; then
    [ -n "$k" ] || : > "$here/timestamp"
    exec "$@"
  fi
  echo "Sorry, try again." >&2
done
echo "sudo: 3 incorrect password attempts" >&2
exit 1
"""


def connect(sshd: SshServer, tmp_path: Path, sudo_password: str | None = None) -> SshTransport:
    credential = Credential("root-key", "root", "key", sshd.key_path.read_text(), sudo_password)
    return SshTransport(Target(sshd.host, "linux", sshd.port), credential, tmp_path / "known-hosts")


class StandInSudo:
    def __init__(self, folder: Path, mode: str) -> None:
        self.folder = folder
        folder.mkdir()
        (folder / "sudo").write_text(STAND_IN_SUDO)
        (folder / "sudo").chmod(0o755)
        (folder / "mode").write_text(mode)
        (folder / "password").write_text(SUDO_PASSWORD + "\n")

    def read(self, name: str) -> str:
        path = self.folder / name
        return path.read_text() if path.exists() else ""


@pytest.fixture
def sent(monkeypatch) -> list[bytes]:
    """Every byte any SSH channel sends to the target (the real sendall still sends them)."""
    chunks: list[bytes] = []
    real = paramiko.Channel.sendall

    def sendall(channel, data):
        chunks.append(bytes(data))
        return real(channel, data)

    monkeypatch.setattr(paramiko.Channel, "sendall", sendall)
    return chunks


def as_sudoer(transport: SshTransport, tmp_path: Path, mode: str) -> StandInSudo:
    """Treat the (root) login as a sudoer's, whose one remote shell finds the stand-in sudo first on PATH."""
    sudo = StandInSudo(tmp_path / f"sudo-{mode}", mode)
    transport.sudo = True
    transport._shell().sendall(f"PATH={shlex.quote(str(sudo.folder))}:$PATH; export PATH\n".encode())
    return sudo


def test_commands_share_one_shell_but_not_their_state(sshd: SshServer, tmp_path: Path):
    with closing(connect(sshd, tmp_path)) as transport:
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


def test_reads_go_over_sftp_and_missing_files_are_none(sshd: SshServer, tmp_path: Path):
    with closing(connect(sshd, tmp_path)) as transport:
        present = tmp_path / "marker"
        present.write_text("1.2.3\n")
        assert transport.read_text(str(present)) == "1.2.3\n"
        assert transport.read_text(str(tmp_path / "missing" / "marker")) is None


def test_a_failed_upload_is_a_clear_error(sshd: SshServer, tmp_path: Path):
    with closing(connect(sshd, tmp_path)) as transport:
        local = tmp_path / "mobility-agent-1.0.0-linux.tar.gz"
        local.write_bytes(b"package")
        remote = str(tmp_path / "missing" / local.name)
        with pytest.raises(TransferFailed, match=f"copying {local.name} to {remote} on 127.0.0.1:{sshd.port} failed: "
                                                 "No such file; check the free space and permissions there"):
            transport.put(local, remote)
        transport.put(local, str(tmp_path / "copied"))  # the next upload works
        assert (tmp_path / "copied").read_bytes() == b"package"


# The register step reads its passphrase as `mobility-agent register --passphrase-file /dev/stdin`.
READS_STDIN = "cat /dev/stdin"


def test_a_key_is_never_sent_and_nopasswd_sudo_gets_the_input_intact(sshd: SshServer, tmp_path: Path,
                                                                      sent: list[bytes]):
    key = sshd.key_path.read_text()
    with closing(connect(sshd, tmp_path)) as transport:
        sudo = as_sudoer(transport, tmp_path, "nopasswd")
        for _ in range(2):
            result = transport.run(READS_STDIN, stdin=PASSPHRASE + "\n")
            assert (result.exit_code, result.stdout) == (0, PASSPHRASE + "\n"), result.stderr
        assert transport.run("id -u").stdout == "0\n"
    assert sudo.read("calls").splitlines() == ["-n -k sh"] * 4  # the check, then every command
    assert key.strip().splitlines()[1] not in b"".join(sent).decode()


def test_a_key_without_a_sudo_password_is_refused_clearly_when_sudo_asks_for_one(sshd: SshServer, tmp_path: Path,
                                                                                 sent: list[bytes]):
    key = sshd.key_path.read_text()
    with closing(connect(sshd, tmp_path)) as transport:
        sudo = as_sudoer(transport, tmp_path, "password")
        with pytest.raises(TargetAuthError, match=f"sudo on 127.0.0.1:{sshd.port} asks 'root' for a password and "
                                                  "credential 'root-key' holds none .*--sudo-password-file.*NOPASSWD"):
            transport.run(READS_STDIN, stdin=PASSPHRASE + "\n")
    assert sudo.read("calls").splitlines() == ["-n -k sh"] and sudo.read("typed") == ""
    assert key.strip().splitlines()[1] not in b"".join(sent).decode() and PASSPHRASE not in b"".join(sent).decode()


def test_sudo_reads_the_password_every_time_and_the_command_only_its_input(sshd: SshServer, tmp_path: Path,
                                                                           sent: list[bytes]):
    """sudo caches credentials per parent process, and every command is a child of the same
    remote shell: without -k, the second command would not be asked and would read the password."""
    key = sshd.key_path.read_text()
    with closing(connect(sshd, tmp_path, sudo_password=SUDO_PASSWORD)) as transport:
        sudo = as_sudoer(transport, tmp_path, "password")
        for _ in range(3):
            result = transport.run(READS_STDIN, stdin=PASSPHRASE + "\n")
            assert (result.exit_code, result.stdout) == (0, PASSPHRASE + "\n"), result.stderr
        assert transport.run("cat").stdout == ""  # without input: the password is not left for the command
    assert sudo.read("calls").splitlines() == ["-n -k sh"] + ["-k -S sh"] * 5
    assert sudo.read("typed") == (SUDO_PASSWORD + "\n") * 5  # what sudo read: the password, each time, only
    assert key.strip().splitlines()[1] not in b"".join(sent).decode()
    assert all(SUDO_PASSWORD.encode() not in chunk.split(b"\n", 1)[0] for chunk in sent)  # never on a command line


def test_no_password_is_sent_when_sudo_asks_for_none(sshd: SshServer, tmp_path: Path, sent: list[bytes]):
    with closing(connect(sshd, tmp_path, sudo_password=SUDO_PASSWORD)) as transport:
        as_sudoer(transport, tmp_path, "nopasswd")
        result = transport.run(READS_STDIN, stdin=PASSPHRASE + "\n")
        assert (result.exit_code, result.stdout) == (0, PASSPHRASE + "\n"), result.stderr
    assert SUDO_PASSWORD not in b"".join(sent).decode()


def test_a_wrong_sudo_password_is_refused_before_any_command_reads_input(sshd: SshServer, tmp_path: Path):
    with closing(connect(sshd, tmp_path, sudo_password="not-the-password")) as transport:
        sudo = as_sudoer(transport, tmp_path, "password")
        with pytest.raises(TargetAuthError, match=f"sudo on 127.0.0.1:{sshd.port} refused 'root' with the password "
                                                  "of credential 'root-key' .*Sorry, try again"):
            transport.run(READS_STDIN, stdin=PASSPHRASE + "\n")
        assert "not-the-password" not in sudo.read("calls")  # nor in sudo's argv
    assert sudo.read("typed") == "not-the-password\n"  # sudo's second try found no more input: no passphrase


def test_no_sudo_on_the_target_is_a_clear_error(sshd: SshServer, tmp_path: Path):
    if shutil.which("sudo"):
        pytest.skip("this machine (the target) has sudo")
    with closing(connect(sshd, tmp_path)) as transport:
        transport.sudo = True
        with pytest.raises(TargetAuthError, match=f"127.0.0.1:{sshd.port} has no sudo, and 'root' is not root"):
            transport.run("true")
