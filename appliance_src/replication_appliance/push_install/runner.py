"""The push-install steps, run against a transport, reporting each step to a progress sink.

copy -> check -> install -> register -> start -> heartbeat. An agent already at the package's
version and registered with this appliance makes copy/check/install/register `skipped`: a
second run changes nothing on the target. Whatever happens, the staging folder is removed;
a failed install removes its half-made version (install.sh / Install-MobilityAgent.ps1), so
the target is as before and the job can simply be run again.
"""
from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Self

from .errors import PushInstallError, StepFailed, VersionRefused
from .plan import (
    STEPS,
    AgentPackage,
    LinuxLayout,
    Registration,
    Target,
    WindowsLayout,
    installed_version,
    version_key,
)
from .transport import Transport

EXIT_PREREQUISITES = 3  # install.sh / Install-MobilityAgent.ps1: a prerequisite failed
EXIT_NEWER_INSTALLED = 4  # ... a newer agent is installed; downgrade refused


class ProgressSink(Protocol):
    def step(self, name: str, status: str, message: str = "") -> None: ...


@dataclass(frozen=True)
class PushRequest:
    target: Target
    package: AgentPackage
    control_server: str  # host:port the agent registers with (the configuration server, 443)
    ca_cert: Path  # the appliance CA the agent trusts (DATA_DIR/ca.pem)
    passphrase: str = field(repr=False)
    credential_owner: str = "root"  # the login user; owns the staging folder while files are copied
    disks: tuple[str, ...] = ()  # disks to replicate; empty: every disk the target has
    hostname: str | None = None  # name and identity to register (default: the agent's own)
    host_id: str | None = None


@dataclass(frozen=True)
class PushOutcome:
    machine_id: str
    version: str
    changed: bool


# (machine id, not before this time.time()) -> the agent version of a heartbeat seen since, or None
HeartbeatProbe = Callable[[str, float], "str | None"]
# An agent already in place heartbeats every few minutes; one within the health rule's 15 minutes counts.
RECENT_HEARTBEAT_S = 15 * 60
HEARTBEAT_FIRST_POLL_S, HEARTBEAT_MAX_POLL_S = 0.05, 0.5


def layout_for(request: PushRequest) -> LinuxLayout | WindowsLayout:
    return (LinuxLayout if request.target.os == "linux" else WindowsLayout)(request.target, request.package)


