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
from replication_appliance.push_install.credentials import Credential
from replication_appliance.push_install.errors import TargetAuthError
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

    def __init__(self) -> None:
        self.scripts: list[tuple[str, bytes]] = []
        self.files: dict[str, bytes] = {}
        self._pending: dict[str, list] = {}

    def open_shell(self) -> str:
        return "shell-1"

    def close_shell(self, shell_id: str) -> None:
        pass

    def run_command(self, shell_id: str, command: str, arguments=()) -> str:
        assert command == "powershell.exe"
        command_id = f"cmd-{len(self.scripts) + len(self._pending)}"
        self._pending[command_id] = [decode(list(arguments)), b""]
        return command_id

    def send_command_input(self, shell_id: str, command_id: str, stdin_input: bytes, end: bool = False) -> None:
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
    assert "Remove-Item -LiteralPath 'C:\\Windows\\Temp\\MobilityAgentPush\\passphrase.txt'" in register
    assert "--passphrase-file" in register and "'\\\\.\\PhysicalDrive0'" in register
    assert package.sha256 in layout.verify_and_unpack()
    assert layout.installer_command("install").startswith(
        "& 'C:\\Windows\\Temp\\MobilityAgentPush\\mobility-agent-1.2.3-windows\\Install-MobilityAgent.ps1' -Action Install")
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
    assert "'C:\\it''s here\\mobility-agent-1.2.3-windows.zip.part'" in odd.prepare_staging()


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
    # The package and the CA arrived byte for byte, through stdin.
    layout = WindowsLayout(target, package)
    assert fake.files[layout.part] == package.path.read_bytes()
    assert fake.files[layout.ca_file] == ca.read_bytes()
    scripts = [s for s, _ in fake.scripts]
    order = [next(i for i, s in enumerate(scripts) if marker in s) for marker in
             ("Get-FileHash", "-Action Check", "-Action Install", "register", "current\\Install-MobilityAgent.ps1' -Action Start", "Remove-Item -LiteralPath 'C:\\Windows\\Temp\\MobilityAgentPush' -Recurse")]
    assert order == sorted(order)
    # Secrets: the passphrase only ever on stdin, the password never sent as script text.
    assert all(PASSPHRASE not in s and "Adm1n-secret" not in s for s in scripts)
    assert any(PASSPHRASE.encode() in stdin for _, stdin in fake.scripts)


def test_a_key_credential_is_refused_for_windows():
    with pytest.raises(TargetAuthError, match="Windows targets need a password credential"):
        WinRmTransport(Target("win01", "windows", 5986), Credential("k", "Administrator", "key", "-----BEGIN"),
                       protocol=FakeWindows())
