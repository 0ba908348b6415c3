"""The OVF 1.1 descriptor of the appliance: a pure model, its XML, and a parser for any OVF.

Writing and reading live together so the checks of `verify-ova` read exactly what
`assemble-ova` writes, and any third-party OVA the same way.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from ..errors import OvaError

OVF_NS = "http://schemas.dmtf.org/ovf/envelope/1"
CIM_NS = "http://schemas.dmtf.org/wbem/wscim/1/common"
RASD_NS = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
VSSD_NS = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
VMW_NS = "http://www.vmware.com/schema/ovf"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"
NAMESPACES = {"ovf": OVF_NS, "cim": CIM_NS, "rasd": RASD_NS, "vssd": VSSD_NS, "vmw": VMW_NS, "xsi": XSI_NS}
for _prefix, _uri in NAMESPACES.items():
    ET.register_namespace(_prefix, _uri)

STREAM_OPTIMIZED_FORMAT = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
GIB_UNITS = "byte * 2^30"
VMX_VERSION = "vmx-13"  # ESXi 6.5+: the oldest hardware version with every Windows Server 2016 feature
OVF_TRANSPORT = "com.vmware.guestInfo"  # the OVF environment reaches the guest as guestinfo.ovfEnv
PROPERTY_CLASS = "appliance"

# RASD ResourceType values (CIM): the ones an appliance descriptor uses.
RT_CPU, RT_MEMORY, RT_SCSI, RT_ETHERNET, RT_DISK = 3, 4, 6, 10, 17
GUEST_TYPES = {
    "windows9Server64Guest": "Microsoft Windows Server 2016 (64-bit)",
    "windows8Server64Guest": "Microsoft Windows Server 2012 R2 (64-bit)",
}
CIM_OS_ID_OTHER_64 = 102  # CIM_OperatingSystem "Other 64-Bit"; vmw:osType carries the exact guest

_UNIT_RE = re.compile(r"^\s*byte(?:\s*\*\s*(\d+)\s*\^\s*(\d+))?\s*$")


@dataclass(frozen=True)
class DiskSpec:
    role: str  # os | cache | retention
    href: str  # file name inside the OVA
    file_size: int  # bytes of the VMDK file
    capacity_gb: int  # virtual size


@dataclass(frozen=True)
class PropertySpec:
    key: str
    label: str
    description: str
    value: str = ""
    type: str = "string"
    qualifiers: str = ""
    password: bool = False


@dataclass(frozen=True)
class DescriptorSpec:
    name: str
    version: str
    product: str
    cpus: int
    memory_mb: int
    network: str
    guest_type: str
    disks: tuple[DiskSpec, ...]
    properties: tuple[PropertySpec, ...]
    annotation: str = ""


def _q(ns: str, tag: str) -> str:
    return f"{{{NAMESPACES[ns]}}}{tag}"


def _sub(parent: ET.Element, ns: str, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, _q(ns, tag), {_attr(k): v for k, v in attrs.items()})
    if text is not None:
        element.text = text
    return element


def _attr(key: str) -> str:
    # "ovf_id" -> "{ovf}id"; "vmw_osType" -> "{vmw}osType"
    prefix, _, local = key.partition("_")
    return _q(prefix, local)


def _item(parent: ET.Element, values: dict[str, str | None]) -> None:
    """One RASD Item; DSP8023 needs its children in the alphabetical order of the CIM type."""
    item = _sub(parent, "ovf", "Item")
    for key in sorted(values):
        if values[key] is not None:
            _sub(item, "rasd", key, values[key])


def build_descriptor(spec: DescriptorSpec) -> bytes:
    """The descriptor's bytes: deterministic for the same spec."""
    if spec.guest_type not in GUEST_TYPES:
        raise OvaError(f"guest type {spec.guest_type!r} is not supported: allowed are {', '.join(GUEST_TYPES)}")
    env = ET.Element(_q("ovf", "Envelope"), {_q("vmw", "buildId"): f"{spec.name}-{spec.version}"})
    refs = _sub(env, "ovf", "References")
    for n, disk in enumerate(spec.disks, 1):
        _sub(refs, "ovf", "File", ovf_href=disk.href, ovf_id=f"file{n}", ovf_size=str(disk.file_size))

    disk_section = _sub(env, "ovf", "DiskSection")
    _sub(disk_section, "ovf", "Info", "Virtual disks: OS, process server cache, retention")
    for n, disk in enumerate(spec.disks, 1):
        _sub(disk_section, "ovf", "Disk", ovf_capacity=str(disk.capacity_gb), ovf_capacityAllocationUnits=GIB_UNITS,
             ovf_diskId=f"vmdisk{n}", ovf_fileRef=f"file{n}", ovf_format=STREAM_OPTIMIZED_FORMAT)

    net_section = _sub(env, "ovf", "NetworkSection")
    _sub(net_section, "ovf", "Info", "The network the appliance's NIC connects to")
    network = _sub(net_section, "ovf", "Network", ovf_name=spec.network)
    _sub(network, "ovf", "Description", "Reaches the replicated machines (443, data port) and Azure (443 out)")

    system = _sub(env, "ovf", "VirtualSystem", ovf_id=spec.name)
    _sub(system, "ovf", "Info", "The replication appliance virtual machine")
    _sub(system, "ovf", "Name", spec.name)
    if spec.annotation:
        annotation = _sub(system, "ovf", "AnnotationSection")
        _sub(annotation, "ovf", "Info", "Description of the appliance")
        _sub(annotation, "ovf", "Annotation", spec.annotation)

    product = _sub(system, "ovf", "ProductSection", ovf_class=PROPERTY_CLASS, ovf_required="false")
    _sub(product, "ovf", "Info", "Deploy-time settings, applied by the appliance at first boot")
    _sub(product, "ovf", "Product", spec.product)
    _sub(product, "ovf", "Version", spec.version)
    _sub(product, "ovf", "FullVersion", f"{spec.version}")
    _sub(product, "ovf", "Category", "Network")
    for prop in spec.properties:
        attrs = {"ovf_key": prop.key, "ovf_type": prop.type}
        if prop.qualifiers:
            attrs["ovf_qualifiers"] = prop.qualifiers
        attrs["ovf_userConfigurable"] = "true"
        attrs["ovf_value"] = prop.value
        if prop.password:
            attrs["ovf_password"] = "true"
        element = _sub(product, "ovf", "Property", **attrs)
        _sub(element, "ovf", "Label", prop.label)
        _sub(element, "ovf", "Description", prop.description)

    os_section = _sub(system, "ovf", "OperatingSystemSection", ovf_id=str(CIM_OS_ID_OTHER_64), vmw_osType=spec.guest_type)
    _sub(os_section, "ovf", "Info", "The guest operating system")
    _sub(os_section, "ovf", "Description", GUEST_TYPES[spec.guest_type])

    hardware = _sub(system, "ovf", "VirtualHardwareSection", ovf_transport=OVF_TRANSPORT)
    _sub(hardware, "ovf", "Info", "Virtual hardware requirements")
    vsys = _sub(hardware, "ovf", "System")
    _sub(vsys, "vssd", "ElementName", "Virtual Hardware Family")
    _sub(vsys, "vssd", "InstanceID", "0")
    _sub(vsys, "vssd", "VirtualSystemIdentifier", spec.name)
    _sub(vsys, "vssd", "VirtualSystemType", VMX_VERSION)
    _item(hardware, {"AllocationUnits": "hertz * 10^6", "Description": "Number of virtual CPUs",
                     "ElementName": f"{spec.cpus} virtual CPU(s)", "InstanceID": "1",
                     "ResourceType": str(RT_CPU), "VirtualQuantity": str(spec.cpus)})
    _item(hardware, {"AllocationUnits": "byte * 2^20", "Description": "Memory size",
                     "ElementName": f"{spec.memory_mb} MB of memory", "InstanceID": "2",
                     "ResourceType": str(RT_MEMORY), "VirtualQuantity": str(spec.memory_mb)})
    _item(hardware, {"Address": "0", "Description": "SCSI Controller", "ElementName": "SCSI Controller 0",
                     "InstanceID": "3", "ResourceSubType": "VirtualSCSI", "ResourceType": str(RT_SCSI)})
    for n, disk in enumerate(spec.disks, 1):
        _item(hardware, {"AddressOnParent": str(n - 1), "Description": f"{disk.role} disk",
                         "ElementName": f"Hard Disk {n}", "HostResource": f"ovf:/disk/vmdisk{n}",
                         "InstanceID": str(3 + n), "Parent": "3", "ResourceType": str(RT_DISK)})
    _item(hardware, {"AddressOnParent": "7", "AutomaticAllocation": "true", "Connection": spec.network,
                     "Description": "VMXNET3 ethernet adapter", "ElementName": "Network adapter 1",
                     "InstanceID": str(4 + len(spec.disks)), "ResourceSubType": "VmxNet3",
                     "ResourceType": str(RT_ETHERNET)})

    ET.indent(env, space="  ")
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(env, encoding="utf-8", xml_declaration=False) + b"\n"


