"""Flags over the inventory's deploy defaults, validated together (pure logic)."""
from __future__ import annotations

from pathlib import Path

import pytest

from appliance_build.deploy.errors import DeployOptionsError
from appliance_build.deploy.options import (
    Flags,
    VcenterAddress,
    options_from,
    parse_ip,
    parse_vcenter,
)


@pytest.mark.parametrize("text, expected", [
    ("vc.example.com", VcenterAddress("vc.example.com", 443)),
    ("vc.example.com:8443", VcenterAddress("vc.example.com", 8443)),
    ("https://vc.example.com", VcenterAddress("vc.example.com", 443)),
    ("https://vc.example.com:9443/sdk", VcenterAddress("vc.example.com", 9443)),
    ("10.1.1.1", VcenterAddress("10.1.1.1", 443)),
    ("[fd00::5]:444", VcenterAddress("fd00::5", 444)),
])
def test_vcenter_accepts_host_host_port_and_https_url(text, expected):
    assert parse_vcenter(text) == expected


@pytest.mark.parametrize("text, problem", [
    ("", "empty"),
    ("http://vc", "only https://"),
    ("https://vc/ui", "without a path"),
    ("https://user:pw@vc", "without a path, query or credentials"),
    ("vc:99999", "port must be a number"),
    ("vc_bad!", "not a host name"),
])
def test_vcenter_rejects_what_is_not_an_address(text, problem):
    with pytest.raises(DeployOptionsError, match=problem):
        parse_vcenter(text)


def test_ip_takes_an_optional_prefix():
    assert parse_ip("10.0.0.5/24", 16) == ("10.0.0.5", 24)
    assert parse_ip("10.0.0.5", 16) == ("10.0.0.5", 16)
    for bad in ("10.0.0.5/33", "127.0.0.1", "169.254.1.1/16", "fe80::1"):
        with pytest.raises(DeployOptionsError):
            parse_ip(bad, 24)


def test_inventory_defaults_fill_what_flags_leave_out(settings):
    options = options_from(settings, Flags(vcenter="vc.example.com"))
    assert options.placement.datacenter == settings.deploy["datacenter"]
    assert options.placement.cluster == settings.deploy["cluster"]
    assert options.placement.network == settings.deploy["network"]
    assert options.name == settings.name
    assert options.ova.name == f"{settings.artifact_stem}.ova"
    assert options.disk_provisioning == "thin"
    assert (options.guest.ip, options.guest.prefix) == (settings.network.ip, settings.network.prefix)
    assert options.guest.data_port == settings.ports.data
    assert options.tls.insecure is False and options.tls.ca_file is None


def test_flags_override_the_inventory(settings, tmp_path: Path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    options = options_from(settings, Flags(vcenter="https://vc:8443", datacenter="DC9", host="esx1", network="Prod",
                                           folder="/Infra/Appliances/", ip="192.168.5.10/23", gateway="192.168.4.1",
                                           dns="192.168.4.2, 192.168.4.3", disk_provisioning="thick",
                                           ca_file=str(ca), ip_timeout="60", power_on=True, wait_ip=True))
    assert options.vcenter == VcenterAddress("vc", 8443)
    assert options.placement.host == "esx1" and options.placement.cluster is None  # --host alone: no inventory cluster
    assert options.placement.folder == "Infra/Appliances"
    assert options.guest.property_values() == {"ip": "192.168.5.10", "prefix": "23", "gateway": "192.168.4.1",
                                               "dns": "192.168.4.2,192.168.4.3", "hostname": settings.network.hostname,
                                               "data_port": str(settings.ports.data)}
    assert options.ip_timeout == 60.0 and options.tls.ca_file == ca


def test_all_problems_are_reported_together(settings):
    with pytest.raises(DeployOptionsError) as caught:
        options_from(settings, Flags(vcenter="", ip="10.0.0.5/24", gateway="10.9.0.1", dns="", hostname="x" * 16,
                                     name="a/b", lease_timeout="soon"))
    message = str(caught.value)
    for expected in ("--vcenter is empty", "must be inside the appliance's network 10.0.0.0/24",
                     "--dns '': must be a list of 1-3",
                     "--hostname", "--name 'a/b'", "--lease-timeout 'soon'"):
        assert expected in message
