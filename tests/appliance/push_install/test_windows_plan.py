"""Windows push install without Windows: the PowerShell each step sends, the file transfer over
the WinRM shell's stdin, and the whole step sequence through WinRmTransport with a stand-in for
pywinrm's Protocol (the only fake: no Windows host is reachable here). None of this PowerShell
is executed here."""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import requests
from replication_appliance.push_install.credentials import Credential
from replication_appliance.push_install.errors import (
    TargetAuthError,
    TargetUnreachableError,
)
from replication_appliance.push_install.plan import (
    AgentPackage,
    Registration,
    Target,
    WindowsLayout,
    encode_powershell,
    winrm_transfer_plan,
)
from replication_appliance.push_install.runner import PushRequest, run_push_install
from replication_appliance.push_install.transport import WinRmTransport

from tests.bundle.test_installer_scripts import powershell_syntax_errors
from tests.fixtures.powershell import strip_strings_and_comments

PASSPHRASE = "Passphrase-For-Tests-123456"
CMD_LINE_LIMIT = 8191  # cmd.exe / CreateProcess via WinRM's shell


@pytest.fixture
def package(tmp_path: Path) -> AgentPackage:
    path = tmp_path / "mobility-agent-1.2.3-windows.zip"
    path.write_bytes(bytes(range(256)) * 1200)  # 300 KiB: more than one transfer chunk
    return AgentPackage.from_file(path)


def decode(arguments: list[str]) -> str:
    assert arguments[:3] == ["-NoProfile", "-NonInteractive", "-EncodedCommand"]
    return base64.b64decode(arguments[3]).decode("utf-16-le")


