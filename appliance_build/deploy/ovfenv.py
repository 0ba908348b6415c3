"""OVF property values for CreateImportSpec and the OVF environment the guest reads (pure logic).

The appliance's first-boot step reads the OVF environment from VMware Tools
(`guestinfo.ovfEnv`, the `com.vmware.guestInfo` transport) and applies its IP settings.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from ..ova.descriptor import ParsedDescriptor

GUESTINFO_TRANSPORT = "com.vmware.guestInfo"
OVF_ENV_KEY = "guestinfo.ovfEnv"
ENV_NS = "http://schemas.dmtf.org/ovf/environment/1"


@dataclass(frozen=True)
class PropertyPlan:
    values: dict[str, str]  # full OVF keys ("appliance.ip") -> value
    warnings: tuple[str, ...]  # values the OVA has no property for


def plan_properties(descriptor: ParsedDescriptor, wanted: dict[str, str]) -> PropertyPlan:
    """Map short names (`ip`) onto the descriptor's full keys (`appliance.ip`).

    Properties the OVA declares but we set no value for keep their OVF default; values the
    OVA has no property for are warnings (errors with --strict), never silently dropped.
    """
    by_short = {p.key.rsplit(".", 1)[-1]: p for p in descriptor.properties}
    values: dict[str, str] = {}
    warnings: list[str] = []
    for short, value in wanted.items():
        prop = by_short.get(short)
        if prop is None:
            known = ", ".join(p.key for p in descriptor.properties) or "none"
            warnings.append(f"the OVA has no OVF property {short!r} to carry {value!r} (its properties: {known})")
        elif not prop.user_configurable:
            warnings.append(f"OVF property {prop.key!r} is not user-configurable; {value!r} was not applied")
        else:
            values[prop.key] = value
    return PropertyPlan(values, tuple(warnings))


def ovf_environment(descriptor: ParsedDescriptor, values: dict[str, str], platform: str) -> str:
    """The OVF environment document (DSP0243) with every property: set values over OVF defaults."""
    ET.register_namespace("oe", ENV_NS)
    env = ET.Element(f"{{{ENV_NS}}}Environment", {f"{{{ENV_NS}}}id": descriptor.name})
    platform_section = ET.SubElement(env, f"{{{ENV_NS}}}PlatformSection")
    ET.SubElement(platform_section, f"{{{ENV_NS}}}Kind").text = platform
    ET.SubElement(platform_section, f"{{{ENV_NS}}}Vendor").text = "VMware, Inc."
    ET.SubElement(platform_section, f"{{{ENV_NS}}}Locale").text = "en"
    properties = ET.SubElement(env, f"{{{ENV_NS}}}PropertySection")
    for prop in descriptor.properties:
        ET.SubElement(properties, f"{{{ENV_NS}}}Property",
                      {f"{{{ENV_NS}}}key": prop.key, f"{{{ENV_NS}}}value": values.get(prop.key, prop.value)})
    ET.indent(env, space="  ")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(env, encoding="unicode")

