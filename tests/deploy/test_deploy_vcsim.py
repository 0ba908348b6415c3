"""Deploy the assembled appliance OVA into govmomi's vCenter simulator and look at the result
through the vSphere API, as a user's vCenter would show it."""
from __future__ import annotations

import hashlib
import re
import shutil
import socket
import tarfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from pyVmomi import vim

from appliance_build.deploy.deployer import deploy
from appliance_build.deploy.errors import (
    DuplicateVmError,
    GuestIpTimeout,
    ImportSpecError,
    PlacementError,
    UploadError,
)
from appliance_build.deploy.ovfenv import ENV_NS, OVF_ENV_KEY
from appliance_build.errors import VerificationError
from appliance_build.ova.package import open_package

from .helpers import vcsim_options, vm_named
from .proxy import FaultyProxy

GIB = 2**30


def _extra(vm: Any) -> dict[str, str]:
    return {o.key: o.value for o in vm.config.extraConfig}


def _nfc_bytes(log: Path, vm_name: str) -> list[int]:
    """Bytes vcsim received per disk of `vm_name` (from its NFC handler's log)."""
    pattern = re.compile(rf"nfc POST \S*/{re.escape(vm_name)}/disk-\d+\.vmdk: transferred (\d+) bytes")
    return [int(n) for n in pattern.findall(log.read_text(errors="replace"))]


def test_deploys_the_appliance_with_its_hardware_network_and_properties(settings, vcsim, si, credentials,
                                                                          appliance_ova):
    content = si.RetrieveContent()
    datacenter = next(dc for dc in content.rootFolder.childEntity if dc.name == "DC0")
    datacenter.vmFolder.CreateFolder("Appliances")
    lines: list[str] = []
    options = vcsim_options(settings, vcsim, appliance_ova, "appliance-full", network="DC0_DVPG0",
                            folder="Appliances", ip="10.20.0.7/22", gateway="10.20.0.1", dns="10.20.0.2,10.20.0.3",
                            hostname="asr-east")

    # progress_interval=0: HttpNfcLeaseProgress after every MiB, so the real call is exercised
    result = deploy(options, credentials, say=lines.append, progress=False, progress_interval=0)

    vm = vm_named(si, "appliance-full")
    assert vm is not None and vm._moId == result.vm_id
    assert vm.parent.name == "Appliances"
    hardware = vm.config.hardware
    assert (hardware.numCPU, hardware.memoryMB) == (8, 16384)
    controllers = [d for d in hardware.device if isinstance(d, vim.vm.device.VirtualSCSIController)]
    assert [type(c) for c in controllers] == [vim.vm.device.ParaVirtualSCSIController]
    disks = [d for d in hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
    sizes = settings.vm.disks
    assert sorted(d.capacityInKB * 1024 for d in disks) == sorted(
        [sizes.os_gb * GIB, sizes.cache_gb * GIB, sizes.retention_gb * GIB])
    assert {d.controllerKey for d in disks} == {controllers[0].key}
    nics = [d for d in hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard)]
    assert [type(n) for n in nics] == [vim.vm.device.VirtualVmxnet3]
    portgroup = next(n for n in datacenter.network if n.name == "DC0_DVPG0")
    assert nics[0].backing.port.portgroupKey == portgroup.key  # OVF "VM Network" mapped to DC0_DVPG0

    extra = _extra(vm)
    wanted = {"appliance.ip": "10.20.0.7", "appliance.prefix": "22", "appliance.gateway": "10.20.0.1",
              "appliance.dns": "10.20.0.2,10.20.0.3", "appliance.hostname": "asr-east", "appliance.data_port": "9443"}
    assert {k: extra.get(k) for k in wanted} == wanted  # the property mapping vCenter received
    environment = ET.fromstring(extra[OVF_ENV_KEY])  # what VMware Tools hands the guest
    properties = {p.get(f"{{{ENV_NS}}}key"): p.get(f"{{{ENV_NS}}}value")
                  for p in environment.iter(f"{{{ENV_NS}}}Property")}
    assert wanted.items() <= properties.items()
    assert properties["appliance.admin_password"] == ""  # OVF default kept for what we did not set

    with open_package(appliance_ova) as package:
        disk_sizes = sorted(package.member_size(m) for m in package.members if m.endswith(".vmdk"))
    assert sorted(_nfc_bytes(vcsim.log, "appliance-full")) == disk_sizes
    assert "control (configuration server): https://10.20.0.7:443/" in lines
    assert any(line.endswith("10.20.0.7:9443") for line in lines)