class FakeWindows:
    """Stands in for winrm.Protocol: records each PowerShell script and its stdin, keeps the
    files the scripts would write, and answers like Install-MobilityAgent.ps1 would."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.scripts: list[tuple[str, bytes]] = []
        self.files: dict[str, bytes] = {}
        self._pending: dict[str, list] = {}
        self.fail_on = fail_on  # the connection drops while a script containing this runs

    def open_shell(self) -> str:
        return "shell-1"

    def close_shell(self, shell_id: str) -> None:
        if self.fail_on:
            raise requests.ConnectionError("('Connection aborted.', ConnectionResetError(104))")

    def run_command(self, shell_id: str, command: str, arguments=()) -> str:
        assert command == "powershell.exe"
        command_id = f"cmd-{len(self.scripts) + len(self._pending)}"
        self._pending[command_id] = [decode(list(arguments)), b""]
        return command_id

    def send_command_input(self, shell_id: str, command_id: str, stdin_input: bytes, end: bool = False) -> None:
        if self.fail_on and self.fail_on in self._pending[command_id][0]:
            raise requests.ConnectionError("('Connection aborted.', ConnectionResetError(104))")
        self._pending[command_id][1] += stdin_input

    def get_command_output(self, shell_id: str, command_id: str) -> tuple[bytes, bytes, int]:
        script, stdin = self._pending.pop(command_id)
        self.scripts.append((script, stdin))
        if script.startswith("$out = [IO.File]::Open("):
            path = re.match(r"\$out = \[IO.File\]::Open\('([^']+)'", script).group(1)
            self.files[path] = b"".join(base64.b64decode(line) for line in stdin.split(b"\r\n") if line)
        if "register" in script and "--passphrase-file" in script:
            self.files[r"C:\ProgramData\MobilityAgent\state\agent.json"] = json.dumps(
                {"machine_id": "m-1", "control_server": "appliance:443"}).encode()
        if script.startswith("Get-Content -Raw -LiteralPath"):
            path = re.search(r"-LiteralPath '([^']+)'", script).group(1)
            return self.files.get(path, b""), b"", 0
        return b"ok\r\n", b"", 0

    def cleanup_command(self, shell_id: str, command_id: str) -> None:
        pass


def test_transfer_plan_goes_over_stdin_in_chunks_and_reassembles(package: AgentPackage):
    plan = winrm_transfer_plan(r"C:\Windows\Temp\MobilityAgentPush\x.zip.part")
    data = package.path.read_bytes()
    chunks = plan.stdin_chunks(data)
    assert len(chunks) == -(-len(data) // plan.chunk_bytes) > 1
    assert b"".join(base64.b64decode(c.strip()) for c in chunks) == data
    assert all(len(c) < 150 * 1024 for c in chunks)  # under the smallest default MaxEnvelopeSize
    assert len("powershell.exe -NoProfile -NonInteractive -EncodedCommand " + encode_powershell(plan.receiver)) < CMD_LINE_LIMIT


def test_windows_commands_quote_paths_and_keep_the_passphrase_off_the_command_line(package: AgentPackage):
    layout = WindowsLayout(Target("win01", "windows", 5986), package)
    register = layout.register_command(Registration("appliance:443", (r"\\.\PhysicalDrive0",), "win01", None))
    assert PASSPHRASE not in register and "[Console]::In.ReadLine()" in register
    assert f"Remove-Item -LiteralPath '{layout.staging}\\passphrase.txt'" in register
    assert "--passphrase-file" in register and "'\\\\.\\PhysicalDrive0'" in register
    assert package.sha256 in layout.verify_and_unpack()
    assert layout.installer_command("install").startswith(
        f"& '{layout.staging}\\mobility-agent-1.2.3-windows\\Install-MobilityAgent.ps1' -Action Install")
    commands = (register, layout.verify_and_unpack(), layout.prepare_staging(), layout.cleanup(),
                layout.installer_command("check"), layout.control_command("start"),
                winrm_transfer_plan(layout.part).receiver)
    for command in commands:
        assert powershell_syntax_errors(command.encode()) == [], command
        code = strip_strings_and_comments(command)
        assert code.count("{") == code.count("}") and code.count("(") == code.count(")"), command
        assert len(encode_powershell(command)) < CMD_LINE_LIMIT
    # A single quote in a path cannot end the literal early.
    odd = WindowsLayout(Target("win01", "windows", 5986), package, staging=r"C:\it's here")
    assert "-Path 'C:\\it''s here' -ErrorAction Stop" in odd.prepare_staging()
    assert "'C:\\it''s here\\mobility-agent-1.2.3-windows.zip.part'" in odd.verify_and_unpack()


def test_each_job_gets_a_new_staging_folder_closed_to_all_but_system_and_administrators(package: AgentPackage):
    """Ordinary users can make folders in C:\\Windows\\Temp: a name they can guess, or a folder they
    made, must never be used (checked statically: no PowerShell here)."""
    target = Target("win01", "windows", 5986)
    first, second = WindowsLayout(target, package), WindowsLayout(target, package)
    assert first.staging != second.staging
    assert re.fullmatch(r"C:\\Windows\\Temp\\MobilityAgentPush-[0-9a-f]{32}", first.staging)
    script = first.prepare_staging()
    quoted = f"'{first.staging}'"
    # Made new or not at all: without -Force, New-Item fails on an existing folder, and stops the script.
    assert f"New-Item -ItemType Directory -Path {quoted} -ErrorAction Stop" in script
    assert "-Force" not in script[:script.index("icacls")]
    # Inheritance cut, full control for SYSTEM and Administrators only, by SID; icacls' exit code checked.
    acl = f"& icacls.exe {quoted} /inheritance:r /grant:r '*S-1-5-18:(OI)(CI)F' '*S-1-5-32-544:(OI)(CI)F'"
    assert acl in script and script.count("/grant") == 1
    assert script.index("New-Item") < script.index(acl) < script.index("if ($LASTEXITCODE -ne 0) {")
    # Then it must be empty: nothing slipped in while it still had C:\\Windows\\Temp's ACL.
    assert script.index("$LASTEXITCODE") < script.index(f"if (Get-ChildItem -LiteralPath {quoted} -Force) {{ throw")


def test_the_whole_windows_push_through_winrm_transport(package: AgentPackage, tmp_path: Path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    fake = FakeWindows()
    credential = Credential("win-admin", "Administrator", "password", "Adm1n-secret")
    target = Target("win01", "windows", 5986)
    transport = WinRmTransport(target, credential, protocol=fake)
    events: list[tuple[str, str]] = []

    class Sink:
        def step(self, name: str, status: str, message: str = "") -> None:
            events.append((name, status))

    request = PushRequest(target, package, "appliance:443", ca, PASSPHRASE, credential_owner="Administrator",
                          disks=(r"\\.\PhysicalDrive0",))
    outcome = run_push_install(request, transport, Sink(), lambda machine, since: "1.2.3", heartbeat_timeout=5)
    assert outcome.machine_id == "m-1" and outcome.changed
    assert [e for e in events if e[1] == "succeeded"] == [(n, "succeeded") for n in
                                                          ("copy", "check", "install", "register", "start", "heartbeat")]
    # The package and the CA arrived byte for byte, through stdin, into the folder made for this job.
    scripts = [s for s, _ in fake.scripts]
    staging = re.search(r"New-Item -ItemType Directory -Path '([^']+)'", scripts[2]).group(1)
    layout = WindowsLayout(target, package, staging=staging)
    assert fake.files[layout.part] == package.path.read_bytes()
    assert fake.files[layout.ca_file] == ca.read_bytes()
    # Nothing touches the folder before it is made and locked down.
    assert not any(staging in s for s in scripts[:2]) and scripts[2] == layout.prepare_staging()
    order = [next(i for i, s in enumerate(scripts) if marker in s) for marker in
             ("New-Item", "$out = [IO.File]::Open(", "Get-FileHash", "-Action Check", "-Action Install", "register",
              "current\\Install-MobilityAgent.ps1' -Action Start", f"Remove-Item -LiteralPath '{staging}' -Recurse")]
    assert order == sorted(order)
    # Secrets: the passphrase only ever on stdin, the password never sent as script text.
    assert all(PASSPHRASE not in s and "Adm1n-secret" not in s for s in scripts)
    assert any(PASSPHRASE.encode() in stdin for _, stdin in fake.scripts)


def test_a_key_credential_is_refused_for_windows():
    with pytest.raises(TargetAuthError, match="Windows targets need a password credential"):
        WinRmTransport(Target("win01", "windows", 5986), Credential("k", "Administrator", "key", "-----BEGIN"),
                       protocol=FakeWindows())


def test_a_dropped_winrm_connection_is_a_clear_error_not_a_crash(package: AgentPackage, tmp_path: Path):
    """requests/pywinrm errors while the package is sent end as the package's own error type
    (which the job records), naming the target; closing the dead shell does not raise."""
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    fake = FakeWindows(fail_on="[IO.File]::Open(")
    target = Target("win01", "windows", 5986)
    transport = WinRmTransport(target, Credential("win-admin", "Administrator", "password", "Adm1n-secret"),
                               protocol=fake)
    events: list[tuple[str, str, str]] = []

    class Sink:
        def step(self, name: str, status: str, message: str = "") -> None:
            events.append((name, status, message))

    request = PushRequest(target, package, "appliance:443", ca, PASSPHRASE, credential_owner="Administrator")
    with pytest.raises(TargetUnreachableError) as caught:
        run_push_install(request, transport, Sink(), lambda machine, since: None, heartbeat_timeout=1)
    message = str(caught.value)
    assert message.startswith("WinRM to win01:5986 broke off: ConnectionError: ('Connection aborted.'")
    assert "Adm1n-secret" not in message and PASSPHRASE not in message
    assert ("copy", "failed", message) in events
    transport.close()
