"""OVA assembly from real streamOptimized VMDKs, and verify-ova on good and broken packages."""
from __future__ import annotations

import dataclasses
import filecmp
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from appliance_build.errors import OvaError, VerificationError
from appliance_build.ova.assemble import assemble_ova
from appliance_build.ova.descriptor import parse_descriptor
from appliance_build.ova.package import open_package
from appliance_build.ova.schema import SCHEMA_DIR, schema_errors
from appliance_build.ova.verify import verify_package
from appliance_build.ova.writer import DiskFile, write_ova
from appliance_build.settings import settings_from_mapping

from .conftest import disk_content, make_vmdk


@pytest.fixture(scope="module")
def ova(tmp_path_factory, vmdks, local_settings) -> Path:
    return assemble_ova(local_settings, vmdks, tmp_path_factory.mktemp("ova") / "appliance.ova", progress=False)


def failed_checks(path: Path) -> set[str]:
    return {c.name for c in verify_package(path, progress=False).failures}


def rewrite_tar(source: Path, target: Path, order=None, replace: dict[str, bytes] | None = None) -> Path:
    """Copy an OVA member by member (USTAR), optionally reordered or with members replaced."""
    with tarfile.open(source) as tar:
        members = {m.name: (m, tar.extractfile(m).read()) for m in tar.getmembers()}
    names = order or list(members)
    with tarfile.open(target, "w", format=tarfile.USTAR_FORMAT) as out:
        for name in names:
            info, data = members[name]
            data = (replace or {}).get(name, data)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    return target


def test_ova_layout_descriptor_first_then_manifest_then_disks(ova, local_settings):
    with tarfile.open(ova) as tar:
        names = tar.getnames()
    stem = local_settings.artifact_stem
    assert names == [f"{stem}.ovf", f"{stem}.mf", f"{stem}-disk1.vmdk", f"{stem}-disk2.vmdk", f"{stem}-disk3.vmdk"]
    raw = ova.read_bytes()
    assert raw[257:265] == b"ustar\x0000"  # POSIX USTAR, not GNU


def test_manifest_lists_the_sha256_of_every_file(ova):
    with tarfile.open(ova) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    manifest_name = next(n for n in members if n.endswith(".mf"))
    lines = members.pop(manifest_name).decode().splitlines()
    assert lines == [f"SHA256({n})= {hashlib.sha256(d).hexdigest()}" for n, d in members.items()]


