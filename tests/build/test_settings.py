"""Inventory validation: good inventories load; every bad value is named with what is allowed."""
from __future__ import annotations

import copy

import pytest
import yaml

from appliance_build.errors import SettingsError
from appliance_build.settings import (
    available_inventories,
    load_settings,
    settings_from_mapping,
)
from appliance_build.version import APPLIANCE_VERSION, REPO_ROOT


@pytest.fixture
def raw() -> dict:
    return yaml.safe_load((REPO_ROOT / "inventory" / "local" / "group_vars" / "all.yml").read_text())


def with_value(raw: dict, path: str, value) -> dict:
    data = copy.deepcopy(raw)
    node = data
    *parents, last = path.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    return data


def test_committed_inventories_are_valid():
    assert {"local", "vsphere"} <= set(available_inventories())
    local = load_settings("local")
    assert (local.vm.cpus, local.vm.memory_mb, local.vm.nic) == (8, 16384, "vmxnet3")
    assert (local.vm.disks.cache_gb, local.vm.disks.retention_gb) == (600, 600)
    assert (local.ports.control, local.ports.data) == (443, 9443)
    assert local.builder.target == "qemu"
    assert load_settings("vsphere").builder.target == "vsphere"
    assert local.artifact_stem == f"replication-appliance-{APPLIANCE_VERSION}"


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("vm.cpus", 0, "vm.cpus = 0: must be a whole number from 8 to 128"),
        ("vm.cpus", "eight", "vm.cpus = 'eight': must be a whole number"),
        ("vm.memory_mb", 8192, "vm.memory_mb = 8192: must be a whole number from 16384"),
        ("vm.disks.cache_gb", 8, "vm.disks.cache_gb = 8: must be a whole number from 600"),
        ("vm.disks.retention_gb", 599, "vm.disks.retention_gb = 599: must be a whole number from 600"),
        ("vm.nic", "e1000", "vm.nic = 'e1000': allowed are vmxnet3"),
        ("network.ip", "10.0.0.300", "network.ip = '10.0.0.300': must be an IPv4 address"),
        ("network.ip", "127.0.0.1", "must be a unicast IPv4 address"),
        ("network.dns", ["8.8.8.8", "nope"], "'nope' is not an IPv4 address"),
        ("network.hostname", "replication-appliance-01", "network.hostname = 'replication-appliance-01': must be 1-15"),
        ("appliance.cloud", "china", "appliance.cloud = 'china': allowed are public, government"),
        ("appliance.name", "bad name/../x", "appliance.name = 'bad name/../x': must be 1-63 letters"),
        ("ports.control", 8443, "ports.control = 8443: must be 443"),
        ("ports.data", 443, "ports.data = 443: must be a whole number from 1024 to 65535"),
        ("ports.data", 70000, "ports.data = 70000: must be a whole number from 1024 to 65535"),
        ("windows.locale", "de-DE", "windows.locale = 'de-DE': must be 'en-US'"),
        ("builder.target", "hyperv", "builder.target = 'hyperv': allowed are qemu, vsphere"),
        ("builder.iso_checksum", "md5:abc", "builder.iso_checksum = 'md5:abc': must be 'sha256:'"),
        ("network.gateway", "192.168.1.1", "network.gateway = '192.168.1.1': must be inside the appliance's network"),
        ("network.ovf_network", "VM\nNetwork", "must not contain control characters"),
    ],
)
def test_bad_value_is_named_with_what_is_allowed(raw, path, value, expected):
    with pytest.raises(SettingsError) as caught:
        settings_from_mapping(with_value(raw, path, value), inventory="bad")
    assert expected in str(caught.value)
    assert "inventory 'bad'" in str(caught.value)


def test_every_problem_is_reported_at_once(raw):
    data = with_value(with_value(with_value(raw, "vm.cpus", 2), "appliance.cloud", "x"), "network.ip", "300.1.1.1")
    with pytest.raises(SettingsError) as caught:
        settings_from_mapping(data)
    message = str(caught.value)
    assert "3 invalid setting(s)" in message
    for name in ("vm.cpus", "appliance.cloud", "network.ip"):
        assert name in message


def test_missing_setting_is_named(raw):
    del raw["vm"]["disks"]["cache_gb"]
    with pytest.raises(SettingsError, match=r"vm\.disks\.cache_gb: is missing"):
        settings_from_mapping(raw)


def test_vsphere_target_needs_its_connection_settings(raw):
    data = with_value(raw, "builder.target", "vsphere")
    with pytest.raises(SettingsError, match=r"builder\.vsphere: is missing"):
        settings_from_mapping(data)


def test_unknown_inventory_lists_the_known_ones():
    with pytest.raises(SettingsError, match=r"unknown inventory 'nope': allowed are .*local.*vsphere"):
        load_settings("nope")


def test_secrets_are_not_settings():
    """No committed inventory holds a password (they come from the environment or a prompt)."""
    for path in (REPO_ROOT / "inventory").rglob("*.yml"):
        for line in path.read_text().splitlines():
            key = line.split("#", 1)[0].split(":", 1)[0].strip().lower()
            assert "password" not in key, f"{path} sets {key}"
