"""The rendered templates pass the real Packer's fmt -check and validate (Debian's 1.6.6 in CI)."""
from __future__ import annotations

import shutil

import pytest

from appliance_build.packer import detect_packer_version
from appliance_build.render import write_rendered
from appliance_build.settings import load_settings
from appliance_build.validate import ovf_check, packer_checks


@pytest.fixture(scope="module")
def packer_version():
    if shutil.which("packer") is None:
        pytest.fail("packer is not installed (Debian: apt-get install packer); ./bootstrap.sh installs it")
    version = detect_packer_version()
    assert version is not None
    return version


@pytest.mark.parametrize("inventory", ["local", "vsphere"])
def test_packer_fmt_and_validate_pass(inventory, packer_version, tmp_path, monkeypatch):
    from appliance_build import render

    monkeypatch.setattr(render, "BUILD_ROOT", tmp_path)
    settings = load_settings(inventory)
    folder = write_rendered(settings, packer_version)
    # The rendered template lives in tmp_path, so its relative playbook path must be made to resolve.
    playbooks = tmp_path.parent / "playbooks"
    if not playbooks.exists():
        playbooks.symlink_to(render.REPO_ROOT / "playbooks")
    results = packer_checks(settings, folder)
    assert [r.name for r in results] == ["packer fmt -check", "packer validate"]
    for result in results:
        assert result.ok, result.detail


def test_packer_validate_rejects_a_broken_template(packer_version, tmp_path, monkeypatch):
    from appliance_build import render

    monkeypatch.setattr(render, "BUILD_ROOT", tmp_path)
    settings = load_settings("local")
    folder = write_rendered(settings, packer_version)
    template = folder / "packer" / "appliance.pkr.hcl"
    template.write_text(template.read_text().replace("default = 8\n", "default = 2\n", 1))
    results = {r.name: r for r in packer_checks(settings, folder)}
    assert not results["packer validate"].ok
    assert "at least 8 vCPUs" in results["packer validate"].detail


@pytest.mark.parametrize("inventory", ["local", "vsphere"])
def test_inventory_descriptor_passes_the_ovf_checks(inventory):
    assert ovf_check(load_settings(inventory)).ok
