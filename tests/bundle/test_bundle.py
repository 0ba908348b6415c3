"""The physical-server bundle and the agent packages: contents, manifest digests, wheel
platform tags, reproducibility (two builds, same bytes), one source of truth for the setup
scripts, the pinned Python runtime."""
from __future__ import annotations

import hashlib
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
from replication_appliance.requirements import requirement_rows

from appliance_build.errors import PreflightError
from appliance_build.packaging import wheels
from appliance_build.packaging.agent_packages import AGENT_DEPENDENCIES, package_paths
from appliance_build.packaging.bundle import (
    PYTHON_RUNTIME,
    build_bundle,
    bundle_path,
    check_python_runtime,
)
from appliance_build.packaging.manifest import wheel_record
from appliance_build.version import APPLIANCE_VERSION, REPO_ROOT

TOP = f"replication-appliance-installer-{APPLIANCE_VERSION}"
WINDOWS_TAGS = {"win_amd64", "any"}
LINUX_TAG_PREFIXES = ("manylinux", "linux_x86_64", "any")


def zip_files(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def tar_files(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_bundle_is_named_by_the_one_version_and_listed_in_sha256sums(dist: Path):
    bundle = bundle_path(dist)
    assert bundle.name == f"replication-appliance-installer-{APPLIANCE_VERSION}.zip"
    sums = dict(reversed(line.split("  ")) for line in (dist / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == {bundle.name, *(p.name for p in package_paths(dist))}
    for name, digest in sums.items():
        assert sha256((dist / name).read_bytes()) == digest


def test_bundle_contents(dist: Path):
    files = zip_files(bundle_path(dist))
    assert all(name.startswith(TOP + "/") for name in files)
    names = {name[len(TOP) + 1:] for name in files}
    for expected in ("Install-ReplicationAppliance.ps1", "Test-AppliancePrerequisites.ps1", "Install-PythonRuntime.ps1",
                     "README.md", "manifest.json", "prerequisites.json",
                     f"agent-packages/mobility-agent-{APPLIANCE_VERSION}-linux.tar.gz",
                     f"agent-packages/mobility-agent-{APPLIANCE_VERSION}-windows.zip"):
        assert expected in names, expected
    assert f"wheels/replication_appliance-{APPLIANCE_VERSION}-py3-none-any.whl" in names
    # Every dependency of the appliance has its wheel: an offline install needs nothing else.
    shipped = {wheels.canonical_name(wheel_record(n.split("/")[-1])["name"]) for n in names if n.endswith(".whl")}
    for requirement in wheels.appliance_dependencies():
        name = wheels.canonical_name(requirement.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip())
        assert name in shipped, f"no wheel for {requirement}"
    prereqs = json.loads(files[f"{TOP}/prerequisites.json"])
    assert prereqs["rows"] == requirement_rows()
    assert prereqs["thresholds"]["min_cpus"] == 8 and prereqs["thresholds"]["min_memory_mb"] == 16384
    assert prereqs["ports"] == {"control": 443, "data": 9443}


def test_setup_scripts_are_the_roles_files_byte_for_byte(dist: Path):
    """One source of truth: the bundle carries the roles' PowerShell, not copies of its own."""
    files = zip_files(bundle_path(dist))
    role_scripts = sorted(REPO_ROOT.glob("roles/*/files/*.ps1"))
    assert role_scripts, "no roles/*/files/*.ps1 found"
    bundled = {n.split("/")[-1]: data for n, data in files.items() if "/setup/" in n}
    assert set(bundled) == {p.name for p in role_scripts}
    for script in role_scripts:
        assert bundled[script.name] == script.read_bytes(), script
    # And the installer sources keep no second copy of any of them.
    installer_names = {p.name for p in (REPO_ROOT / "installer").rglob("*.ps1")}
    assert not installer_names & set(bundled)


def test_manifest_lists_every_file_with_its_digest(dist: Path):
    files = zip_files(bundle_path(dist))
    manifest = json.loads(files[f"{TOP}/manifest.json"])
    assert manifest["version"] == APPLIANCE_VERSION and manifest["product"] == "replication-appliance"
    listed = manifest["files"]
    actual = {n[len(TOP) + 1:]: data for n, data in files.items() if not n.endswith("/manifest.json")}
    assert set(listed) == set(actual)
    for name, data in actual.items():
        assert listed[name] == {"sha256": sha256(data), "size": len(data)}, name
    assert manifest["python_runtime"]["sha256"] == PYTHON_RUNTIME.sha256
    assert manifest["python_runtime"]["url"].startswith("https://www.python.org/ftp/python/3.11.9/")
    assert {w["file"] for w in manifest["wheels"]} == {n.split("/")[-1] for n in actual if n.startswith("wheels/")}


def test_wheel_platform_tags(dist: Path):
    bundle = zip_files(bundle_path(dist))
    for name in (n for n in bundle if n.endswith(".whl")):
        tags = wheel_record(name.split("/")[-1])
        assert tags["platform"] in WINDOWS_TAGS, name
        assert tags["python"] in ("py3", "py2.py3") or tags["python"].startswith("cp3"), name
        if tags["abi"] not in ("none", "abi3"):
            assert tags["abi"] == "cp311", name
    linux, windows = package_paths(dist)
    linux_files, windows_files = tar_files(linux), zip_files(windows)
    for name in (n for n in linux_files if n.endswith(".whl")):
        platforms = wheel_record(name.split("/")[-1])["platform"].split(".")
        assert all(p.startswith(LINUX_TAG_PREFIXES) and (p == "any" or p.endswith("x86_64")) for p in platforms), name
    for name in (n for n in windows_files if n.endswith(".whl")):
        assert wheel_record(name.split("/")[-1])["platform"] in WINDOWS_TAGS, name


def test_agent_packages_contents(dist: Path):
    linux, windows = package_paths(dist)
    top = f"mobility-agent-{APPLIANCE_VERSION}-linux"
    with tarfile.open(linux) as tf:
        members = {m.name: m for m in tf.getmembers()}
    assert members[f"{top}/install.sh"].mode == 0o755
    assert members[f"{top}/mobility-agent.service"].mode == 0o644
    assert {m.uid for m in members.values()} == {0} and len({m.mtime for m in members.values()}) == 1
    unit = tar_files(linux)[f"{top}/mobility-agent.service"].decode()
    assert "User=root" in unit and "@PREFIX@/opt/mobility-agent/current/bin/mobility-agent run" in unit
    names = {wheels.canonical_name(n.split("/")[-1].split("-")[0]) for n in members if n.endswith(".whl")}
    assert {wheels.canonical_name(d) for d in AGENT_DEPENDENCIES} | {"replication-appliance"} <= names
    assert "pip" not in names  # install_wheels.py installs them
    assert "fastapi" not in names  # the agent does not carry the appliance's server stack
    win = zip_files(windows)
    wtop = f"mobility-agent-{APPLIANCE_VERSION}-windows"
    for expected in ("Install-MobilityAgent.ps1", "mobility_agent_service.py", "Install-PythonRuntime.ps1", "manifest.json"):
        assert f"{wtop}/{expected}" in win
    assert any("/wheels/pywin32-" in n for n in win)
    manifest = json.loads(win[f"{wtop}/manifest.json"])
    assert manifest["product"] == "mobility-agent" and manifest["version"] == APPLIANCE_VERSION


def test_two_builds_give_the_same_bytes(dist: Path, dist_again: Path):
    for artifact in (bundle_path(dist), *package_paths(dist)):
        again = dist_again / artifact.name
        assert artifact.read_bytes() == again.read_bytes(), f"{artifact.name} differs between two builds"
    with zipfile.ZipFile(bundle_path(dist)) as zf:
        infos = zf.infolist()
    assert len({i.date_time for i in infos}) == 1
    assert [i.filename for i in infos] == sorted(i.filename for i in infos)


def test_a_version_override_names_every_artifact(tmp_path: Path, wheel_cache: Path):
    out = build_bundle(tmp_path, cache_dir=wheel_cache, version="9.8.7")
    assert out.name == "replication-appliance-installer-9.8.7.zip"
    files = zip_files(out)
    assert "replication-appliance-installer-9.8.7/wheels/replication_appliance-9.8.7-py3-none-any.whl" in files
    assert "replication-appliance-installer-9.8.7/agent-packages/mobility-agent-9.8.7-linux.tar.gz" in files
    assert json.loads(files["replication-appliance-installer-9.8.7/manifest.json"])["version"] == "9.8.7"


def test_a_wrong_python_runtime_is_refused(tmp_path: Path):
    impostor = tmp_path / PYTHON_RUNTIME.file
    impostor.write_bytes(b"MZ not really python")
    with pytest.raises(PreflightError, match="SHA-256 is .* the pinned one is 5ee42c4e"):
        check_python_runtime(impostor)
    with pytest.raises(PreflightError, match="does not exist"):
        check_python_runtime(tmp_path / "missing.exe")


def test_the_lock_pins_every_dependency_by_hash(wheel_cache: Path):
    """A lock whose fingerprint matches is used as is: every wheel checked against its SHA-256."""
    lock = json.loads((wheels.LOCK_DIR / "appliance-win_amd64-cp311.json").read_text())
    assert lock["requirements"] == sorted(wheels.appliance_dependencies())
    assert all(len(w["sha256"]) == 64 for w in lock["wheels"])
    paths = wheels.dependency_wheels("appliance", wheels.appliance_dependencies(), wheels.WINDOWS_X64, wheel_cache)
    tampered = paths[0]
    original = tampered.read_bytes()
    tampered.write_bytes(original + b"x")
    try:
        again = wheels.dependency_wheels("appliance", wheels.appliance_dependencies(), wheels.WINDOWS_X64, wheel_cache)
        assert again[0].read_bytes() == original  # the damaged cached wheel was fetched again
    finally:
        tampered.write_bytes(original)


def test_the_bundle_carries_the_same_agent_packages_as_invoke_agent_packages(dist: Path):
    files = zip_files(bundle_path(dist))
    for package in package_paths(dist):
        assert files[f"{TOP}/agent-packages/{package.name}"] == package.read_bytes()
