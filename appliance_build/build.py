"""build-ova: preflight, render, Packer + Ansible, convert the disks, assemble and checksum the OVA.

Nothing appears in dist/ until the OVA is complete; the scratch folder of a build is removed
whether it succeeds, fails or is interrupted.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from .datastore_cleanup import CdUploads, delete_cd_images
from .deploy.connection import Credentials
from .deploy.options import TlsOptions, VcenterAddress
from .errors import BuildError, OvaError
from .ova.assemble import DIST, assemble_ova
from .packaging import archive, wheels
from .packer import PackerClient
from .preflight import preflight
from .render import BUILD_ROOT, private_answer_dir, write_rendered
from .secrets import ADMIN_PASSWORD, VSPHERE_PASSWORD, read_secret
from .settings import Settings, load_settings

WHEEL_DIR = BUILD_ROOT / "wheels"


def build_ova(inventory: str, iso: str | None = None, force: bool = False) -> Path:
    settings = load_settings(inventory)
    ova = DIST / f"{settings.artifact_stem}.ova"
    if ova.exists() and not force:
        raise BuildError(f"{ova} already exists: pass --force to build it again, or bump the version in "
                         f"appliance_src/pyproject.toml")
    inputs = preflight(settings, iso, BUILD_ROOT)
    secrets = {"admin_password": read_secret(ADMIN_PASSWORD)}
    if settings.builder.target == "vsphere":
        secrets["vsphere_password"] = read_secret(VSPHERE_PASSWORD)
    stage_wheels()
    folder = write_rendered(settings, inputs.packer_version)
    scratch = folder / "packer" / f"output-{os.getpid()}"
    try:
        # The playbook reads the WinRM password from the environment (see the Ansible vars).
        os.environ[ADMIN_PASSWORD.env] = secrets["admin_password"]
        with private_answer_dir(settings, inputs.packer_version, secrets["admin_password"]) as answer_dir:
            client = PackerClient(folder / "packer" / "appliance.pkr.hcl", secrets=secrets,
                                  variables={"answer_dir": str(answer_dir), "output_directory": str(scratch),
                                             "iso_url": inputs.iso_url})
            uploads = CdUploads()

            def on_line(line: str) -> None:
                _print_line(line)
                uploads.see(line)

            try:
                client.build(on_line=on_line)
            finally:
                if uploads.names:
                    delete_answer_cds(settings, secrets["vsphere_password"], uploads.names)
        disks = stream_optimized_disks(settings, scratch)
        assemble_ova(settings, disks, ova)
        write_sha256(ova)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return ova


def delete_answer_cds(settings: Settings, vsphere_password: str, names: list[str]) -> None:
    """Delete the answer-file CDs vsphere-iso uploaded; warn, naming each, about any left behind."""
    vsphere = settings.builder.vsphere
    left = delete_cd_images(VcenterAddress(str(vsphere["vcenter"])),
                            Credentials(str(vsphere["username"]), vsphere_password),
                            TlsOptions(insecure=bool(vsphere["insecure"])),
                            str(vsphere["datacenter"]), str(vsphere["datastore"]), names)
    for problem in left:
        sys.stderr.write(f"warning: the answer-file CD holds the administrator password and could not be "
                         f"deleted, delete it by hand: {problem}\n")


def stage_wheels() -> Path:
    """The appliance wheel and its Windows x64 dependency wheels (pinned by the bundle's lock),
    where the appliance_software role installs them from."""
    WHEEL_DIR.mkdir(parents=True, exist_ok=True)
    wheels.build_appliance_wheel(WHEEL_DIR, archive.source_date_epoch())
    for wheel in wheels.dependency_wheels("appliance", wheels.appliance_dependencies(), wheels.WINDOWS_X64):
        shutil.copyfile(wheel, WHEEL_DIR / wheel.name)
    return WHEEL_DIR


def stream_optimized_disks(settings: Settings, output: Path) -> list[Path]:
    """The three disks as streamOptimized VMDKs, OS first."""
    if settings.builder.target == "vsphere":
        disks = sorted(output.rglob("*.vmdk"))  # vsphere-iso's OVF export: already streamOptimized
    else:
        stem = f"{settings.artifact_stem}-disk1"
        images = [output / stem, output / f"{stem}-1", output / f"{stem}-2"]
        disks = [convert_to_stream_optimized(image, image.with_suffix(".vmdk")) for image in images]
    if len(disks) != 3:
        raise OvaError(f"the build produced {len(disks)} disk(s) in {output}, expected 3")
    return disks


def convert_to_stream_optimized(source: Path, target: Path) -> Path:
    if not source.is_file():
        raise OvaError(f"the build did not produce {source}")
    result = subprocess.run(["qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized",
                             str(source), str(target)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise OvaError(f"qemu-img could not convert {source}: {result.stderr.strip()}")
    return target


def write_sha256(path: Path) -> Path:
    """`<file>.sha256` in sha256sum's format, written atomically beside the file."""
    sidecar = path.with_name(path.name + ".sha256")
    tmp = sidecar.with_name(f".{sidecar.name}.tmp")
    tmp.write_text(f"{wheels.sha256_file(path)}  {path.name}\n")
    os.replace(tmp, sidecar)
    return sidecar


def _print_line(line: str) -> None:
    sys.stdout.write(line if line.endswith("\n") else line + "\n")
    sys.stdout.flush()

