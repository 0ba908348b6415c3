"""The agent's calls to the configuration server (443): registration with the passphrase and
a CSR (the private key never leaves the agent), then heartbeats over mutual TLS."""
from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path

import httpx

from ..common.errors import ApplianceError
from ..common.secrets import write_private_file
from ..common.tls import client_ssl_context, key_to_pem, make_csr, new_private_key
from .state import AgentConfig, DiskConfig, StateDir

API = "/api/v1"
# httpx logs every request at INFO: the agent's log and its refusals should be its own one-line messages.
logging.getLogger("httpx").setLevel(logging.WARNING)


class ControlError(ApplianceError):
    """The configuration server refused a call or cannot be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _detail(resp: httpx.Response) -> str:
    """The server's message: its errors are {"error": "...", "details": [...]} (the message
    already names each detail); anything else (a proxy's page) is shown briefly, on one line."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return " ".join(body["error"].split())
    return " ".join(resp.text.split())[:200] or resp.reason_phrase


def host_id() -> str:
    try:
        return Path("/etc/machine-id").read_text().strip() or socket.gethostname()
    except OSError:
        return socket.gethostname()


def register(server: str, passphrase: str, ca_file: Path, state: StateDir, disks: list[DiskConfig],
             hostname: str, host_identity: str, os_name: str = "") -> AgentConfig:
    key = new_private_key()
    body = {"passphrase": passphrase, "host_id": host_identity, "hostname": hostname, "os_family": "linux",
            "os_name": os_name, "disks": [{"name": d.path, "size_bytes": d.size} for d in disks],
            "csr": make_csr(key, hostname).decode()}
    try:
        with httpx.Client(base_url=f"https://{server}", verify=client_ssl_context(ca_file), timeout=30) as c:
            resp = c.post(f"{API}/agents/register", json=body)
    except httpx.HTTPError as e:
        raise ControlError(f"configuration server {server} unreachable: {e}") from None
    if resp.status_code != 200:
        raise ControlError(f"registration refused by {server} (HTTP {resp.status_code}): {_detail(resp)}")
    out = resp.json()
    state.root.mkdir(parents=True, exist_ok=True)
    write_private_file(state.key, key_to_pem(key))
    state.cert.write_text(out["certificate"])
    state.ca.write_bytes(ca_file.read_bytes())
    # The appliance numbers the disks (a re-registered machine keeps its numbers): disk i of the
    # config is disk i on the data port.
    index = {d["name"]: d["index"] for d in out["disks"]}
    disks = sorted(disks, key=lambda d: index[d.path])
    # No process server yet (none has headroom): heartbeats hand one out later.
    config = AgentConfig(out["machine_id"], hostname, server, (out.get("process_server") or {}).get("address", ""), disks)
    state.drop_disks_from(len(disks))
    state.save_config(config)
    return config


@dataclass(frozen=True)
class Desired:
    state: str  # replicate / pause / stop / resync
    process_server: str | None
    throttled: bool
    interval_s: float


def heartbeat(config: AgentConfig, state: StateDir, body: dict) -> Desired:
    ctx = client_ssl_context(state.ca, state.cert, state.key)
    try:
        with httpx.Client(base_url=f"https://{config.control_server}", verify=ctx, timeout=15) as c:
            resp = c.post(f"{API}/agents/{config.machine_id}/heartbeat", json=body)
    except httpx.HTTPError as e:
        raise ControlError(f"configuration server {config.control_server} unreachable: {e}") from None
    if resp.status_code != 200:
        raise ControlError(f"heartbeat refused (HTTP {resp.status_code}): {_detail(resp)}", resp.status_code)
    out = resp.json()
    ps = out.get("process_server") or {}
    return Desired(out["desired_state"], ps.get("address"), bool(out.get("throttled")),
                   float(out["policy"]["crash_consistent_minutes"]) * 60)
