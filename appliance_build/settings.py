"""The inventory is the one source of truth: load it, validate every setting, expose typed records.

An inventory is a folder under `inventory/` usable by Ansible as is (`hosts.yml` and
`group_vars/all.yml`). Validation collects every problem before anything runs, and each message
names the setting, the value found and what is allowed.
"""
from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import SettingsError
from .version import APPLIANCE_VERSION, REPO_ROOT

INVENTORY_ROOT = REPO_ROOT / "inventory"
DEFAULT_INVENTORY = "local"

CLOUDS = ("public", "government")
BUILDER_TARGETS = ("qemu", "vsphere")
NIC_TYPES = ("vmxnet3",)
DISK_PROVISIONING = ("thin", "thick", "eagerZeroedThick")
MIN_CPUS = 8  # seed: 8 cores
MIN_MEMORY_MB = 16384  # seed: 16 GB
MIN_CACHE_GB = 600  # seed: 600 GB free on the process server cache disk
MIN_RETENTION_GB = 600  # seed: 600 GB free on the retention disk
MIN_OS_GB = 40  # Windows Server 2016 with the appliance software and logs
MAX_DISK_GB = 62 * 1024  # VMFS/vSphere VMDK limit (62 TB)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# NetBIOS limit: Windows truncates computer names beyond 15 characters.
_HOSTNAME_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,15}(?<!-)$")
_LOCALE_RE = re.compile(r"^[a-z]{2}-[A-Z]{2}$")
_SHA256_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class DiskSizes:
    os_gb: int
    cache_gb: int
    retention_gb: int


@dataclass(frozen=True)
class VmSettings:
    cpus: int
    memory_mb: int
    nic: str
    disks: DiskSizes


@dataclass(frozen=True)
class NetworkSettings:
    ovf_network: str
    hostname: str
    ip: str
    prefix: int
    gateway: str
    dns: tuple[str, ...]

    @property
    def netmask(self) -> str:
        return str(ipaddress.IPv4Network(f"0.0.0.0/{self.prefix}").netmask)


@dataclass(frozen=True)
class Ports:
    control: int
    data: int


@dataclass(frozen=True)
class WindowsSettings:
    locale: str
    timezone: str
    admin_user: str
    image_name: str


@dataclass(frozen=True)
class BuilderSettings:
    target: str
    iso_url: str
    iso_checksum: str
    iso_size: int
    qemu: dict[str, Any]
    vsphere: dict[str, Any]


@dataclass(frozen=True)
class Settings:
    inventory: str
    inventory_dir: Path
    name: str
    version: str
    cloud: str
    mysql_version: str
    vm: VmSettings
    network: NetworkSettings
    ports: Ports
    windows: WindowsSettings
    builder: BuilderSettings
    deploy: dict[str, Any]
    raw: dict[str, Any] = field(repr=False)

    @property
    def artifact_stem(self) -> str:
        """`<name>-<version>`: the stem of every artifact of this build."""
        return f"{self.name}-{self.version}"


def available_inventories() -> list[str]:
    if not INVENTORY_ROOT.is_dir():
        return []
    return sorted(p.name for p in INVENTORY_ROOT.iterdir() if (p / "group_vars" / "all.yml").is_file())


def inventory_dir(name: str) -> Path:
    names = available_inventories()
    if name not in names:
        raise SettingsError(f"unknown inventory {name!r}: allowed are {', '.join(names) or '(none found)'} "
                            f"(folders under {INVENTORY_ROOT} with group_vars/all.yml)")
    return INVENTORY_ROOT / name


def load_settings(name: str = DEFAULT_INVENTORY) -> Settings:
    """Read and validate the inventory `name`; raise SettingsError listing every problem."""
    folder = inventory_dir(name)
    raw = _read_yaml(folder / "group_vars" / "all.yml")
    hosts = _read_yaml(folder / "hosts.yml") if (folder / "hosts.yml").is_file() else {}
    appliance_host = (((hosts.get("all") or {}).get("hosts") or {}).get("appliance")) or {}
    raw = _deep_merge(raw, {k: v for k, v in appliance_host.items() if not k.startswith("ansible_")})
    return settings_from_mapping(raw, inventory=name, folder=folder)