def test_unknown_network_lists_the_networks_that_exist(settings, vcsim, si, credentials, appliance_ova):
    options = vcsim_options(settings, vcsim, appliance_ova, "appliance-badnet", network="Prod LAN")
    with pytest.raises(PlacementError) as caught:
        deploy(options, credentials, say=lambda _: None, progress=False)
    message = str(caught.value)
    assert "network 'Prod LAN' not found" in message
    assert "'VM Network'" in message and "'DC0_DVPG0'" in message
    assert vm_named(si, "appliance-badnet") is None


def test_unknown_datastore_lists_the_datastores_that_exist(settings, vcsim, si, credentials, appliance_ova):
    options = vcsim_options(settings, vcsim, appliance_ova, "appliance-badds", datastore="fast-ssd")
    with pytest.raises(PlacementError, match=r"datastore 'fast-ssd' not found in cluster 'DC0_C0'.*'LocalDS_0'"):
        deploy(options, credentials, say=lambda _: None, progress=False)
    assert vm_named(si, "appliance-badds") is None


def test_unknown_cluster_folder_and_pool_list_what_exists(settings, vcsim, credentials, appliance_ova):
    with pytest.raises(PlacementError, match=r"cluster 'C9' not found.*'DC0_C0'"):
        deploy(vcsim_options(settings, vcsim, appliance_ova, "x", cluster="C9"), credentials, say=lambda _: None,
               progress=False)
    with pytest.raises(PlacementError, match=r"folder 'Nope' not found"):
        deploy(vcsim_options(settings, vcsim, appliance_ova, "x", folder="Nope"), credentials, say=lambda _: None,
               progress=False)
    with pytest.raises(PlacementError, match=r"resource pool 'gold' not found.*'Resources'"):
        deploy(vcsim_options(settings, vcsim, appliance_ova, "x", resource_pool="gold"), credentials,
               say=lambda _: None, progress=False)


def test_host_placement_uses_the_hosts_pool_and_host(settings, vcsim, si, credentials, appliance_ova):
    with pytest.raises(PlacementError, match=r"host 'esx9' not found in datacenter 'DC0'.*'DC0_C0_H1'.*'DC0_H0'"):
        deploy(vcsim_options(settings, vcsim, appliance_ova, "x", host="esx9", cluster=None), credentials,
               say=lambda _: None, progress=False)
    options = vcsim_options(settings, vcsim, appliance_ova, "appliance-host", host="DC0_H0", cluster=None)
    result = deploy(options, credentials, say=lambda _: None, progress=False)
    vm = vm_named(si, "appliance-host")
    assert vm._moId == result.vm_id
    assert vm.runtime.host.name == "DC0_H0"
    assert vm.resourcePool == vm.runtime.host.parent.resourcePool