# --- parsing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedFile:
    file_id: str
    href: str
    size: int | None


@dataclass(frozen=True)
class ParsedDisk:
    disk_id: str
    file_ref: str | None
    capacity_bytes: int
    format: str


@dataclass(frozen=True)
class ParsedItem:
    resource_type: int
    values: dict[str, str]


@dataclass(frozen=True)
class ParsedProperty:
    key: str  # with the class prefix: "appliance.ip"
    type: str
    value: str
    user_configurable: bool
    password: bool


@dataclass(frozen=True)
class ParsedDescriptor:
    name: str
    files: tuple[ParsedFile, ...]
    disks: tuple[ParsedDisk, ...]
    networks: tuple[str, ...]
    items: tuple[ParsedItem, ...]
    guest_type: str | None
    transport: str | None
    properties: tuple[ParsedProperty, ...] = field(default=())

    def items_of(self, resource_type: int) -> list[ParsedItem]:
        return [i for i in self.items if i.resource_type == resource_type]

    @property
    def cpus(self) -> int:
        return sum(int(i.values.get("VirtualQuantity", "0") or 0) for i in self.items_of(RT_CPU))

    @property
    def memory_mb(self) -> int:
        total = 0
        for item in self.items_of(RT_MEMORY):
            quantity = int(item.values.get("VirtualQuantity", "0") or 0)
            total += quantity * allocation_unit_bytes(item.values.get("AllocationUnits", "byte * 2^20")) // 2**20
        return total

    def disk_for_item(self, item: ParsedItem) -> ParsedDisk | None:
        host = item.values.get("HostResource", "")
        disk_id = host.rsplit("/", 1)[-1]
        return next((d for d in self.disks if d.disk_id == disk_id), None)

    def ordered_disks(self) -> list[ParsedDisk]:
        """Disks in the order the VM sees them (by controller unit number)."""
        items = sorted(self.items_of(RT_DISK), key=lambda i: (i.values.get("Parent", ""),
                                                                int(i.values.get("AddressOnParent", "0") or 0)))
        disks = [self.disk_for_item(i) for i in items]
        return [d for d in disks if d is not None]