def settings_from_mapping(raw: dict[str, Any], inventory: str = "test", folder: Path | None = None) -> Settings:
    """Validate an already-loaded mapping (also the entry point for tests of bad inventories)."""
    v = _Validator(raw)
    name = v.get("appliance.name", _check_name)
    cloud = v.get("appliance.cloud", _one_of(CLOUDS))
    mysql_version = v.get("appliance.mysql_version", _check_mysql_version)
    vm = VmSettings(
        cpus=v.get("vm.cpus", _int_range(MIN_CPUS, 128, "the seed requires at least 8 cores")),
        memory_mb=v.get("vm.memory_mb", _int_range(MIN_MEMORY_MB, 4 * 1024 * 1024, "the seed requires 16 GB (16384 MB)")),
        nic=v.get("vm.nic", _one_of(NIC_TYPES)),
        disks=DiskSizes(
            os_gb=v.get("vm.disks.os_gb", _int_range(MIN_OS_GB, MAX_DISK_GB, "room for Windows and the appliance")),
            cache_gb=v.get("vm.disks.cache_gb", _int_range(MIN_CACHE_GB, MAX_DISK_GB, "the seed requires 600 GB of cache")),
            retention_gb=v.get("vm.disks.retention_gb",
                               _int_range(MIN_RETENTION_GB, MAX_DISK_GB, "the seed requires 600 GB of retention")),
        ),
    )
    ip = v.get("network.ip", check_ipv4)
    prefix = v.get("network.prefix", _int_range(1, 32, "an IPv4 prefix length"))
    gateway = v.get("network.gateway", check_ipv4)
    network = NetworkSettings(
        ovf_network=v.get("network.ovf_network", _check_text),
        hostname=v.get("network.hostname", check_hostname),
        ip=ip,
        prefix=prefix,
        gateway=gateway,
        dns=tuple(v.get("network.dns", check_dns_list) or ()),
    )
    if isinstance(ip, str) and isinstance(gateway, str) and isinstance(prefix, int) and not v.failed("network"):
        net = ipaddress.IPv4Network(f"{ip}/{prefix}", strict=False)
        if ipaddress.IPv4Address(gateway) not in net:
            v.error("network.gateway", gateway, f"must be inside the appliance's network {net}")
    ports = Ports(
        control=v.get("ports.control", _exactly(443, "the seed fixes the control channel on HTTPS 443")),
        data=v.get("ports.data", _int_range(1024, 65535, "a free TCP port; 9443 by default")),
    )
    windows = WindowsSettings(
        locale=v.get("windows.locale", _exactly("en-US", "the seed requires the en-US locale")),
        timezone=v.get("windows.timezone", _check_text),
        admin_user=v.get("windows.admin_user", _check_account),
        image_name=v.get("windows.image_name", _check_text),
    )
    target = v.get("builder.target", _one_of(BUILDER_TARGETS))
    builder = BuilderSettings(
        target=target,
        iso_url=v.get("builder.iso_url", _check_url),
        iso_checksum=v.get("builder.iso_checksum", _check_checksum),
        iso_size=v.get("builder.iso_size", _int_range(1, 2**40, "the ISO's size in bytes")),
        qemu=v.get("builder.qemu", _check_mapping, required=target == "qemu") or {},
        vsphere=v.get("builder.vsphere", _check_mapping, required=target == "vsphere") or {},
    )
    if target == "qemu":
        v.get("builder.qemu.accelerator", _one_of(("kvm", "tcg")))
        v.get("builder.qemu.headless", _check_bool)
        v.get("builder.qemu.vmware_tools_iso", _check_text)
    if target == "vsphere":
        v.get("builder.vsphere.vcenter", _check_host)
        for key in ("username", "datacenter", "datastore", "network", "iso_datastore_path", "tools_iso_datastore_path"):
            v.get(f"builder.vsphere.{key}", _check_text)
        v.get("builder.vsphere.cluster", _check_text)
        v.get("builder.vsphere.folder", _check_text_or_empty)
        v.get("builder.vsphere.insecure", _check_bool)
    deploy = v.get("deploy", _check_mapping, required=False) or {}
    if deploy:
        provisioning = deploy.get("disk_provisioning", "thin")
        if provisioning not in DISK_PROVISIONING:
            v.error("deploy.disk_provisioning", provisioning, f"allowed are {', '.join(DISK_PROVISIONING)}")
    v.raise_if_failed(inventory)
    return Settings(
        inventory=inventory,
        inventory_dir=folder or INVENTORY_ROOT / inventory,
        name=name,
        version=APPLIANCE_VERSION,
        cloud=cloud,
        mysql_version=mysql_version,
        vm=vm,
        network=network,
        ports=ports,
        windows=windows,
        builder=builder,
        deploy=dict(deploy),
        raw=raw,
    )


# --- validation helpers -------------------------------------------------------------------