def test_ovf_folder_without_a_property_warns_and_strict_refuses(settings, vcsim, si, credentials, appliance_ova,
                                                                tmp_path):
    folder = tmp_path / "ovf"
    with tarfile.open(appliance_ova) as tar:
        tar.extractall(folder, filter="data")
    descriptor = next(folder.glob("*.ovf"))
    text, removed = re.subn(r'\s*<ovf:Property ovf:key="dns".*?</ovf:Property>', "", descriptor.read_text(),
                            flags=re.DOTALL)
    assert removed == 1
    descriptor.write_text(text)
    manifest = next(folder.glob("*.mf"))
    digest = hashlib.sha256(descriptor.read_bytes()).hexdigest()
    manifest.write_text(re.sub(rf"(SHA256\({re.escape(descriptor.name)}\)= )[0-9a-f]+", rf"\g<1>{digest}",
                               manifest.read_text()))

    with pytest.raises(ImportSpecError, match=r"--strict.*no OVF property 'dns'"):
        deploy(vcsim_options(settings, vcsim, folder, "appliance-strict", strict=True), credentials,
               say=lambda _: None, progress=False)
    assert vm_named(si, "appliance-strict") is None

    lines: list[str] = []
    deploy(vcsim_options(settings, vcsim, folder, "appliance-folder"), credentials, say=lines.append,
           progress=False)
    assert any(line.startswith("warning: the OVA has no OVF property 'dns'") for line in lines)
    environment = ET.fromstring(_extra(vm_named(si, "appliance-folder"))[OVF_ENV_KEY])
    keys = {p.get(f"{{{ENV_NS}}}key") for p in environment.iter(f"{{{ENV_NS}}}Property")}
    assert "appliance.ip" in keys and "appliance.dns" not in keys


def test_duplicate_name_is_refused_unless_replace(settings, vcsim, si, credentials, appliance_ova):
    existing = vm_named(si, "DC0_C0_RP0_VM0")  # one of vcsim's own VMs
    assert existing is not None
    options = vcsim_options(settings, vcsim, appliance_ova, "DC0_C0_RP0_VM0")
    with pytest.raises(DuplicateVmError, match="--replace"):
        deploy(options, credentials, say=lambda _: None, progress=False)
    assert vm_named(si, "DC0_C0_RP0_VM0")._moId == existing._moId

    replaced = deploy(vcsim_options(settings, vcsim, appliance_ova, "DC0_C0_RP0_VM0", replace=True), credentials,
                      say=lambda _: None, progress=False)
    now = vm_named(si, "DC0_C0_RP0_VM0")
    assert now._moId == replaced.vm_id != existing._moId
    assert now.config.hardware.numCPU == 8


def test_replace_whose_import_fails_keeps_the_existing_vm(settings, vcsim, si, credentials, appliance_ova):
    """--replace removes the old VM only once the new one is imported: an import cut off
    midway must leave the existing appliance as it was (and no half-imported one)."""
    existing = deploy(vcsim_options(settings, vcsim, appliance_ova, "appliance-kept"), credentials,
                      say=lambda _: None, progress=False)
    proxy = FaultyProxy(upstream=(vcsim.host, vcsim.port), cut_after=1 * 2**20)
    lines: list[str] = []
    try:
        with pytest.raises(UploadError):
            deploy(vcsim_options(settings, vcsim, appliance_ova, "appliance-kept", replace=True,
                                 vcenter=proxy.address), credentials, say=lines.append, progress=False,
                   abort_grace=0.5)
    finally:
        proxy.close()
    assert vm_named(si, "appliance-kept")._moId == existing.vm_id
    assert not any("removing the existing VM" in line for line in lines)
    view = si.content.viewManager.CreateContainerView(si.content.rootFolder, [vim.VirtualMachine], True)
    assert not [vm.name for vm in view.view if vm.name.startswith("appliance-kept.replacing-")]


