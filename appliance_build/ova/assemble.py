"""Assemble the appliance OVA from three VMDKs and the inventory's settings."""
from __future__ import annotations

import math
from pathlib import Path

from ..errors import OvaError
from ..settings import Settings, load_settings
from ..version import REPO_ROOT
from .descriptor import DescriptorSpec, DiskSpec, PropertySpec, build_descriptor
from .vmdk import read_vmdk_info
from .writer import DiskFile, write_ova

DISK_ROLES = ("os", "cache", "retention")
GUEST_TYPE = "windows9Server64Guest"
PRODUCT = "Replication appliance"
DIST = REPO_ROOT / "dist"


def deploy_properties(settings: Settings) -> tuple[PropertySpec, ...]:
    """The ProductSection properties the deployer fills in and the first-boot step applies."""
    net = settings.network
    return (
        PropertySpec("hostname", "Host name", "Computer name of the appliance (15 characters at most)",
                     net.hostname, qualifiers="MinLen(1),MaxLen(15)"),
        PropertySpec("ip", "IP address", "Static IPv4 address of the appliance", net.ip),
        PropertySpec("prefix", "Prefix length", "IPv4 prefix length of the appliance's network", str(net.prefix),
                     type="uint8"),
        PropertySpec("gateway", "Default gateway", "IPv4 default gateway", net.gateway),
        PropertySpec("dns", "DNS servers", "Comma-separated IPv4 DNS servers", ",".join(net.dns)),
        PropertySpec("data_port", "Data port", "TCP port of the process server (replication data)",
                     str(settings.ports.data), type="uint16"),
        PropertySpec("admin_password", "Administrator password",
                     "New password of the local administrator, set at first boot (empty: keep the image's)",
                     "", password=True),
    )


def descriptor_spec(settings: Settings, disks: list[DiskFile]) -> DescriptorSpec:
    wanted_gb = disk_sizes_gb(settings)
    specs = []
    for role, disk in zip(DISK_ROLES, disks, strict=True):
        with disk.path.open("rb") as fh:
            info = read_vmdk_info(fh, str(disk.path))
        if not info.stream_optimized:
            raise OvaError(f"{disk.path} is a {info.create_type} VMDK; an OVA needs streamOptimized disks "
                           f"(qemu-img convert -O vmdk -o subformat=streamOptimized)")
        virtual_gb = math.ceil(info.capacity_bytes / 2**30)
        if virtual_gb > wanted_gb[role]:
            raise OvaError(f"{disk.path} has a virtual size of {virtual_gb} GB, more than vm.disks.{role}_gb = "
                           f"{wanted_gb[role]} in the inventory")
        specs.append(DiskSpec(role, disk.name, disk.path.stat().st_size, wanted_gb[role]))
    return appliance_spec(settings, tuple(specs))


def disk_sizes_gb(settings: Settings) -> dict[str, int]:
    sizes = settings.vm.disks
    return {"os": sizes.os_gb, "cache": sizes.cache_gb, "retention": sizes.retention_gb}


def planned_disks(settings: Settings) -> tuple[DiskSpec, ...]:
    """The disks as the inventory plans them, before any VMDK exists (file sizes unknown: 0)."""
    gb = disk_sizes_gb(settings)
    return tuple(DiskSpec(role, f"{settings.artifact_stem}-disk{n}.vmdk", 0, gb[role])
                 for n, role in enumerate(DISK_ROLES, 1))


def appliance_spec(settings: Settings, disks: tuple[DiskSpec, ...]) -> DescriptorSpec:
    return DescriptorSpec(
        name=settings.name,
        version=settings.version,
        product=PRODUCT,
        cpus=settings.vm.cpus,
        memory_mb=settings.vm.memory_mb,
        network=settings.network.ovf_network,
        guest_type=GUEST_TYPE,
        disks=disks,
        properties=deploy_properties(settings),
        annotation=(f"{PRODUCT} {settings.version}: configuration server on HTTPS {settings.ports.control}, "
                    f"process server on HTTPS {settings.ports.data}."),
    )


def assemble_ova(settings: Settings, disk_paths: list[Path], out: Path, progress: bool | None = None) -> Path:
    """Write the OVA `out` from the OS, cache and retention VMDKs (in that order)."""
    if len(disk_paths) != len(DISK_ROLES):
        raise OvaError(f"{len(disk_paths)} disk(s) given; the appliance needs exactly 3, in this order: "
                       f"{', '.join(DISK_ROLES)}")
    for path in disk_paths:
        if not Path(path).is_file():
            raise OvaError(f"disk {path} does not exist")
    stem = settings.artifact_stem
    disks = [DiskFile(f"{stem}-disk{n}.vmdk", Path(p)) for n, p in enumerate(disk_paths, 1)]
    descriptor = build_descriptor(descriptor_spec(settings, disks))
    if out.suffix.lower() != ".ova":
        raise OvaError(f"output {out} must end in .ova")
    return write_ova(out, f"{stem}.ovf", descriptor, f"{stem}.mf", disks, progress)


def assemble_from_inventory(inventory: str, disks: list[str], out: str | None = None) -> Path:
    settings = load_settings(inventory)
    target = Path(out) if out else DIST / f"{settings.artifact_stem}.ova"
    return assemble_ova(settings, [Path(d.strip()) for d in disks if d.strip()], target)
