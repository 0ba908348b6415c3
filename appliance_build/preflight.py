"""Fail fast: everything `build-ova` needs is checked before Packer starts, all at once."""
from __future__ import annotations

import os
import shutil
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import PreflightError
from .packer import detect_packer_version
from .settings import Settings
from .toolenv import tool_env

MIN_FREE_BUILD_BYTES = 60 * 2**30  # OS disk image + its streamOptimized copy + the OVA
NETWORK_TIMEOUT = 10.0
ISO_TOOLS = ("xorriso", "mkisofs", "genisoimage")  # Packer's cd_files needs one of these


@dataclass(frozen=True)
class BuildInputs:
    iso_url: str
    packer_version: tuple[int, int, int]


def preflight(settings: Settings, iso: str | None, build_root: Path) -> BuildInputs:
    """Check tools, ISO, hypervisor or vCenter and disk space; PreflightError lists every problem."""
    problems: list[str] = []
    version = detect_packer_version()
    if version is None:
        problems.append("packer is not on PATH (Debian: apt-get install packer)")
    if shutil.which("ansible-playbook", path=tool_env()["PATH"]) is None:
        problems.append("ansible-playbook is not on PATH (run inside the project's venv: ./bootstrap.sh invoke ...)")
    if settings.builder.target == "qemu":
        problems += _qemu_problems(settings)
    else:
        problems += _vsphere_problems(settings)
    iso_url, iso_problem = _iso_source(settings, iso)
    if iso_problem:
        problems.append(iso_problem)
    problems += _space_problems(build_root)
    if problems:
        listed = "\n  - ".join(problems)
        raise PreflightError(f"build-ova cannot start ({settings.builder.target} build):\n  - {listed}")
    assert version is not None
    return BuildInputs(iso_url=iso_url, packer_version=version)


def _qemu_problems(settings: Settings) -> list[str]:
    problems = []
    qemu = settings.builder.qemu
    if qemu.get("accelerator") == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        problems.append("/dev/kvm is missing or not writable: enable KVM, or set builder.qemu.accelerator: tcg "
                        "(very slow)")
    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ("qemu-img", "qemu-utils")):
        if shutil.which(tool) is None:
            problems.append(f"{tool} is not on PATH (Debian: apt-get install {package})")
    if not any(shutil.which(t) for t in ISO_TOOLS):
        problems.append("none of xorriso, mkisofs, genisoimage is on PATH: Packer needs one to attach the "
                        "VMware Tools CD (Debian: apt-get install xorriso)")
    tools_iso = Path(str(qemu.get("vmware_tools_iso", "")))
    if not tools_iso.is_file():
        problems.append(f"VMware Tools ISO not found at {tools_iso} (builder.qemu.vmware_tools_iso): its PVSCSI "
                        f"and VMXNET3 drivers make the KVM-built image boot on ESXi; copy windows.iso from a VMware "
                        f"Tools release there")
    return problems


def _vsphere_problems(settings: Settings) -> list[str]:
    vsphere = settings.builder.vsphere
    host = str(vsphere.get("vcenter", ""))
    try:
        with socket.create_connection((host, 443), timeout=NETWORK_TIMEOUT):
            return []
    except OSError as exc:
        return [f"vCenter {host}:443 (builder.vsphere.vcenter) is unreachable: {exc}"]


def _iso_source(settings: Settings, iso: str | None) -> tuple[str, str | None]:
    if iso:
        path = Path(iso).expanduser()
        if not path.is_file():
            return "", f"--iso {iso}: no such file"
        size = path.stat().st_size
        if size != settings.builder.iso_size:
            return "", (f"--iso {iso} is {size} bytes but the pinned ISO is {settings.builder.iso_size} bytes: use "
                        f"the Windows Server 2016 evaluation ISO, or set builder.iso_checksum and iso_size for yours")
        return path.resolve().as_uri(), None
    url = settings.builder.iso_url
    if settings.builder.target == "vsphere":
        return url, None  # vsphere-iso boots from iso_datastore_path; the URL is not fetched
    try:
        request = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(request, timeout=NETWORK_TIMEOUT) as response:
            length = int(response.headers.get("Content-Length") or 0)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return url, (f"the pinned Windows Server 2016 ISO is unreachable ({reason}) at {url}: download it where you "
                     f"can and pass --iso PATH")
    if length and length != settings.builder.iso_size:
        return url, f"{url} serves {length} bytes, not the pinned {settings.builder.iso_size}: pass --iso PATH"
    return url, None


def _space_problems(build_root: Path) -> list[str]:
    build_root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(build_root).free
    if free < MIN_FREE_BUILD_BYTES:
        return [f"only {free / 2**30:.0f} GB free under {build_root}; the build needs "
                f"{MIN_FREE_BUILD_BYTES / 2**30:.0f} GB"]
    return []