def test_tampered_ova_stops_before_vcenter_is_contacted(settings, tmp_path, credentials, appliance_ova, vcsim):
    tampered = tmp_path / "tampered.ova"
    shutil.copy(appliance_ova, tampered)
    with open_package(tampered) as package:
        disk = next(m for m in package.member_list if m.name.endswith(".vmdk"))
    with tampered.open("r+b") as fh:  # flip bytes inside the first disk's data, keeping the size
        fh.seek(disk.data_offset + disk.size // 2)
        chunk = fh.read(16)
        fh.seek(disk.data_offset + disk.size // 2)
        fh.write(bytes(b ^ 0xFF for b in chunk))

    listener = socket.create_server(("127.0.0.1", 0))  # stands where vCenter would be; counts connections
    listener.settimeout(0.2)
    options = vcsim_options(settings, vcsim, tampered, "appliance-tampered",
                            vcenter=f"127.0.0.1:{listener.getsockname()[1]}")
    with pytest.raises(VerificationError, match="manifest"):
        deploy(options, credentials, say=lambda _: None, progress=False)
    with pytest.raises(TimeoutError):
        listener.accept()
    listener.close()


def test_failure_mid_upload_aborts_the_lease_and_leaves_no_vm(settings, vcsim, si, credentials, appliance_ova):
    proxy = FaultyProxy(upstream=(vcsim.host, vcsim.port), cut_after=1 * 2**20)
    lines: list[str] = []
    options = vcsim_options(settings, vcsim, appliance_ova, "appliance-cut", vcenter=proxy.address)
    try:
        with pytest.raises(UploadError, match=r"failed after \d+ of \d+ bytes") as caught:
            deploy(options, credentials, say=lines.append, progress=False, abort_grace=0.5)
    finally:
        proxy.close()
    assert proxy.cuts >= 1
    assert "disk1.vmdk" in str(caught.value)
    assert vm_named(si, "appliance-cut") is None
    lease_id = next(m.group(1) for line in lines if (m := re.match(r"aborted import lease (\S+)", line)))
    # vcsim drops an aborted lease from its NFC endpoint: a POST to it is now refused.
    import http.client
    import ssl

    connection = http.client.HTTPSConnection(vcsim.host, vcsim.port,
                                             context=ssl.create_default_context(cafile=str(vcsim.ca_file)))
    connection.request("POST", f"/nfc/{lease_id}/disk-0.vmdk", body=b"x")
    assert connection.getresponse().status == 404

    rerun = deploy(vcsim_options(settings, vcsim, appliance_ova, "appliance-cut"), credentials,
                   say=lambda _: None, progress=False)  # a rerun after the failure works
    assert vm_named(si, "appliance-cut")._moId == rerun.vm_id


def test_power_on_and_wait_for_the_ip_vmware_tools_reports(settings, vcsim, si, credentials, appliance_ova):
    def guest_reports_ip() -> None:
        # Plays VMware Tools in the guest: vcsim lets "SET.guest.ipAddress" stand for what Tools reports.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            vm = vm_named(si, "appliance-on")
            if vm is not None and vm.runtime.powerState == "poweredOn":
                spec = vim.vm.ConfigSpec(extraConfig=[vim.option.OptionValue(key="SET.guest.ipAddress",
                                                                             value="10.0.0.5")])
                vm.ReconfigVM_Task(spec)
                return
            time.sleep(0.2)

    guest = threading.Thread(target=guest_reports_ip)
    guest.start()
    lines: list[str] = []
    result = deploy(vcsim_options(settings, vcsim, appliance_ova, "appliance-on", power_on=True, wait_ip=True,
                                  ip_timeout=30), credentials, say=lines.append, progress=False)
    guest.join()
    assert (result.address, result.address_reported, result.powered_on) == ("10.0.0.5", True, True)
    assert vm_named(si, "appliance-on").runtime.powerState == "poweredOn"
    assert "control (configuration server): https://10.0.0.5:443/" in lines


def test_wait_ip_times_out_with_the_vm_kept(settings, vcsim, si, credentials, appliance_ova):
    options = vcsim_options(settings, vcsim, appliance_ova, "appliance-noip", power_on=True, wait_ip=True,
                            ip_timeout=1)
    with pytest.raises(GuestIpTimeout, match="no IPv4 address within 1s"):
        deploy(options, credentials, say=lambda _: None, progress=False)
    assert vm_named(si, "appliance-noip").runtime.powerState == "poweredOn"
