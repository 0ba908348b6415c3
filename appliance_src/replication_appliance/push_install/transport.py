"""Transports: how commands and files reach a target. SSH/SFTP (paramiko) and WinRM (pywinrm)."""
from __future__ import annotations

import contextlib
import io
import re
import secrets
import select
import shlex
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import paramiko

from .credentials import Credential
from .errors import TargetAuthError, TargetUnreachableError, TransferFailed
from .plan import Target, encode_powershell, ps_quote, winrm_transfer_plan, with_sudo

CONNECT_TIMEOUT_S = 20.0
SUDO_CHECK_TIMEOUT_S = 60.0  # sudo waits a few seconds after a wrong password
_known_hosts_lock = threading.Lock()


@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    stdout: str
    stderr: str

    def last_words(self, limit: int = 600) -> str:
        """The end of what the command said, to put in a job step's message."""
        text = (self.stderr.strip() or self.stdout.strip()).splitlines()
        return " | ".join(text)[-limit:] or f"exit code {self.exit_code}"


class Transport(Protocol):
    def run(self, command: str, stdin: str | None = None, as_root: bool = True, timeout: float = 900) -> CommandResult: ...
    def put(self, local: Path, remote: str) -> None: ...
    def read_text(self, remote: str) -> str | None: ...
    def close(self) -> None: ...


