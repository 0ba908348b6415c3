"""Request and response bodies of the control API. Every request model forbids unknown
fields and bounds every value, so bad input is a 422 naming the field, never a DB error."""
from __future__ import annotations

import datetime as dt
import ipaddress
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from ..health.state_machine import Action, Desired, State

MAX_BIGINT = 2**63 - 1


def _printable(allowed_controls: str):
    # Lone surrogates cannot be stored in MySQL/SQLite text; control characters break logs and tables.
    def check(text: str) -> str:
        if any(0xD800 <= ord(c) <= 0xDFFF or (ord(c) < 0x20 and c not in allowed_controls) or ord(c) == 0x7F
               for c in text):
            raise ValueError("must be printable text (no control characters or lone surrogates)")
        return text
    return check


def Text(max_length: int, min_length: int = 1, multiline: bool = False):
    return Annotated[str, StringConstraints(min_length=min_length, max_length=max_length, strip_whitespace=False),
                     AfterValidator(_printable("\t\r\n" if multiline else ""))]


def _address(text: str) -> str:
    ipaddress.ip_address(text)
    return text


def _host_port(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("must be HOST:PORT with a port 1-65535")
    return text


IPAddressText = Annotated[str, StringConstraints(max_length=45), AfterValidator(_address)]
HostPort = Annotated[Text(255), AfterValidator(_host_port)]
Bytes = Annotated[int, Field(ge=0, le=MAX_BIGINT)]
Percent = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]
Identifier = Text(64)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Problem(BaseModel):
    error: str
    details: list[str] = []


# --- agents -----------------------------------------------------------------------------------
class DiskIn(Strict):
    name: Text(255)
    size_bytes: Bytes


class AgentRegistration(Strict):
    passphrase: Text(256)
    host_id: Text(128)
    hostname: Text(255)
    os_family: Literal["windows", "linux"]
    os_name: Text(255, min_length=0) = ""
    agent_version: Text(32, min_length=0) = ""
    addresses: list[IPAddressText] = Field(default_factory=list, max_length=64)
    disks: list[DiskIn] = Field(min_length=1, max_length=64)
    csr: Text(16384, multiline=True)


class ProcessServerOut(BaseModel):
    id: str
    name: str
    address: str


class DiskIndex(BaseModel):
    name: str
    index: int  # the disk's number on the data port and in `appliance replica export --disk N`


class AgentRegistered(BaseModel):
    machine_id: str
    certificate: str
    ca_certificate: str
    process_server: ProcessServerOut | None
    heartbeat_interval_s: int
    disks: list[DiskIndex]


class DiskCounters(Strict):
    name: Text(255)
    total_bytes: Bytes
    replicated_bytes: Bytes
    backlog_bytes: Bytes


class Heartbeat(Strict):
    state: Literal["not_enabled", "initiating", "initial_sync", "continuous", "paused", "resync", "stalled"]
    initial_sync_percent: Percent | None = None
    disks: list[DiskCounters] = Field(default_factory=list, max_length=64)


class PolicyOut(BaseModel):
    id: int
    name: str
    rpo_threshold_minutes: int
    retention_hours: int
    crash_consistent_minutes: int
    app_consistent_minutes: int


class DesiredStateOut(BaseModel):
    desired_state: Desired
    process_server: ProcessServerOut | None
    throttled: bool
    policy: PolicyOut
    heartbeat_interval_s: int


# --- process servers --------------------------------------------------------------------------
class ProcessServerRegistration(Strict):
    passphrase: Text(256)
    name: Text(128)
    address: HostPort
    capacity_machines: int = Field(default=200, ge=1, le=1000)
    csr: Text(16384, multiline=True)


class ProcessServerRegistered(BaseModel):
    process_server_id: str
    certificate: str
    ca_certificate: str


class ProcessServerLoad(Strict):
    cpu_percent: Percent
    memory_percent: Percent
    cache_free_percent: Percent
    upload_backlog_bytes: Bytes | None = None
    upload_rate_bytes_per_s: Annotated[float, Field(ge=0, le=1e12, allow_inf_nan=False)] | None = None


class AlertOut(BaseModel):
    code: str
    severity: str
    message: str


class ProcessServerHealthOut(BaseModel):
    id: str
    name: str
    address: str
    builtin: bool
    health: str
    throttled: bool
    headroom_percent: float
    machines: int
    alerts: list[AlertOut]
    last_heartbeat_at: dt.datetime | None


class AssignedMachine(BaseModel):
    id: str
    hostname: str
    cert_fingerprint: str | None
    desired_state: Desired


# --- operators --------------------------------------------------------------------------------
class Login(Strict):
    username: Text(64)
    password: Text(1024)


class TokenOut(BaseModel):
    token: str
    expires_at: dt.datetime


class PolicyIn(Strict):
    name: Identifier
    rpo_threshold_minutes: int = Field(default=60, ge=1, le=1440)
    retention_hours: int = Field(default=24, ge=0, le=360)  # at most 15 days
    crash_consistent_minutes: int = Field(default=5, ge=1, le=60)
    app_consistent_minutes: int = Field(default=240, ge=0, le=720)  # 0 = none; else 1-12 h


class PolicyPatch(Strict):
    name: Identifier | None = None
    rpo_threshold_minutes: int | None = Field(default=None, ge=1, le=1440)
    retention_hours: int | None = Field(default=None, ge=0, le=360)
    crash_consistent_minutes: int | None = Field(default=None, ge=1, le=60)
    app_consistent_minutes: int | None = Field(default=None, ge=0, le=720)


class MachineAction(Strict):
    action: Action


class SwitchProcessServer(Strict):
    process_server_id: Text(36)


class AssignPolicy(Strict):
    policy_id: int = Field(ge=1, le=2**31 - 1)


class DiskOut(BaseModel):
    index: int
    name: str
    size_bytes: int
    total_bytes: int
    replicated_bytes: int
    backlog_bytes: int


class MachineOut(BaseModel):
    id: str
    host_id: str
    hostname: str
    os_family: str
    os_name: str
    agent_version: str
    addresses: list[str]
    process_server_id: str | None
    policy_id: int
    desired_state: Desired
    replication_state: State
    initial_sync_percent: float | None
    last_heartbeat_at: dt.datetime | None
    last_recovery_point_at: dt.datetime | None
    rpo_minutes: float | None
    health: str
    alerts: list[AlertOut]
    disks: list[DiskOut]


class AuditOut(BaseModel):
    id: int
    at: dt.datetime
    actor: str
    action: str
    target_type: str
    target_id: str
    details: dict
    remote_address: str


class JobStepOut(BaseModel):
    position: int
    name: str
    status: str
    message: str
    started_at: dt.datetime | None
    finished_at: dt.datetime | None


class JobOut(BaseModel):
    id: str
    kind: str
    target: str
    status: str
    progress_percent: int
    error: str | None
    created_by: str
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    steps: list[JobStepOut]


class StatusOut(BaseModel):
    appliance: dict
    process_servers: list[ProcessServerHealthOut]
    machines: list[MachineOut]
    overall_health: str
