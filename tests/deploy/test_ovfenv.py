"""OVF properties and the OVF environment the appliance reads at first boot (pure logic)."""
from __future__ import annotations

import xml.etree.ElementTree as ET

from appliance_build.deploy.ovfenv import ENV_NS, ovf_environment, plan_properties
from appliance_build.ova.descriptor import ParsedDescriptor, ParsedProperty


def _descriptor(*properties: ParsedProperty) -> ParsedDescriptor:
    return ParsedDescriptor(name="appliance", files=(), disks=(), networks=("VM Network",), items=(),
                            guest_type=None, transport="com.vmware.guestInfo", properties=properties)


IP = ParsedProperty("appliance.ip", "string", "10.0.0.5", True, False)
DNS = ParsedProperty("appliance.dns", "string", "10.0.0.2", True, False)
FIXED = ParsedProperty("appliance.build", "string", "42", False, False)


def test_values_map_onto_the_class_prefixed_keys():
    plan = plan_properties(_descriptor(IP, DNS), {"ip": "10.9.9.9", "dns": "1.1.1.1,8.8.8.8"})
    assert plan.values == {"appliance.ip": "10.9.9.9", "appliance.dns": "1.1.1.1,8.8.8.8"}
    assert plan.warnings == ()


def test_values_without_a_property_or_on_a_fixed_one_are_warnings():
    plan = plan_properties(_descriptor(IP, FIXED), {"ip": "10.9.9.9", "gateway": "10.9.9.1", "build": "7"})
    assert plan.values == {"appliance.ip": "10.9.9.9"}
    assert len(plan.warnings) == 2
    assert "no OVF property 'gateway'" in plan.warnings[0] and "appliance.ip" in plan.warnings[0]
    assert "'appliance.build' is not user-configurable" in plan.warnings[1]


def test_environment_carries_set_values_over_ovf_defaults():
    text = ovf_environment(_descriptor(IP, DNS), {"appliance.ip": "10.9.9.9"}, "VMware vCenter Server 8.0")
    root = ET.fromstring(text)
    assert root.tag == f"{{{ENV_NS}}}Environment"
    properties = {p.get(f"{{{ENV_NS}}}key"): p.get(f"{{{ENV_NS}}}value") for p in root.iter(f"{{{ENV_NS}}}Property")}
    assert properties == {"appliance.ip": "10.9.9.9", "appliance.dns": "10.0.0.2"}
    assert root.find(f"{{{ENV_NS}}}PlatformSection/{{{ENV_NS}}}Kind").text == "VMware vCenter Server 8.0"
