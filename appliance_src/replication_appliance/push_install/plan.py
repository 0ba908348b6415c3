"""What a push install runs on a target, as data: built here, executed by a transport.

Pure functions only: the Linux shell commands and the Windows PowerShell commands for each
step, and the chunked file-transfer plan for WinRM. Secrets never appear in a command: the
passphrase and the sudo password travel on standard input.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path

OS_FAMILIES = ("linux", "windows")
STEPS = ("copy", "check", "install", "register", "start", "heartbeat")
PACKAGE_RE = re.compile(r"^mobility-agent-(?P<version>\d+(?:\.\d+)*(?:[.-][A-Za-z0-9]+)*)-(?P<os>linux|windows)\.(?:tar\.gz|zip)$")
# Bytes per stdin message over WinRM: base64 (4/3) stays well under the 150 KB default
# MaxEnvelopeSize of Windows Server 2008 R2 (500 KB from 2012 on).
WINRM_CHUNK_BYTES = 96 * 1024
# Staging folders: a new one per job, under a random name (mktemp's on Linux).
LINUX_STAGING_PREFIX = "mobility-agent-push-"
WINDOWS_STAGING_PARENT = r"C:\Windows\Temp"


@dataclass(frozen=True)
class Target:
    host: str
    os: str
    port: int
    install_root: str = "/"  # Linux: prefix the package installs under (/ on a real machine)

    @property
    def prefix(self) -> str:
        """The install root as install.sh takes it: '' for /, else the path without a trailing slash."""
        return self.install_root.rstrip("/")

    @property
    def label(self) -> str:
        return f"{self.host}:{self.port}" + (f" ({self.install_root})" if self.install_root != "/" else "")


@dataclass(frozen=True)
class AgentPackage:
    path: Path
    os: str
    version: str
    sha256: str

    @property
    def top_dir(self) -> str:
        return self.path.name.removesuffix(".tar.gz").removesuffix(".zip")

    @classmethod
    def from_file(cls, path: Path) -> AgentPackage:
        match = PACKAGE_RE.match(path.name)
        if not match:
            raise ValueError(f"{path.name} is not named like an agent package "
                             "(mobility-agent-<version>-linux.tar.gz or -windows.zip)")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return cls(path, match["os"], match["version"], digest)


def installed_version(marker_text: str | None) -> str | None:
    """The version in an installed marker: plain text (Linux) or JSON with `version` (Windows)."""
    text = (marker_text or "").strip().lstrip("\ufeff")
    if not text:
        return None
    if text.startswith("{"):
        return str(json.loads(text).get("version") or "") or None
    return text.splitlines()[0].strip()


def version_key(version: str) -> tuple[int, ...]:
    """Numeric comparison key: 1.10.0 > 1.9.3."""
    return tuple(int(part) for part in re.findall(r"\d+", version))


# --- Linux ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Registration:
    """What `mobility-agent register` is told besides the passphrase (which goes on stdin)."""

    control_server: str
    disks: tuple[str, ...]
    hostname: str | None = None
    host_id: str | None = None

    def agent_args(self) -> list[str]:
        args = [arg for disk in self.disks for arg in ("--disk", disk)]
        if self.hostname:
            args += ["--hostname", self.hostname]
        if self.host_id:
            args += ["--host-id", self.host_id]
        return args


@dataclass(frozen=True)
class LinuxLayout:
    target: Target
    package: AgentPackage
    folder: str = ""  # the job's staging folder, once prepare_staging has made it (see staged)

    @property
    def staging_parent(self) -> str:
        return f"{self.target.prefix}/var/tmp"

    @property
    def staging(self) -> str:
        if not self.folder:
            raise RuntimeError("no staging folder yet: run prepare_staging() and pass what it prints to staged()")
        return self.folder

    @property
    def archive(self) -> str:
        return f"{self.staging}/{self.package.path.name}"

    @property
    def upload_path(self) -> str:
        return self.archive

    @property
    def installer(self) -> str:
        return f"{self.staging}/{self.package.top_dir}/install.sh"

    @property
    def agent(self) -> str:
        return f"{self.target.prefix}/opt/mobility-agent/current/bin/mobility-agent"

    @property
    def state_dir(self) -> str:
        return f"{self.target.prefix}/var/lib/mobility-agent"

    def prefix_args(self) -> str:
        return f" --prefix {shlex.quote(self.target.prefix)}" if self.target.prefix else ""

    def prepare_staging(self, owner: str) -> str:
        """Make the job's staging folder and print its path.

        /var/tmp is writable by every user: `mktemp -d` only ever creates a new folder under an
        unguessable name (never one, or a link, that someone made there beforehand), 0700 and
        then the login user's, who copies into it over SFTP. Half-made, it is removed again.
        """
        parent = shlex.quote(self.staging_parent)
        return (f"mkdir -p {parent} && d=$(mktemp -d {parent}/{LINUX_STAGING_PREFIX}XXXXXXXXXX) || exit 1\n"
                f"chmod 700 \"$d\" && chown {shlex.quote(owner)} \"$d\" || {{ rm -rf \"$d\"; exit 1; }}\n"
                "printf '%s\\n' \"$d\"")

    def staged(self, printed: str) -> LinuxLayout:
        """This layout with the folder prepare_staging printed; anything else is refused (it is removed as root later)."""
        folder = printed.strip()
        if not re.fullmatch(re.escape(f"{self.staging_parent}/{LINUX_STAGING_PREFIX}") + r"[A-Za-z0-9]{10}", folder):
            raise ValueError(f"making the staging folder printed {folder!r}, not a new folder in {self.staging_parent}")
        return replace(self, folder=folder)

    def verify_and_unpack(self) -> str:
        """Check the uploaded archive's SHA-256, then unpack it afresh (a re-run replaces a half-unpacked one)."""
        q_archive, q_stage = shlex.quote(self.archive), shlex.quote(self.staging)
        q_top = shlex.quote(f"{self.staging}/{self.package.top_dir}")
        return (f"echo {self.package.sha256}' '{q_archive} | sha256sum -c --status - "
                f"|| {{ echo 'package checksum mismatch after copy' >&2; exit 1; }}; "
                f"rm -rf {q_top} && tar -xzf {q_archive} -C {q_stage}")

    def installer_command(self, action: str) -> str:
        return f"sh {shlex.quote(self.installer)} {action}{self.prefix_args()}"

    def check_commands(self) -> list[str]:
        """The check step in one remote shell: the copied package's checksum, unpacking, prerequisites."""
        return [f"{self.verify_and_unpack()} && {self.installer_command('check')}"]

    def start_commands(self, clean_staging: bool) -> list[str]:
        """The start step in one remote shell; the staging folder goes with it once it is not needed."""
        start = self.control_command("start")
        return [f"{start} && {self.cleanup()}" if clean_staging else start]

    def control_command(self, action: str) -> str:
        """start/stop/status through the installed version's own copy of install.sh."""
        script = f"{self.target.prefix}/opt/mobility-agent/current/install.sh"
        return f"sh {shlex.quote(script)} {action}{self.prefix_args()}"

    @property
    def ca_file(self) -> str:
        return f"{self.staging}/ca.pem"

    def discover_disks_command(self) -> str:
        return "lsblk -dnpo NAME,TYPE | awk '$2 == \"disk\" {print $1}'"

    def register_command(self, request: Registration) -> str:
        """The passphrase comes on stdin (/dev/stdin): nothing secret on the command line."""
        args = [self.agent, "register", "--server", request.control_server, "--passphrase-file", "/dev/stdin",
                "--ca-file", self.ca_file, "--state-dir", self.state_dir]
        return shlex.join(args + request.agent_args())

    @property
    def identity_file(self) -> str:
        return f"{self.state_dir}/agent.json"

    @property
    def installed_marker(self) -> str:
        return f"{self.target.prefix}/opt/mobility-agent/current/INSTALLED"

    def cleanup(self) -> str:
        return f"rm -rf {shlex.quote(self.staging)}"


