"""Deploy options: inventory defaults overridden by flags, validated together (pure logic).

Every problem is collected and reported at once, before anything is read or contacted.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

# The inventory's own checks: a flag obeys the same rules as the setting it overrides.
from ..settings import (
    DISK_PROVISIONING,
    Settings,
    check_dns_list,
    check_hostname,
    check_ipv4,
)
from ..version import REPO_ROOT
from .errors import DeployOptionsError

DEFAULT_HTTPS_PORT = 443
DEFAULT_LEASE_TIMEOUT = 300.0
DEFAULT_IP_TIMEOUT = 900.0  # Windows first boot with sysprep specialize takes minutes
_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_VM_NAME_MAX = 80  # vCenter's limit for an inventory name


@dataclass(frozen=True)
class VcenterAddress:
    host: str
    port: int = DEFAULT_HTTPS_PORT

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_HTTPS_PORT else f"{host}:{self.port}"


@dataclass(frozen=True)
class Placement:
    datacenter: str
    datastore: str
    network: str
    cluster: str | None = None
    host: str | None = None
    resource_pool: str | None = None
    folder: str = ""  # "" is the datacenter's VM folder; "A/B" a path below it


@dataclass(frozen=True)
class GuestNetwork:
    """What the appliance applies at first boot, passed as OVF properties."""
    ip: str
    prefix: int
    gateway: str
    dns: tuple[str, ...]
    hostname: str
    data_port: int

    def property_values(self) -> dict[str, str]:
        """Values by the appliance descriptor's property keys (without the class prefix)."""
        return {
            "ip": self.ip,
            "prefix": str(self.prefix),
            "gateway": self.gateway,
            "dns": ",".join(self.dns),
            "hostname": self.hostname,
            "data_port": str(self.data_port),
        }


@dataclass(frozen=True)
class TlsOptions:
    ca_file: Path | None = None
    insecure: bool = False


@dataclass(frozen=True)
class DeployOptions:
    vcenter: VcenterAddress
    ova: Path
    name: str
    placement: Placement
    guest: GuestNetwork
    control_port: int
    disk_provisioning: str = "thin"
    tls: TlsOptions = field(default_factory=TlsOptions)
    replace: bool = False
    strict: bool = False
    power_on: bool = False
    wait_ip: bool = False
    ip_timeout: float = DEFAULT_IP_TIMEOUT
    lease_timeout: float = DEFAULT_LEASE_TIMEOUT


@dataclass
class Flags:
    """The `invoke deploy` flags; None means "not given, take the inventory's value"."""
    vcenter: str | None = None
    ova: str | None = None
    name: str | None = None
    datacenter: str | None = None
    cluster: str | None = None
    host: str | None = None
    resource_pool: str | None = None
    datastore: str | None = None
    network: str | None = None
    folder: str | None = None
    ip: str | None = None
    gateway: str | None = None
    dns: str | None = None
    hostname: str | None = None
    disk_provisioning: str | None = None
    ca_file: str | None = None
    insecure: bool = False
    replace: bool = False
    strict: bool = False
    power_on: bool = False
    wait_ip: bool = False
    ip_timeout: str | float | None = None
    lease_timeout: str | float | None = None


def parse_vcenter(text: str) -> VcenterAddress:
    """`host`, `host:port` or `https://host[:port][/sdk]` -> address; DeployOptionsError otherwise."""
    text = text.strip()
    allowed = "a host name, host:port or https://host[:port]"
    if not text:
        raise DeployOptionsError(f"--vcenter is empty: give {allowed} (or set deploy.vcenter in the inventory)")
    if "://" in text:
        parts = urlsplit(text)
        if parts.scheme != "https":
            raise DeployOptionsError(f"--vcenter {text!r}: only https:// is allowed (vCenter's API is HTTPS)")
        if parts.path not in ("", "/", "/sdk", "/sdk/") or parts.query or parts.username or parts.password:
            raise DeployOptionsError(f"--vcenter {text!r}: give {allowed}, without a path, query or credentials")
    else:
        parts = urlsplit(f"//{text}")
    try:
        host, port = parts.hostname or "", parts.port or DEFAULT_HTTPS_PORT
    except ValueError:
        raise DeployOptionsError(f"--vcenter {text!r}: the port must be a number from 1 to 65535") from None
    if not _valid_host(host):
        raise DeployOptionsError(f"--vcenter {text!r}: {host!r} is not a host name or IP address; give {allowed}")
    return VcenterAddress(host, port)


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOST_RE.match(host))


def parse_ip(text: str, default_prefix: int) -> tuple[str, int]:
    """`10.0.0.5/24` or `10.0.0.5` (prefix from the inventory) -> (address, prefix)."""
    address, _, prefix_text = text.strip().partition("/")
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        raise DeployOptionsError(f"--ip {text!r}: must be an IPv4 address, optionally with a prefix, "
                                 f"such as 10.0.0.5/24") from None
    prefix = default_prefix
    if prefix_text:
        if not prefix_text.isdigit() or not 1 <= int(prefix_text) <= 32:
            raise DeployOptionsError(f"--ip {text!r}: the prefix must be a whole number from 1 to 32")
        prefix = int(prefix_text)
    if ip.is_loopback or ip.is_multicast or ip.is_unspecified or ip.is_link_local:
        raise DeployOptionsError(f"--ip {text!r}: must be a unicast address (not loopback, multicast, "
                                 f"link-local or 0.0.0.0)")
    return str(ip), prefix