def run_push_install(request: PushRequest, transport: Transport, sink: ProgressSink, heartbeat: HeartbeatProbe,
                     heartbeat_timeout: float = 120.0) -> PushOutcome:
    layout = layout_for(request)
    heartbeat_since = time.time() - RECENT_HEARTBEAT_S
    current = installed_version(transport.read_text(layout.installed_marker))
    identity = _identity(transport.read_text(layout.identity_file))
    if current and version_key(current) > version_key(request.package.version):
        raise VersionRefused(f"{request.target.label} runs agent {current}, newer than this appliance's "
                             f"{request.package.version}: upgrade the appliance first")
    registered = identity is not None and identity.get("control_server") == request.control_server
    up_to_date = current == request.package.version and registered
    step = _Steps(sink)
    staged = False  # the job's staging folder exists on the target and is to be removed
    try:
        if up_to_date:
            for name in ("copy", "check", "install", "register"):
                sink.step(name, "skipped", f"agent {current} installed and registered")
        else:
            with step("copy"):
                made = _run(transport, "copy", layout.prepare_staging(request.credential_owner))
                try:
                    layout = layout.staged(made.stdout)
                except ValueError as exc:
                    raise StepFailed("copy", str(exc)) from None
                staged = True
                transport.put(request.package.path, layout.upload_path)
                transport.put(request.ca_cert, layout.ca_file)
                step.message = f"{request.package.path.name} and the appliance CA copied"
            with step("check"):
                for command in layout.check_commands():
                    _run(transport, "check", command)
                step.message = f"SHA-256 {request.package.sha256[:12]}... matches on the target; prerequisites met"
            heartbeat_since = time.time()  # from here on, only the new agent's heartbeat counts
            with step("install"):
                result = transport.run(layout.installer_command("install"))
                if result.exit_code == EXIT_NEWER_INSTALLED:
                    raise VersionRefused(f"{request.target.label}: {result.last_words()}")
                if result.exit_code != 0:
                    raise StepFailed("install", result.last_words())
                step.message = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "installed"
            if registered:
                sink.step("register", "skipped", "already registered with this appliance")
            else:
                with step("register"):
                    # An agent registered elsewhere may be running: it holds the state folder
                    # (one agent per folder); the start step starts it again.
                    _run(transport, "register", layout.control_command("stop"))
                    disks = request.disks or tuple(_run(transport, "register", layout.discover_disks_command()).stdout.split())
                    registration = Registration(request.control_server, disks, request.hostname, request.host_id)
                    _run(transport, "register", layout.register_command(registration), stdin=request.passphrase + "\n")
                    identity = _identity(transport.read_text(layout.identity_file))
                    if identity is None:
                        raise StepFailed("register", f"the agent wrote no identity to {layout.identity_file}")
                    step.message = f"registered as machine {identity['machine_id']}"
        assert identity is not None
        with step("start"):
            # The staging folder is not needed any more: it goes in the same round trip.
            for command in layout.start_commands(clean_staging=staged):
                result = _run(transport, "start", command)
                words = result.stdout.strip().splitlines()
                step.message = step.message or (words[-1] if words else "running")
            staged = False
        with step("heartbeat"):
            version = _wait_for_heartbeat(heartbeat, identity["machine_id"], heartbeat_since, heartbeat_timeout)
            step.message = f"heartbeat from agent {version}"
        return PushOutcome(identity["machine_id"], request.package.version, changed=not up_to_date)
    finally:
        if staged:
            _cleanup(transport, layout.cleanup())


class _Steps:
    """`with step(name):` reports running, then succeeded (with .message) or failed (with the error)."""

    def __init__(self, sink: ProgressSink) -> None:
        self.sink, self.name, self.message = sink, "", ""

    def __call__(self, name: str) -> _Steps:
        assert name in STEPS, name
        self.name, self.message = name, ""
        return self

    def __enter__(self) -> Self:
        self.sink.step(self.name, "running")
        return self

    def __exit__(self, exc_type, exc, _tb) -> bool:
        if exc is None:
            self.sink.step(self.name, "succeeded", self.message)
        elif isinstance(exc, PushInstallError):
            self.sink.step(self.name, "failed", str(exc))
        else:
            self.sink.step(self.name, "failed", f"{type(exc).__name__}: {exc}")
        return False


def _run(transport: Transport, step: str, command: str, stdin: str | None = None):
    result = transport.run(command, stdin=stdin)
    if result.exit_code != 0:
        raise StepFailed(step, result.last_words())
    return result


def _cleanup(transport: Transport, command: str) -> None:
    """Best effort: the staging folder goes, but a lost connection must not hide the step's own error."""
    with contextlib.suppress(Exception):  # whatever the transport raises, the original outcome stands
        transport.run(command)


def _identity(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) and data.get("machine_id") else None


def _wait_for_heartbeat(probe: HeartbeatProbe, machine_id: str, since: float, timeout: float) -> str:
    # The agent heartbeats as it starts: look often at first, then back off to spare the database.
    deadline, pause = time.monotonic() + timeout, HEARTBEAT_FIRST_POLL_S
    while time.monotonic() < deadline:
        version = probe(machine_id, since)
        if version is not None:
            return version
        time.sleep(pause)
        pause = min(pause * 1.5, HEARTBEAT_MAX_POLL_S)
    raise StepFailed("heartbeat", f"no heartbeat from machine {machine_id} within {timeout:.0f}s; the agent is "
                                  "installed and registered: check its log and that it reaches the appliance")