def allocation_unit_bytes(units: str) -> int:
    """`byte * 2^30` -> 1073741824; raises OvaError on units the spec does not allow."""
    match = _UNIT_RE.match(units or "byte")
    if not match:
        raise OvaError(f"unsupported allocation units {units!r}: expected 'byte' or 'byte * B^E'")
    base, exponent = match.groups()
    return int(base) ** int(exponent) if base else 1


def parse_descriptor(text: bytes | str) -> ParsedDescriptor:
    """Read what the checks need from any OVF 1.x descriptor; OvaError if it is not one."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise OvaError(f"the descriptor is not well-formed XML: {exc}") from None
    if root.tag != _q("ovf", "Envelope"):
        raise OvaError(f"the descriptor's root is {root.tag}, expected the OVF 1.x Envelope ({OVF_NS})")
    o = f"{{{OVF_NS}}}"
    files = tuple(
        ParsedFile(f.get(o + "id", ""), f.get(o + "href", ""), _int_or_none(f.get(o + "size")))
        for f in root.findall(f"{o}References/{o}File")
    )
    disks = []
    for d in root.findall(f"{o}DiskSection/{o}Disk"):
        capacity = int(d.get(o + "capacity", "0"))
        disks.append(ParsedDisk(d.get(o + "diskId", ""), d.get(o + "fileRef"),
                                capacity * allocation_unit_bytes(d.get(o + "capacityAllocationUnits", "byte")),
                                d.get(o + "format", "")))
    networks = tuple(n.get(o + "name", "") for n in root.findall(f"{o}NetworkSection/{o}Network"))
    system = root.find(f"{o}VirtualSystem")
    if system is None:
        raise OvaError("the descriptor has no VirtualSystem (a VirtualSystemCollection is not an appliance)")
    hardware = system.find(f"{o}VirtualHardwareSection")
    items = []
    if hardware is not None:
        for item in hardware.findall(f"{o}Item"):
            values = {child.tag.rsplit("}", 1)[-1]: (child.text or "").strip() for child in item}
            try:
                resource_type = int(values.get("ResourceType", "0"))
            except ValueError:
                resource_type = 0
            items.append(ParsedItem(resource_type, values))
    os_section = system.find(f"{o}OperatingSystemSection")
    guest = os_section.get(f"{{{VMW_NS}}}osType") if os_section is not None else None
    properties = []
    for section in system.findall(f"{o}ProductSection"):
        prefix = section.get(o + "class", "")
        for prop in section.findall(f"{o}Property"):
            key = prop.get(o + "key", "")
            properties.append(ParsedProperty(
                key=f"{prefix}.{key}" if prefix else key,
                type=prop.get(o + "type", ""),
                value=prop.get(o + "value", ""),
                user_configurable=prop.get(o + "userConfigurable", "false") == "true",
                password=prop.get(o + "password", "false") == "true",
            ))
    return ParsedDescriptor(
        name=system.get(o + "id", ""),
        files=files,
        disks=tuple(disks),
        networks=networks,
        items=tuple(items),
        guest_type=guest,
        transport=hardware.get(o + "transport") if hardware is not None else None,
        properties=tuple(properties),
    )


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