def with_sudo(command: str, password: bool) -> str:
    """Run `command` as root through sudo.

    -k: sudo ignores any cached credentials (they are per parent process, and every command is a
    child of the one remote shell), so it asks for the password every time or never, and a
    password line sent along is always the one it reads. With `password`, the first line of
    stdin is the password (-S, no prompt text) and the rest is the command's; `cat` hands it on
    through a pipe, so a command that opens /dev/stdin cannot read it from the start again (a
    shell may keep a here-document in a file). Without: -n, sudo fails rather than asks.
    """
    if password:
        return f"cat | sudo -S -k -p '' sh -c {shlex.quote(command)}"
    return f"sudo -n -k sh -c {shlex.quote(command)}"


# --- Windows ----------------------------------------------------------------------------------

def new_windows_staging() -> str:
    return f"{WINDOWS_STAGING_PARENT}\\MobilityAgentPush-{secrets.token_hex(16)}"


@dataclass(frozen=True)
class WindowsLayout:
    target: Target
    package: AgentPackage
    staging: str = field(default_factory=new_windows_staging)  # one per job: see prepare_staging

    @property
    def archive(self) -> str:
        return f"{self.staging}\\{self.package.path.name}"

    @property
    def part(self) -> str:
        return self.archive + ".part"

    @property
    def installer(self) -> str:
        return f"{self.staging}\\{self.package.top_dir}\\Install-MobilityAgent.ps1"

    @property
    def agent(self) -> str:
        return r"C:\Program Files\MobilityAgent\current\Scripts\mobility-agent.exe"

    @property
    def state_dir(self) -> str:
        return r"C:\ProgramData\MobilityAgent\state"

    @property
    def identity_file(self) -> str:
        return self.state_dir + r"\agent.json"

    @property
    def installed_marker(self) -> str:
        return r"C:\Program Files\MobilityAgent\installed.json"

    @property
    def upload_path(self) -> str:
        return self.part

    def prepare_staging(self, _owner: str = "") -> str:
        """Make the job's staging folder, for SYSTEM and the Administrators only.

        Any user can make folders in C:\\Windows\\Temp (and own them): New-Item without -Force
        fails if the name exists, so only a folder made here is used. Inheritance is cut and
        the ACL set by SID (names are localised) before anything is written into it; it must
        then be empty, or someone wrote into it while it still had the parent's ACL.
        """
        q = ps_quote(self.staging)
        return (f"New-Item -ItemType Directory -Path {q} -ErrorAction Stop | Out-Null; "
                f"& icacls.exe {q} /inheritance:r /grant:r '*S-1-5-18:(OI)(CI)F' '*S-1-5-32-544:(OI)(CI)F' | Out-Null; "
                f"if ($LASTEXITCODE -ne 0) {{ Remove-Item -LiteralPath {q} -Force; "
                f"throw ('icacls could not restrict the staging folder to SYSTEM and Administrators: exit code ' + "
                f"$LASTEXITCODE) }}; "
                f"if (Get-ChildItem -LiteralPath {q} -Force) {{ "
                f"throw ('the new staging folder ' + {q} + ' is not empty: something wrote into it; look at it') }}")

    def staged(self, _printed: str) -> WindowsLayout:
        """The folder's name was chosen here: prepare_staging made that one or failed."""
        return self

    def verify_and_unpack(self) -> str:
        return (f"$h = (Get-FileHash -LiteralPath {ps_quote(self.part)} -Algorithm SHA256).Hash.ToLowerInvariant(); "
                f"if ($h -ne '{self.package.sha256}') {{ throw 'package checksum mismatch after copy' }}; "
                f"Move-Item -LiteralPath {ps_quote(self.part)} -Destination {ps_quote(self.archive)} -Force; "
                f"Remove-Item -LiteralPath {ps_quote(self.staging + chr(92) + self.package.top_dir)} -Recurse -Force "
                f"-ErrorAction SilentlyContinue; "
                f"Expand-Archive -LiteralPath {ps_quote(self.archive)} -DestinationPath {ps_quote(self.staging)} -Force")

    def installer_command(self, action: str) -> str:
        """`action` as install.sh names it (check, install, start...); the script's -Action is capitalised."""
        return f"& {ps_quote(self.installer)} -Action {action.capitalize()}; exit $LASTEXITCODE"

    def check_commands(self) -> list[str]:
        """The copied package's checksum and unpacking, then the prerequisites (each ends its script)."""
        return [self.verify_and_unpack(), self.installer_command("check")]

    def start_commands(self, clean_staging: bool) -> list[str]:
        return [self.control_command("start"), *([self.cleanup()] if clean_staging else [])]

    def control_command(self, action: str) -> str:
        """Start/Stop/Status through the installed version's own copy of the script."""
        script = r"C:\Program Files\MobilityAgent\current\Install-MobilityAgent.ps1"
        return f"& {ps_quote(script)} -Action {action.capitalize()}; exit $LASTEXITCODE"

    @property
    def ca_file(self) -> str:
        return f"{self.staging}\\ca.pem"

    def discover_disks_command(self) -> str:
        return "Get-Disk | Sort-Object Number | ForEach-Object { '\\\\.\\PhysicalDrive' + $_.Number }"

    def register_command(self, request: Registration) -> str:
        # The passphrase arrives on stdin and goes to a file only the administrators and SYSTEM can
        # read (the staging folder), removed right after: never part of a command line.
        secret = f"{self.staging}\\passphrase.txt"
        args = " ".join(ps_quote(a) for a in ["register", "--server", request.control_server, "--passphrase-file",
                                                secret, "--ca-file", self.ca_file, "--state-dir", self.state_dir,
                                                *request.agent_args()])
        return (f"[IO.File]::WriteAllText({ps_quote(secret)}, [Console]::In.ReadLine()); "
                f"try {{ & {ps_quote(self.agent)} {args}; $code = $LASTEXITCODE }} "
                f"finally {{ Remove-Item -LiteralPath {ps_quote(secret)} -Force -ErrorAction SilentlyContinue }}; exit $code")

    def cleanup(self) -> str:
        return f"Remove-Item -LiteralPath {ps_quote(self.staging)} -Recurse -Force -ErrorAction SilentlyContinue"


