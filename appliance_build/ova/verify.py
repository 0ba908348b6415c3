"""verify-ova: check any OVA (or OVF folder) for structure, integrity, schema and the seed's needs.

Every check runs (one failure does not hide the others) and lands in a table; the deployer
runs the same checks before it contacts vCenter.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OvaError, VerificationError
from ..progress import byte_progress
from .descriptor import RT_ETHERNET, ParsedDescriptor, parse_descriptor
from .package import USTAR_MAGIC, OvaPackage, open_package
from .schema import schema_errors
from .vmdk import read_vmdk_info

MIN_CPUS = 8
MIN_MEMORY_MB = 16 * 1024
DISK_COUNT = 3
MIN_DATA_DISK_BYTES = 600 * 2**30
ALLOWED_GUESTS = ("windows9Server64Guest", "windows8Server64Guest")  # Windows Server 2016 / 2012 R2
_HASHES = {"SHA1": hashlib.sha1, "SHA256": hashlib.sha256, "SHA512": hashlib.sha512}


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class VerificationReport:
    path: Path
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name, ok, detail))

    def table(self) -> str:
        width = max([len(c.name) for c in self.checks] + [5])
        lines = [f"{'check':<{width}}  result  detail", f"{'-' * width}  ------  ------"]
        lines += [f"{c.name:<{width}}  {'pass' if c.ok else 'FAIL':<6}  {c.detail}" for c in self.checks]
        verdict = "all checks passed" if self.ok else f"{len(self.failures)} check(s) failed"
        return "\n".join([f"{self.path}:", *lines, verdict])

    def raise_for_failures(self) -> None:
        if not self.ok:
            names = "; ".join(f"{c.name} ({c.detail})" for c in self.failures)
            raise VerificationError(f"{self.path} failed {len(self.failures)} check(s): {names}")


def verify_package(path: str | Path, progress: bool | None = None) -> VerificationReport:
    """Run every check on the OVA or OVF folder at `path`."""
    report = VerificationReport(Path(path))
    try:
        with open_package(path) as package:
            _check_archive(package, report)
            descriptor = _check_descriptor(package, report)
            if descriptor is not None:
                _check_order(package, descriptor, report)
                _check_references(package, descriptor, report)
            _check_manifest(package, report, progress)
            if descriptor is not None:
                _check_disk_files(package, descriptor, report)
                check_requirements(descriptor, report)
    except OvaError as exc:
        report.add("package", False, str(exc))
    return report


def _check_archive(package: OvaPackage, report: VerificationReport) -> None:
    if not package.is_tar:
        report.add("archive", True, "OVF folder (not a tar): member order does not apply")
        return
    bad = [m.name for m in package.member_list
           if m.header_magic != USTAR_MAGIC or m.header_type not in (b"0", b"\0") or not m.is_regular]
    report.add("archive", not bad, "USTAR tar of regular files" if not bad
               else f"not plain USTAR members (GNU/pax headers or non-files): {', '.join(bad)}")


def _check_descriptor(package: OvaPackage, report: VerificationReport) -> ParsedDescriptor | None:
    try:
        descriptor = parse_descriptor(package.descriptor_text)
    except OvaError as exc:
        report.add("descriptor", False, str(exc))
        return None
    report.add("descriptor", True, f"{package.descriptor_name}: virtual system {descriptor.name!r}")
    errors = schema_errors(package.descriptor_text)
    report.add("schema", not errors, "valid against DMTF DSP8023 1.1.1" if not errors
               else "; ".join(errors))
    return descriptor


def _check_order(package: OvaPackage, descriptor: ParsedDescriptor, report: VerificationReport) -> None:
    if not package.is_tar:
        return
    expected = [package.descriptor_name]
    expected += [m for m in package.members if m.lower().endswith(".mf")]
    expected += [m for m in package.members if m.lower().endswith(".cert")]
    expected += [f.href for f in descriptor.files if f.href in package.members]
    expected += [m for m in package.members if m not in expected]
    ok = package.members == expected
    report.add("order", ok, ".ovf first, then .mf, then files in References order" if ok
               else f"members are {package.members}, expected {expected}")


def _check_references(package: OvaPackage, descriptor: ParsedDescriptor, report: VerificationReport) -> None:
    problems = []
    for ref in descriptor.files:
        if ref.href not in package.members:
            problems.append(f"{ref.href} is referenced but missing")
        elif ref.size is not None and ref.size != package.member_size(ref.href):
            problems.append(f"{ref.href} is {package.member_size(ref.href)} bytes, the descriptor says {ref.size}")
    known = {package.descriptor_name, package.manifest_name, *(f.href for f in descriptor.files)}
    extra = [m for m in package.members if m not in known and not m.lower().endswith(".cert")]
    if extra:
        problems.append(f"members not referenced by the descriptor: {', '.join(extra)}")
    report.add("references", not problems, f"{len(descriptor.files)} file(s) present with their declared sizes"
               if not problems else "; ".join(problems))


def _check_manifest(package: OvaPackage, report: VerificationReport, progress: bool | None) -> None:
    if package.manifest_name is None:
        report.add("manifest", False, "no .mf manifest: the files' integrity cannot be checked")
        return
    covered = [m for m in package.members if m != package.manifest_name and not m.lower().endswith(".cert")]
    missing = [m for m in covered if m not in package.manifest]
    unknown = [m for m in package.manifest if m not in package.members]
    mismatched = []
    total = sum(package.member_size(m) for m in covered if m in package.manifest)
    bar = byte_progress(total, "checking digests", progress)
    try:
        for name in covered:
            if name not in package.manifest:
                continue
            digest = _HASHES[package.manifest_algorithms[name]]()
            with package.open_member(name) as fh:
                while chunk := fh.read(1024 * 1024):
                    digest.update(chunk)
                    bar.update(len(chunk))
            if digest.hexdigest() != package.manifest[name]:
                mismatched.append(name)
    finally:
        bar.close()
    problems = []
    if mismatched:
        problems.append(f"digest mismatch (file changed or corrupt): {', '.join(mismatched)}")
    if missing:
        problems.append(f"not listed in the manifest: {', '.join(missing)}")
    if unknown:
        problems.append(f"listed but absent: {', '.join(unknown)}")
    report.add("manifest", not problems, f"{len(covered)} digest(s) match" if not problems else "; ".join(problems))


def _check_disk_files(package: OvaPackage, descriptor: ParsedDescriptor, report: VerificationReport) -> None:
    hrefs = {f.file_id: f.href for f in descriptor.files}
    problems = []
    for disk in descriptor.disks:
        href = hrefs.get(disk.file_ref or "")
        if href is None or href not in package.members:
            problems.append(f"disk {disk.disk_id} has no file in the package")
            continue
        try:
            with package.open_member(href) as fh:
                info = read_vmdk_info(fh, href)
        except OvaError as exc:
            problems.append(str(exc))
            continue
        if not info.stream_optimized:
            problems.append(f"{href} is {info.create_type}, not streamOptimized")
        if info.capacity_bytes > disk.capacity_bytes:
            problems.append(f"{href} holds {info.capacity_bytes} bytes, more than its declared capacity "
                            f"{disk.capacity_bytes}")
    report.add("disk files", not problems, "streamOptimized VMDKs within their declared capacities"
               if not problems else "; ".join(problems))


def check_requirements(descriptor: ParsedDescriptor, report: VerificationReport) -> None:
    cpus, memory = descriptor.cpus, descriptor.memory_mb
    report.add("cpu", cpus >= MIN_CPUS, f"{cpus} vCPU (needs >= {MIN_CPUS})")
    report.add("memory", memory >= MIN_MEMORY_MB, f"{memory} MB (needs >= {MIN_MEMORY_MB} MB)")
    disks = descriptor.ordered_disks()
    report.add("disk count", len(disks) == DISK_COUNT,
               f"{len(disks)} disk(s) (needs {DISK_COUNT}: OS, process server cache, retention)")
    for index, role in ((1, "cache disk"), (2, "retention disk")):
        if index < len(disks):
            size = disks[index].capacity_bytes
            report.add(role, size >= MIN_DATA_DISK_BYTES, f"{size / 2**30:.0f} GB (needs >= 600 GB)")
        else:
            report.add(role, False, "missing")
    nics = descriptor.items_of(RT_ETHERNET)
    kinds = [n.values.get("ResourceSubType", "?") for n in nics]
    ok = bool(nics) and all(k.lower() == "vmxnet3" for k in kinds)
    report.add("nic", ok, f"{', '.join(kinds) or 'no NIC'} (needs VMXNET3)")
    guest = descriptor.guest_type or "none"
    report.add("guest type", guest in ALLOWED_GUESTS,
               f"{guest} (needs Windows Server 2016 or 2012 R2: {' or '.join(ALLOWED_GUESTS)})")