def test_descriptor_is_schema_valid_and_carries_the_requirements(ova, ovf_schema_dir, tmp_path):
    with open_package(ova) as package:
        text = package.descriptor_text
    assert schema_errors(text) == []
    ovf = tmp_path / "appliance.ovf"
    ovf.write_bytes(text)
    # The same descriptor, checked by libxml2 with the OASIS catalog of the shared schema copy.
    result = subprocess.run(["xmllint", "--nonet", "--noout", "--schema", str(ovf_schema_dir / "dsp8023_1.1.1.xsd"),
                             str(ovf)], env={**os.environ, "XML_CATALOG_FILES": str(ovf_schema_dir / "catalog.xml")},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    parsed = parse_descriptor(text)
    assert (parsed.cpus, parsed.memory_mb) == (8, 16384)
    assert [d.capacity_bytes // 2**30 for d in parsed.ordered_disks()] == [127, 600, 600]
    assert [i.values["ResourceSubType"] for i in parsed.items_of(6)] == ["VirtualSCSI"]
    assert [i.values["ResourceSubType"] for i in parsed.items_of(10)] == ["VmxNet3"]
    assert parsed.guest_type == "windows9Server64Guest"
    assert parsed.transport == "com.vmware.guestInfo"
    props = {p.key: p for p in parsed.properties}
    assert {"appliance.ip", "appliance.prefix", "appliance.gateway", "appliance.dns", "appliance.hostname"} <= set(props)
    assert all(p.user_configurable for p in props.values())
    assert props["appliance.admin_password"].password and not props["appliance.ip"].password


def test_verify_passes_on_an_assembled_ova(ova):
    report = verify_package(ova, progress=False)
    assert report.ok, report.table()
    assert {"order", "manifest", "schema", "cpu", "memory", "disk count", "cache disk", "retention disk", "nic",
            "guest type"} <= {c.name for c in report.checks}


def test_verify_names_a_tampered_disk(ova, tmp_path):
    with tarfile.open(ova) as tar:
        disk = next(n for n in tar.getnames() if n.endswith("disk2.vmdk"))
        data = bytearray(tar.extractfile(disk).read())
    data[-4096] ^= 0xFF  # one flipped byte inside the compressed grains
    bad = rewrite_tar(ova, tmp_path / "tampered.ova", replace={disk: bytes(data)})
    assert failed_checks(bad) == {"manifest"}
    with pytest.raises(VerificationError, match=r"manifest \(digest mismatch .*disk2\.vmdk"):
        verify_package(bad, progress=False).raise_for_failures()


def test_verify_names_a_wrong_member_order(ova, tmp_path):
    with tarfile.open(ova) as tar:
        names = tar.getnames()
    bad = rewrite_tar(ova, tmp_path / "reordered.ova", order=[names[1], names[0], *names[2:]])
    assert failed_checks(bad) == {"order"}


def test_verify_names_a_two_vcpu_descriptor(ova, tmp_path, local_settings, vmdks):
    raw = dict(local_settings.raw)
    settings = settings_from_mapping(raw)
    two_cpus = dataclasses.replace(settings, vm=dataclasses.replace(settings.vm, cpus=2))
    bad = assemble_ova(two_cpus, vmdks, tmp_path / "small.ova", progress=False)
    assert failed_checks(bad) == {"cpu"}
    report = verify_package(bad, progress=False)
    assert "2 vCPU (needs >= 8)" in report.table()


def test_verify_reports_a_gnu_tar_and_a_missing_manifest(ova, tmp_path):
    with tarfile.open(ova) as tar:
        names = [n for n in tar.getnames() if not n.endswith(".mf")]
        folder = tmp_path / "members"
        tar.extractall(folder, filter="data")
    gnu = tmp_path / "gnu.ova"
    with tarfile.open(gnu, "w", format=tarfile.GNU_FORMAT) as out:
        for name in names:
            out.add(folder / name, arcname=name)
    assert {"archive", "manifest"} <= failed_checks(gnu)


def test_verify_accepts_an_ovf_folder(ova, tmp_path):
    folder = tmp_path / "unpacked"
    with tarfile.open(ova) as tar:
        tar.extractall(folder, filter="data")
    assert verify_package(folder, progress=False).ok


def test_verify_on_garbage_names_the_problem(tmp_path):
    junk = tmp_path / "junk.ova"
    junk.write_bytes(os.urandom(4096))
    report = verify_package(junk, progress=False)
    assert not report.ok
    assert report.failures[0].name == "package" and "not a tar archive" in report.failures[0].detail


def test_assembly_is_reproducible(ova, vmdks, local_settings, tmp_path):
    again = assemble_ova(local_settings, vmdks, tmp_path / "again.ova", progress=False)
    assert filecmp.cmp(ova, again, shallow=False)


def test_assembly_refuses_bad_disks(local_settings, vmdks, tmp_path):
    with pytest.raises(OvaError, match="needs exactly 3"):
        assemble_ova(local_settings, vmdks[:2], tmp_path / "x.ova")
    raw = tmp_path / "flat.img"
    raw.write_bytes(disk_content(9, 1024 * 1024))
    with pytest.raises(OvaError, match="not a sparse VMDK"):
        assemble_ova(local_settings, [raw, *vmdks[1:]], tmp_path / "x.ova")
    big = make_vmdk(tmp_path, "big", b"x" * 512, virtual_size="200G")
    with pytest.raises(OvaError, match=r"virtual size of 200 GB, more than vm\.disks\.os_gb = 127"):
        assemble_ova(local_settings, [big, *vmdks[1:]], tmp_path / "x.ova")
    assert not list(tmp_path.glob("*.ova")) and not list(tmp_path.glob(".*partial*"))


def test_a_failed_write_leaves_nothing_behind(tmp_path, vmdks):
    out = tmp_path / "dist" / "broken.ova"
    missing = tmp_path / "vanished"
    missing.mkdir()  # a folder where a disk should be: the copy fails after the header is written
    with pytest.raises((OvaError, OSError)):
        write_ova(out, "a.ovf", b"<x/>", "a.mf", [DiskFile("d1.vmdk", vmdks[0]), DiskFile("d2.vmdk", missing)])
    assert list(out.parent.iterdir()) == []


def test_vendored_schema_is_the_shared_copy(ovf_schema_dir):
    for xsd in ovf_schema_dir.glob("*.xsd"):
        assert filecmp.cmp(xsd, SCHEMA_DIR / xsd.name, shallow=False), f"{xsd.name} differs from shared/ovf-schema"


def test_invoke_assemble_and_verify_as_a_user_runs_them(tmp_path, vmdks, repo_root):
    out = tmp_path / "cli.ova"
    invoke = shutil.which("invoke")
    assert invoke, "invoke is not on PATH"
    made = subprocess.run([invoke, "assemble-ova", "--disks", ",".join(map(str, vmdks)), "--out", str(out)],
                          cwd=repo_root, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    ok = subprocess.run([invoke, "verify-ova", str(out)], cwd=repo_root, capture_output=True, text=True)
    assert ok.returncode == 0 and "all checks passed" in ok.stdout
    broken = tmp_path / "broken.ova"
    broken.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    bad = subprocess.run([invoke, "verify-ova", str(broken)], cwd=repo_root, capture_output=True, text=True)
    assert bad.returncode == 1
    assert "FAIL" in bad.stdout and "error:" in bad.stderr
    assert "Traceback" not in bad.stderr
