"""build-ova fails fast, before Packer, with every missing input named; dist/ stays clean."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from appliance_build import build, preflight
from appliance_build.errors import BuildError, PreflightError, SecretError
from appliance_build.secrets import ADMIN_PASSWORD, read_secret
from appliance_build.settings import load_settings


@pytest.fixture
def dist(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "dist"
    monkeypatch.setattr(build, "DIST", folder)
    monkeypatch.setattr(build, "BUILD_ROOT", tmp_path / "build")
    return folder


def test_missing_iso_and_tools_are_all_named_before_anything_runs(dist, tmp_path, monkeypatch):
    monkeypatch.setenv("APPLIANCE_ADMIN_PASSWORD", "not-used-here")
    with pytest.raises(PreflightError) as caught:
        build.build_ova("local", iso=str(tmp_path / "missing.iso"))
    message = str(caught.value)
    assert "--iso" in message and "no such file" in message
    assert "VMware Tools ISO not found" in message
    assert not dist.exists() or not any(dist.iterdir())


def test_an_iso_of_the_wrong_size_is_refused(tmp_path):
    iso = tmp_path / "other.iso"
    iso.write_bytes(b"\0" * 4096)
    url, problem = preflight._iso_source(load_settings("local"), str(iso))
    assert problem and "4096 bytes but the pinned ISO is 6972221440 bytes" in problem


def test_an_unreachable_pinned_iso_says_to_use_iso(monkeypatch):
    settings = load_settings("local")
    monkeypatch.setattr(preflight, "NETWORK_TIMEOUT", 2.0)
    raw = dict(settings.raw, builder=dict(settings.raw["builder"], iso_url="http://127.0.0.1:9/ws2016.iso"))
    from appliance_build.settings import settings_from_mapping

    _, problem = preflight._iso_source(settings_from_mapping(raw), None)
    assert problem and "pass --iso PATH" in problem


def test_existing_ova_is_not_overwritten_without_force(dist, local_settings):
    dist.mkdir()
    existing = dist / f"{local_settings.artifact_stem}.ova"
    existing.write_bytes(b"previous build")
    with pytest.raises(BuildError, match="already exists: pass --force"):
        build.build_ova("local")
    assert existing.read_bytes() == b"previous build"


def test_secret_comes_from_the_environment_or_stops(monkeypatch):
    monkeypatch.setenv("APPLIANCE_ADMIN_PASSWORD", "Long-enough-1")
    assert read_secret(ADMIN_PASSWORD, interactive=False) == "Long-enough-1"
    monkeypatch.setenv("APPLIANCE_ADMIN_PASSWORD", "short")
    with pytest.raises(SecretError, match="too short") as caught:
        read_secret(ADMIN_PASSWORD, interactive=False)
    assert "short" not in str(caught.value).replace("too short", "")
    monkeypatch.delenv("APPLIANCE_ADMIN_PASSWORD")
    with pytest.raises(SecretError, match="export APPLIANCE_ADMIN_PASSWORD"):
        read_secret(ADMIN_PASSWORD, interactive=False)


def test_sha256_sidecar_matches_sha256sum_format(tmp_path):
    artifact = tmp_path / "x.ova"
    artifact.write_bytes(b"appliance" * 1000)
    sidecar = build.write_sha256(artifact)
    assert sidecar.read_text() == f"{hashlib.sha256(artifact.read_bytes()).hexdigest()}  x.ova\n"


def test_qemu_disks_are_converted_to_stream_optimized(tmp_path, local_settings):
    import subprocess

    out = tmp_path / "output"
    out.mkdir()
    stem = f"{local_settings.artifact_stem}-disk1"
    for name in (stem, f"{stem}-1", f"{stem}-2"):
        subprocess.run(["qemu-img", "create", "-f", "qcow2", str(out / name), "64M"], check=True, capture_output=True)
    disks = build.stream_optimized_disks(local_settings, out)
    from appliance_build.ova.vmdk import read_vmdk_info

    for disk in disks:
        with disk.open("rb") as fh:
            info = read_vmdk_info(fh)
        assert info.stream_optimized and info.capacity_bytes == 64 * 2**20


def test_vsphere_build_names_an_unreachable_vcenter():
    from appliance_build.settings import settings_from_mapping

    settings = load_settings("vsphere")
    vsphere = dict(settings.raw["builder"]["vsphere"], vcenter="127.0.0.1")  # nothing listens on 443 here
    raw = dict(settings.raw, builder=dict(settings.raw["builder"], vsphere=vsphere))
    problems = preflight._vsphere_problems(settings_from_mapping(raw, inventory="vsphere"))
    assert len(problems) == 1 and "vCenter 127.0.0.1:443 (builder.vsphere.vcenter) is unreachable" in problems[0]