def options_from(settings: Settings, flags: Flags) -> DeployOptions:
    """Merge flags over the inventory's deploy defaults and validate everything together."""
    problems: list[str] = []
    deploy = settings.deploy

    def pick(flag: str | None, key: str, default: str | None = None) -> str | None:
        value = flag if flag is not None else deploy.get(key, default)
        return None if value is None else str(value)

    vcenter: VcenterAddress | None = None
    try:
        vcenter = parse_vcenter(pick(flags.vcenter, "vcenter", "") or "")
    except DeployOptionsError as exc:
        problems.append(str(exc))

    ova = Path(flags.ova) if flags.ova else REPO_ROOT / "dist" / f"{settings.artifact_stem}.ova"
    name = flags.name if flags.name is not None else settings.name
    if not name.strip() or len(name) > _VM_NAME_MAX or any(c in name for c in "/\\%") or name != name.strip():
        problems.append(f"--name {name!r}: must be 1-{_VM_NAME_MAX} characters without '/', '\\', '%' "
                        f"or surrounding spaces")

    required = {"datacenter": flags.datacenter, "datastore": flags.datastore, "network": flags.network}
    values: dict[str, str] = {}
    for key, flag in required.items():
        value = pick(flag, key)
        if not value:
            problems.append(f"--{key} is required (or set deploy.{key} in the inventory)")
        values[key] = value or ""
    cluster = pick(flags.cluster, "cluster") if flags.host is None or flags.cluster is not None else None
    folder = (pick(flags.folder, "folder", "") or "").strip("/")

    provisioning = pick(flags.disk_provisioning, "disk_provisioning", "thin") or "thin"
    if provisioning not in DISK_PROVISIONING:
        problems.append(f"--disk-provisioning {provisioning!r}: allowed are {', '.join(DISK_PROVISIONING)}")

    ip, prefix = settings.network.ip, settings.network.prefix
    if flags.ip is not None:
        try:
            ip, prefix = parse_ip(flags.ip, prefix)
        except DeployOptionsError as exc:
            problems.append(str(exc))
    gateway = flags.gateway if flags.gateway is not None else settings.network.gateway
    problems += _gateway_problems(ip, prefix, gateway)
    dns = tuple(d.strip() for d in flags.dns.split(",") if d.strip()) if flags.dns is not None else settings.network.dns
    if problem := check_dns_list(list(dns)):
        problems.append(f"--dns {','.join(dns)!r}: {problem}")
    hostname = flags.hostname if flags.hostname is not None else settings.network.hostname
    if problem := check_hostname(hostname):
        problems.append(f"--hostname {hostname!r}: {problem}")

    ca_file = Path(flags.ca_file).expanduser() if flags.ca_file else None
    if ca_file is not None and flags.insecure:
        problems.append("--ca-file and --insecure contradict each other: give one of them")
    if ca_file is not None and not ca_file.is_file():
        problems.append(f"--ca-file {str(ca_file)!r}: no such file (a PEM file with the CA that signed vCenter's "
                        f"certificate)")
    ip_timeout = _positive(flags.ip_timeout, DEFAULT_IP_TIMEOUT, "--ip-timeout", problems)
    lease_timeout = _positive(flags.lease_timeout, DEFAULT_LEASE_TIMEOUT, "--lease-timeout", problems)
    if flags.wait_ip and not flags.power_on:
        problems.append("--wait-ip needs --power-on (a powered-off VM reports no IP address)")

    if problems or vcenter is None:
        raise DeployOptionsError("invalid deploy options:\n  " + "\n  ".join(problems))
    return DeployOptions(
        vcenter=vcenter,
        ova=ova,
        name=name,
        placement=Placement(datacenter=values["datacenter"], datastore=values["datastore"], network=values["network"],
                            cluster=cluster or None, host=flags.host or None, resource_pool=flags.resource_pool or None,
                            folder=folder),
        guest=GuestNetwork(ip=ip, prefix=prefix, gateway=gateway, dns=dns, hostname=hostname,
                           data_port=settings.ports.data),
        control_port=settings.ports.control,
        disk_provisioning=provisioning,
        tls=TlsOptions(ca_file=ca_file, insecure=flags.insecure),
        replace=flags.replace,
        strict=flags.strict,
        power_on=flags.power_on,
        wait_ip=flags.wait_ip,
        ip_timeout=ip_timeout,
        lease_timeout=lease_timeout,
    )


def _gateway_problems(ip: str, prefix: int, gateway: str) -> list[str]:
    if problem := check_ipv4(gateway):
        return [f"--gateway {gateway!r}: {problem}"]
    address = ipaddress.IPv4Address(gateway)
    network = ipaddress.IPv4Network(f"{ip}/{prefix}", strict=False)
    if address not in network:
        return [f"--gateway {gateway}: must be inside the appliance's network {network}"]
    if str(address) == ip:
        return [f"--gateway {gateway}: must differ from the appliance's own address"]
    return []


def _positive(value: str | float | None, default: float, flag: str, problems: list[str]) -> float:
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        problems.append(f"{flag} {value!r}: must be a number of seconds above 0")
    return seconds