class SshTransport:
    """Root (or sudo) over SSH; files over SFTP. The host key is learnt on first contact and
    checked on every later one (D/push-known-hosts)."""

    def __init__(self, target: Target, credential: Credential, known_hosts: Path) -> None:
        self.credential = credential
        self.sudo = credential.username != "root"
        self.client = paramiko.SSHClient()
        with _known_hosts_lock:
            if known_hosts.is_file():
                self.client.load_host_keys(str(known_hosts))
        self.client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        auth: dict = {"password": credential.secret} if credential.kind == "password" else \
            {"pkey": _private_key(credential)}
        try:
            self.client.connect(target.host, target.port, username=credential.username, timeout=CONNECT_TIMEOUT_S,
                                banner_timeout=CONNECT_TIMEOUT_S, auth_timeout=CONNECT_TIMEOUT_S,
                                allow_agent=False, look_for_keys=False, **auth)
        except paramiko.AuthenticationException:
            raise TargetAuthError(f"{target.label} refused the login of {credential.username!r} with credential "
                                  f"{credential.name!r}: check the user name and {credential.kind}") from None
        except paramiko.BadHostKeyException:
            raise TargetAuthError(f"{target.label} presented a different host key than on first contact; if the "
                                  f"machine was rebuilt, remove its line from {known_hosts}") from None
        except (TimeoutError, OSError, paramiko.SSHException) as exc:
            raise TargetUnreachableError(f"cannot reach SSH on {target.label}: {exc}; check the address, "
                                         "port 22 and the firewall") from None
        with _known_hosts_lock:
            known_hosts.parent.mkdir(parents=True, exist_ok=True)
            self.client.save_host_keys(str(known_hosts))
        self.label = target.label
        self._sftp: paramiko.SFTPClient | None = None
        self._channel: paramiko.Channel | None = None
        self._sudo_checked = False
        self._sudo_password: str | None = None  # None: sudo lets the user in without one

    def run(self, command: str, stdin: str | None = None, as_root: bool = True, timeout: float = 900) -> CommandResult:
        """Run `command` in a subshell of the connection's one remote shell (through sudo unless root).

        The login shell (and whatever the account's startup files do) starts once per target,
        not once per command. The command's input is a here-document (the passphrase or sudo
        password stays off every command line); two marker lines end its output on stdout
        (with the exit code) and on stderr.
        """
        feed = stdin or ""
        if as_root and self.sudo:
            password = self._sudo()
            command = with_sudo(command, password is not None)
            if password is not None:
                feed = password + "\n" + feed
        return self._run_in_shell(command, feed, timeout)

    def _run_in_shell(self, command: str, feed: str, timeout: float) -> CommandResult:
        marker = f"__push_install_{secrets.token_hex(8)}__"
        script = f"( {command}\n) " + (f"<<'{marker}'\n{feed.rstrip(chr(10))}\n{marker}\n" if feed else "</dev/null\n")
        script += f"code=$?; printf '\\n%s %s\\n' {marker} \"$code\"; printf '\\n%s\\n' {marker} >&2\n"
        channel = self._shell()
        try:
            channel.sendall(script.encode())
            return _read_until_marker(channel, marker.encode(), time.monotonic() + timeout)
        except (OSError, paramiko.SSHException, TimeoutError) as exc:
            self._close_shell()
            raise TargetUnreachableError(f"the remote shell on {self.label} broke off: {exc}") from None

    def _sudo(self) -> str | None:
        """The password to send to sudo, None if sudo asks for none; found out once per connection.

        A key's private part is never sent: a key login without a stored sudo password needs
        sudo without a password (NOPASSWD). A password is sent only when sudo asks for one,
        and only after it was accepted on its own, so sudo never reads further into the
        command's input for another try.
        """
        if self._sudo_checked:
            return self._sudo_password
        user, name = self.credential.username, self.credential.name
        probe = self._run_in_shell(with_sudo(":", password=False), "", SUDO_CHECK_TIMEOUT_S)
        if probe.exit_code == 127:
            raise TargetAuthError(f"{self.label} has no sudo, and {user!r} is not root: use a root credential, or "
                                  f"install sudo there and allow {user!r} to use it")
        password = None
        if probe.exit_code != 0:
            password = self.credential.sudo_password or (
                self.credential.secret if self.credential.kind == "password" else None)
            if password is None:
                raise TargetAuthError(
                    f"sudo on {self.label} asks {user!r} for a password and credential {name!r} holds none (it is a "
                    "key, which is never sent to sudo): add the credential again with --sudo-password-file, or "
                    f"allow {user!r} sudo without a password (NOPASSWD)")
            if "\n" in password or "\r" in password:
                raise TargetAuthError(f"the sudo password of credential {name!r} contains a line break: sudo reads "
                                      "one line; store the credential again with the password alone")
            check = self._run_in_shell(with_sudo(":", password=True), password + "\n", SUDO_CHECK_TIMEOUT_S)
            if check.exit_code != 0:
                raise TargetAuthError(f"sudo on {self.label} refused {user!r} with the password of credential "
                                      f"{name!r} ({check.last_words()}): check the password and that {user!r} "
                                      "may use sudo there")
        self._sudo_checked, self._sudo_password = True, password
        return password

    def _shell(self) -> paramiko.Channel:
        if self._channel is None or self._channel.closed or self._channel.exit_status_ready():
            self._channel = self.client.get_transport().open_session(timeout=CONNECT_TIMEOUT_S)
            self._channel.exec_command("exec /bin/sh")
        return self._channel

    def _close_shell(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    @property
    def sftp(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            self._sftp = self.client.open_sftp()
        return self._sftp

    def put(self, local: Path, remote: str) -> None:
        try:
            self.sftp.put(str(local), remote)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise TransferFailed(f"copying {local.name} to {remote} on {self.label} failed: {_cause(exc)}; check the "
                                 "free space and permissions there") from None

    def read_text(self, remote: str) -> str | None:
        """Root reads over the SFTP session (no remote shell to start); a sudoer through `sudo cat`."""
        if not self.sudo:
            try:
                with self.sftp.open(remote, "r") as fh:
                    return fh.read().decode(errors="replace") or None
            except FileNotFoundError:
                return None
            except (OSError, EOFError, paramiko.SSHException):
                pass  # not readable over SFTP (permissions, SFTP gone): through the shell below
        result = self.run(f"cat {shlex.quote(remote)} 2>/dev/null || true")
        return result.stdout or None

    def close(self) -> None:
        self._close_shell()
        if self._sftp is not None:
            self._sftp.close()
        self.client.close()


def _read_until_marker(channel: paramiko.Channel, marker: bytes, deadline: float) -> CommandResult:
    """Read the shell's stdout and stderr until both end with `marker` (stdout's carries the exit code)."""
    out, err = bytearray(), bytearray()
    done_out = re.compile(rb"\n" + re.escape(marker) + rb" (\d+)\n\Z")
    done_err = b"\n" + marker + b"\n"
    while True:
        while channel.recv_ready():
            out += channel.recv(65536)
        while channel.recv_stderr_ready():
            err += channel.recv_stderr(65536)
        found = done_out.search(out[-(len(marker) + 16):])
        if found and err.endswith(done_err):
            code = int(found.group(1))
            return CommandResult(code, out[:len(out) - len(found.group(0))].decode(errors="replace"),
                                 err[:len(err) - len(done_err)].decode(errors="replace"))
        if channel.exit_status_ready() and not channel.recv_ready() and not channel.recv_stderr_ready():
            raise paramiko.SSHException(f"the shell ended (exit code {channel.recv_exit_status()})")
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the command did not finish in time")
        select.select([channel], [], [], min(left, 1.0))


def _cause(exc: BaseException) -> str:
    """An error's own words (paramiko's can be empty), for a message."""
    return (getattr(exc, "strerror", None) or str(exc)).strip().rstrip(":") or type(exc).__name__


def _private_key(credential: Credential) -> paramiko.PKey:
    for key_class in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return key_class.from_private_key(io.StringIO(credential.secret))
        except (paramiko.SSHException, ValueError):
            continue
    raise TargetAuthError(f"credential {credential.name!r} holds no usable private key (Ed25519, ECDSA or RSA, "
                          "OpenSSH or PEM format, without passphrase)")


class WinRmTransport:
    """An administrator over WinRM (HTTPS 5986 by default, NTLM). PowerShell only; files over stdin."""

    def __init__(self, target: Target, credential: Credential, verify_tls: bool = True, protocol=None) -> None:
        import winrm  # pywinrm: imported here, only Windows targets need it

        if credential.kind != "password":
            raise TargetAuthError(f"credential {credential.name!r} is a key; Windows targets need a password credential")
        scheme = "http" if target.port == 5985 else "https"
        # `protocol` stands in for pywinrm's in tests: there is no Windows host to talk to here.
        self.protocol = protocol or winrm.Protocol(
            endpoint=f"{scheme}://{target.host}:{target.port}/wsman", transport="ntlm",
            username=credential.username, password=credential.secret,
            server_cert_validation="validate" if verify_tls else "ignore",
            read_timeout_sec=CONNECT_TIMEOUT_S + 10, operation_timeout_sec=CONNECT_TIMEOUT_S)
        self.target, self.credential = target, credential
        try:
            self.shell = self.protocol.open_shell()
        except winrm.exceptions.InvalidCredentialsError:
            raise TargetAuthError(f"{target.label} refused the login of {credential.username!r} with credential "
                                  f"{credential.name!r}: check the user name and password (local accounts also need "
                                  "LocalAccountTokenFilterPolicy=1)") from None
        except Exception as exc:  # noqa: BLE001 - requests' connection errors: one message for the user
            raise TargetUnreachableError(f"cannot reach WinRM on {target.label}: {exc}; check WinRM, the port "
                                         "and the firewall") from None

    def _powershell(self, script: str, stdin_chunks: list[bytes]) -> CommandResult:
        try:
            command_id = self.protocol.run_command(self.shell, "powershell.exe",
                                                   ["-NoProfile", "-NonInteractive", "-EncodedCommand",
                                                    encode_powershell(script)])
            for i, chunk in enumerate(stdin_chunks):
                self.protocol.send_command_input(self.shell, command_id, chunk, end=i == len(stdin_chunks) - 1)
            if not stdin_chunks:
                self.protocol.send_command_input(self.shell, command_id, b"", end=True)
            out, err, code = self.protocol.get_command_output(self.shell, command_id)
            self.protocol.cleanup_command(self.shell, command_id)
        except Exception as exc:  # noqa: BLE001 - requests' and pywinrm's many error types: one message for the user
            raise TargetUnreachableError(f"WinRM to {self.target.label} broke off: {type(exc).__name__}: "
                                         f"{_cause(exc)[:300]}; check WinRM, the network and the target") from None
        return CommandResult(code, out.decode(errors="replace"), err.decode(errors="replace"))

    def run(self, command: str, stdin: str | None = None, as_root: bool = True, timeout: float = 900) -> CommandResult:
        return self._powershell(command, [(stdin + "\r\n").encode()] if stdin else [])

    def put(self, local: Path, remote: str) -> None:
        plan = winrm_transfer_plan(remote)
        result = self._powershell(plan.receiver, plan.stdin_chunks(local.read_bytes()))
        if result.exit_code != 0:
            raise TransferFailed(f"copying {local.name} to {remote} on {self.target.label} failed: "
                                 f"{result.last_words()}")

    def read_text(self, remote: str) -> str | None:
        result = self._powershell(f"Get-Content -Raw -LiteralPath {ps_quote(remote)} -ErrorAction SilentlyContinue", [])
        return result.stdout or None

    def close(self) -> None:
        # After a broken connection this fails too; the shell then ends on the target by itself (idle timeout).
        with contextlib.suppress(Exception):
            self.protocol.close_shell(self.shell)