Check = Callable[[Any], str | None]  # returns None when fine, else what is allowed


class _Validator:
    def __init__(self, raw: dict[str, Any]) -> None:
        if not isinstance(raw, dict):
            raise SettingsError("the inventory's group_vars/all.yml must be a mapping of settings")
        self.raw = raw
        self.problems: list[str] = []
        self._failed: set[str] = set()

    def get(self, path: str, check: Check, required: bool = True) -> Any:
        node: Any = self.raw
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                if required:
                    self.error(path, None, "is missing")
                return None
            node = node[part]
        problem = check(node)
        if problem:
            self.error(path, node, problem)
            return None
        return node

    def error(self, path: str, value: Any, problem: str) -> None:
        self._failed.add(path.split(".")[0])
        shown = "" if value is None else f" = {value!r}"
        self.problems.append(f"{path}{shown}: {problem}")

    def failed(self, section: str) -> bool:
        return section in self._failed

    def raise_if_failed(self, inventory: str) -> None:
        if self.problems:
            lines = "\n  ".join(self.problems)
            raise SettingsError(f"inventory {inventory!r} has {len(self.problems)} invalid setting(s):\n  {lines}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_range(low: int, high: int, why: str) -> Check:
    def check(value: Any) -> str | None:
        if not _is_int(value) or not low <= value <= high:
            return f"must be a whole number from {low} to {high} ({why})"
        return None
    return check


def _exactly(expected: Any, why: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value == expected and type(value) is type(expected) else f"must be {expected!r} ({why})"
    return check


def _one_of(allowed: tuple[str, ...]) -> Check:
    def check(value: Any) -> str | None:
        return None if value in allowed else f"allowed are {', '.join(allowed)}"
    return check


def _check_text(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return "must be a non-empty string"
    if any(ord(c) < 32 for c in value):
        return "must not contain control characters or line breaks"
    return None


def _check_text_or_empty(value: Any) -> str | None:
    return None if value == "" else _check_text(value)


def _check_bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def _check_mapping(value: Any) -> str | None:
    return None if isinstance(value, dict) else "must be a mapping of settings"


def _check_name(value: Any) -> str | None:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        return "must be 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit (it names files)"
    return None


def check_hostname(value: Any) -> str | None:
    if not isinstance(value, str) or not _HOSTNAME_RE.match(value) or value.isdigit():
        return "must be 1-15 letters, digits or '-', not all digits, not starting or ending with '-' (Windows limit)"
    return None


def _check_account(value: Any) -> str | None:
    if not isinstance(value, str) or not re.match(r"^[A-Za-z0-9._-]{1,20}$", value):
        return "must be 1-20 letters, digits, '.', '_' or '-' (a local Windows account name)"
    return None


def check_ipv4(value: Any) -> str | None:
    try:
        address = ipaddress.IPv4Address(value if isinstance(value, str) else "x")
    except ValueError:
        return "must be an IPv4 address such as 10.0.0.5"
    if address.is_loopback or address.is_multicast or address.is_unspecified:
        return "must be a unicast IPv4 address (not loopback, multicast or 0.0.0.0)"
    return None


def check_dns_list(value: Any) -> str | None:
    if not isinstance(value, list) or not value:
        return "must be a list of 1-3 IPv4 addresses"
    if len(value) > 3:
        return "must list at most 3 DNS servers"
    for item in value:
        if check_ipv4(item):
            return f"{item!r} is not an IPv4 address; must be a list of IPv4 addresses"
    return None


def _check_host(value: Any) -> str | None:
    if not isinstance(value, str) or not re.match(r"^[A-Za-z0-9.-]{1,253}$", value):
        return "must be a host name or IP address"
    return None


def _check_url(value: Any) -> str | None:
    if not isinstance(value, str) or not re.match(r"^(https?|file)://\S+$", value):
        return "must be an http(s):// or file:// URL"
    return None


def _check_checksum(value: Any) -> str | None:
    return None if isinstance(value, str) and _SHA256_RE.match(value) else "must be 'sha256:' and 64 lowercase hex digits"


def _check_mysql_version(value: Any) -> str | None:
    if not isinstance(value, str) or not re.match(r"^(5\.7|8\.0|8\.4)\.\d+$", value):
        return "must be a MySQL version string such as '8.0.40' (5.7.x, 8.0.x or 8.4.x)"
    return None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path} is not valid YAML: {exc}") from None
    except OSError as exc:
        raise SettingsError(f"cannot read {path}: {exc.strerror}") from None
    return data or {}


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