def ps_quote(text: str) -> str:
    """A PowerShell single-quoted literal: nothing inside is expanded."""
    return "'" + text.replace("'", "''") + "'"


@dataclass(frozen=True)
class TransferPlan:
    """One WinRM command that writes its standard input (base64 lines) to `remote_path`."""

    remote_path: str
    receiver: str  # the PowerShell run on the target
    chunk_bytes: int

    def stdin_chunks(self, data: bytes) -> list[bytes]:
        return [base64.b64encode(data[i:i + self.chunk_bytes]) + b"\r\n" for i in range(0, len(data), self.chunk_bytes)]


def winrm_transfer_plan(remote_path: str, chunk_bytes: int = WINRM_CHUNK_BYTES) -> TransferPlan:
    """The file goes over the WinRM shell's stdin, not the command line (limited to 8191 characters)."""
    receiver = (f"$out = [IO.File]::Open({ps_quote(remote_path)}, [IO.FileMode]::Create, [IO.FileAccess]::Write); "
                "try { while ($null -ne ($line = [Console]::In.ReadLine())) { if ($line) { "
                "$b = [Convert]::FromBase64String($line); $out.Write($b, 0, $b.Length) } } } "
                "finally { $out.Dispose() }")
    return TransferPlan(remote_path, receiver, chunk_bytes)


def encode_powershell(script: str) -> str:
    """powershell -EncodedCommand form (UTF-16LE base64), as pywinrm's run_ps sends it."""
    return base64.b64encode(script.encode("utf-16-le")).decode("ascii")
