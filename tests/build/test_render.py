"""Rendering: golden files, determinism, escaping of hostile values, secrets kept out."""
from __future__ import annotations

import copy
import os
import re
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

import hcl2
import pytest
import yaml

from appliance_build.render import (
    ANSWER_FILES,
    REDACTED,
    hcl_literal,
    private_answer_dir,
    render_files,
)
from appliance_build.settings import load_settings, settings_from_mapping
from appliance_build.version import REPO_ROOT

GOLDEN = Path(__file__).parent / "golden"
DEBIAN_PACKER = (1, 6, 6)
MODERN_PACKER = (1, 11, 2)
UNATTEND_NS = "{urn:schemas-microsoft-com:unattend}"
HOSTILE = 'Net "A" <b>&amp; ${var.x} %{if} \\ end'


def _unquote(value):
    """python-hcl2 8 keeps string literals as written: strip the quotes and HCL's escapes."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        body = value[1:-1]
        return re.sub(r'\\(.)|\$\$\{|%%\{', lambda m: m.group(1) if m.group(1) else m.group(0)[1:], body)
    return value


def parse_hcl(text: str):
    def clean(node):
        if isinstance(node, dict):
            return {_unquote(k): clean(v) for k, v in node.items() if not k.startswith("__")}
        if isinstance(node, list):
            return [clean(v) for v in node]
        return _unquote(node)
    return clean(hcl2.loads(text))


def rendered(inventory: str, packer_version=DEBIAN_PACKER, password=None) -> dict[str, bytes]:
    return {f.path: f.content for f in render_files(load_settings(inventory), packer_version, password)}


@pytest.mark.parametrize("inventory", ["local", "vsphere"])
def test_rendering_matches_golden_files(inventory):
    files = rendered(inventory)
    folder = GOLDEN / inventory
    if os.environ.get("UPDATE_GOLDEN") == "1":
        for path, content in files.items():
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_bytes(content)
    expected = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert sorted(expected) == sorted(files), "rendered file set changed (UPDATE_GOLDEN=1 to accept)"
    for path, content in files.items():
        assert content == expected[path], f"{path} differs from its golden file (UPDATE_GOLDEN=1 to accept)"


@pytest.mark.parametrize("inventory", ["local", "vsphere"])
def test_rendering_is_deterministic(inventory):
    assert rendered(inventory) == rendered(inventory)


@pytest.mark.parametrize("inventory,source", [("local", "qemu"), ("vsphere", "vsphere-iso")])
def test_packer_template_parses_and_describes_the_appliance(inventory, source):
    text = rendered(inventory)["packer/appliance.pkr.hcl"].decode()
    doc = parse_hcl(text)
    variables = {k: v for block in doc["variable"] for k, v in block.items()}
    assert variables["cpus"]["default"] == 8
    assert variables["memory_mb"]["default"] == 16384
    assert variables["cache_disk_gb"]["default"] == 600
    assert variables["admin_password"]["sensitive"] is True
    assert "default" not in variables["admin_password"]
    assert "validation" in variables["cpus"]
    sources = doc["source"][0]
    assert list(sources) == [source]
    (body,) = list(sources.values())[0].values()
    provisioner = doc["build"][0]["provisioner"][0]
    ansible = list(provisioner.values())[0]
    assert ansible["use_proxy"] is False
    assert ansible["playbook_file"] == "${var.playbook_file}"
    assert variables["playbook_file"]["default"].endswith("playbooks/appliance.yml")
    assert body["communicator"] == "winrm"
    if source == "qemu":
        assert body["disk_additional_size"] == ["${var.cache_disk_gb}G", "${var.retention_disk_gb}G"]
        assert body["cd_files"] == ["${var.vmware_tools_iso}"]  # drivers for ESXi
    else:
        assert body["guest_os_type"] == "windows9Server64Guest"
        assert body["disk_controller_type"] == ["pvscsi"]
        assert body["network_adapters"][0]["network_card"] == "vmxnet3"
        assert len(body["storage"]) == 3 and all(s["disk_thin_provisioned"] for s in body["storage"])
        assert "export" in body
        assert variables["vsphere_password"]["sensitive"] is True


def test_required_plugins_only_for_packer_17_and_newer():
    old = rendered("local", DEBIAN_PACKER)["packer/appliance.pkr.hcl"].decode()
    new = rendered("local", MODERN_PACKER)["packer/appliance.pkr.hcl"].decode()
    assert "required_plugins" not in old
    assert "required_plugins" in new
    assert "packer" in parse_hcl(new)


def test_answer_file_is_en_us_without_drive_letters_and_enables_winrm_last():
    xml = rendered("local")["packer/answer/autounattend.xml"]
    root = ET.fromstring(xml)
    locales = [e.text for e in root.iter()
               if e.tag.endswith(("SystemLocale", "UserLocale", "UILanguage", "InputLocale")) and len(e) == 0]
    assert locales and set(locales) == {"en-US"}
    commands = [e.text for e in root.iter(f"{UNATTEND_NS}CommandLine")]
    assert commands and "Enable-WinRM.ps1" in commands[-1]
    assert all("Enable-WinRM" not in c for c in commands[:-1])
    text = xml.decode()
    assert not re.search(r"(?<![%\w])[A-Z]:\\", text), "a fixed drive letter is used"
    assert "<Letter>" not in text
    assert "drvload" in text  # PVSCSI driver in WinPE


def test_first_boot_scripts_search_media_instead_of_fixed_letters():
    files = rendered("local")
    for name in ANSWER_FILES[1:]:
        script = files[f"packer/answer/{name}"].decode()
        assert not re.search(r"(?<![%\w$])[A-Z]:\\", script), f"{name} uses a fixed drive letter"
    assert "pnputil" in files["packer/answer/Install-VMwareDrivers.ps1"].decode()


def _hostile_settings():
    raw = copy.deepcopy(load_settings("vsphere").raw)
    raw["network"]["ovf_network"] = HOSTILE
    raw["builder"]["vsphere"]["folder"] = HOSTILE
    raw["windows"]["image_name"] = HOSTILE
    return settings_from_mapping(raw, inventory="vsphere")


def test_hostile_values_round_trip_through_hcl_and_xml():
    settings = _hostile_settings()
    password = "p<&>\"'${x}%{y}"
    files = {f.path: f.content for f in render_files(settings, DEBIAN_PACKER, password)}
    doc = parse_hcl(files["packer/appliance.pkr.hcl"].decode())
    variables = {k: v for block in doc["variable"] for k, v in block.items()}
    assert variables["vsphere_folder"]["default"] == HOSTILE
    root = ET.fromstring(files["packer/answer/autounattend.xml"])
    values = [e.text for e in root.iter(f"{UNATTEND_NS}Value")]
    assert HOSTILE in values
    assert values.count(password) == 2  # administrator + autologon
    vars_doc = yaml.safe_load(files["ansible/appliance-vars.yml"])
    assert vars_doc["network"]["ovf_network"] == HOSTILE


@pytest.mark.parametrize("value,literal", [
    ("plain", '"plain"'),
    ('a"b', '"a\\"b"'),
    ("${x}", '"$${x}"'),
    ("%{x}", '"%%{x}"'),
    ("a\\b", '"a\\\\b"'),
    (True, "true"),
    (600, "600"),
])
def test_hcl_literal_escapes(value, literal):
    assert hcl_literal(value) == literal


def test_kept_rendering_never_holds_the_password():
    password = "Sup3r-Secret-Build-Password"
    kept = rendered("local")
    assert all(password.encode() not in c for c in kept.values())
    assert REDACTED.encode() in kept["packer/answer/autounattend.xml"]
    assert b"lookup('ansible.builtin.env', 'APPLIANCE_ADMIN_PASSWORD')" in kept["ansible/appliance-vars.yml"]


def test_private_answer_dir_is_private_and_removed():
    password = "Sup3r-Secret-Build-Password"
    settings = load_settings("local")
    with private_answer_dir(settings, DEBIAN_PACKER, password) as folder:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        answer = folder / "autounattend.xml"
        assert stat.S_IMODE(answer.stat().st_mode) == 0o600
        assert password in answer.read_text()
        assert sorted(p.name for p in folder.iterdir()) == sorted(ANSWER_FILES)
    assert not folder.exists()


def test_render_task_writes_into_build_folder(tmp_path, monkeypatch):
    from appliance_build import render

    monkeypatch.setattr(render, "BUILD_ROOT", tmp_path)
    out = render.render_inventory("local", packer_version=DEBIAN_PACKER)
    assert out == tmp_path / "local"
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert written == set(rendered("local"))
    assert (REPO_ROOT / "images" / "windows-server-2016" / "appliance.pkr.hcl.j2").is_file()
