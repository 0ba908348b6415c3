"""`invoke deploy`: verify the OVA, import it into vCenter, optionally power on and wait for an IP.

Order matters: everything that can be checked is checked before anything is created, and
from ImportVApp on, any failure (Ctrl-C included) aborts the lease and removes the VM it made.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..ova.descriptor import ParsedDescriptor, parse_descriptor
from ..ova.package import OvaPackage, open_package
from ..progress import byte_progress
from ..settings import load_settings
from .connection import Credentials, read_credentials, vcenter_session
from .errors import (
    DeployError,
    DuplicateVmError,
    GuestIpTimeout,
    ImportSpecError,
    UploadError,
)
from .lease import (
    DeviceUrl,
    FileItem,
    LeaseKeeper,
    ServerDigest,
    Upload,
    manifest_mismatches,
    plan_uploads,
    upload,
    wait_until_ready,
)
from .options import DeployOptions, Flags, options_from
from .ovfenv import GUESTINFO_TRANSPORT, OVF_ENV_KEY, ovf_environment, plan_properties
from .placement import Target, find_vm, resolve

Say = Callable[[str], None]
ABORT_GRACE = 5.0  # seconds vCenter gets to remove an aborted import's VM before we do


@dataclass(frozen=True)
class DeployResult:
    vm_name: str
    vm_id: str
    address: str  # reported by VMware Tools with --wait-ip, else the static IP given to the guest
    address_reported: bool
    powered_on: bool
    warnings: tuple[str, ...]


def endpoints(address: str, control_port: int, data_port: int) -> list[str]:
    return [f"control (configuration server): https://{address}:{control_port}/",
            f"data (process server):          {address}:{data_port}"]


@dataclass(frozen=True)
class ImportPlan:
    spec: Any  # vim.ImportSpec, ready for ImportVApp
    file_items: list[FileItem]
    warnings: tuple[str, ...]


def deploy(options: DeployOptions, credentials: Credentials, say: Say = print, progress: bool | None = None,
           progress_interval: float = 5.0, abort_grace: float = ABORT_GRACE) -> DeployResult:
    """The whole deploy; raises a DeployError (or the OVA's VerificationError) that says what to do."""
    from ..ova.verify import verify_package

    # A bad OVA must stop here, before any call to vCenter.
    fingerprint = package_fingerprint(options.ova)
    report = verify_package(options.ova, progress=progress)
    report.raise_for_failures()
    say(f"verified {options.ova}: {len(report.checks)} checks passed")

    with open_package(options.ova) as package, \
            vcenter_session(options.vcenter, credentials, options.tls) as si:
        descriptor = parse_descriptor(package.descriptor_text)
        content = si.RetrieveContent()
        target = resolve(content, options.placement)
        existing = find_vm(content, target.datacenter, options.name)
        if existing is not None and not options.replace:
            raise DuplicateVmError(f"a VM named {options.name!r} already exists in datacenter "
                                   f"{target.datacenter.name!r}: choose another --name, or pass --replace to "
                                   f"delete it and deploy again")
        # With --replace the new VM is imported beside the old one under a name of its own, and
        # the old one is removed only once the import succeeded: a failed import keeps it.
        importing = options if existing is None else dataclasses.replace(
            options, name=f"{options.name}.replacing-{secrets.token_hex(3)}")
        plan = import_plan(content, package, descriptor, target, importing)
        for warning in plan.warnings:
            say(f"warning: {warning}")
        if plan.warnings and options.strict:
            raise ImportSpecError(f"{len(plan.warnings)} warning(s) and --strict was given: "
                                  + "; ".join(plan.warnings))
        vm = import_vm(content, package, target, plan, importing, fingerprint, say, progress, progress_interval,
                       abort_grace)
        if existing is not None:
            say(f"removing the existing VM {options.name!r} (--replace)")
            remove_vm(existing)
            run_task(vm.Rename_Task(newName=options.name),
                     f"rename {importing.name} to {options.name} (the new VM keeps the former name)")
        say(f"deployed VM {options.name!r} ({vm._moId}) on {target.compute.name}/{target.datastore.name}")

        address, reported = options.guest.ip, False
        if options.power_on:
            run_task(vm.PowerOnVM_Task(), f"power on {options.name}")
            say(f"powered on {options.name!r}")
            if options.wait_ip:
                say(f"waiting up to {options.ip_timeout:.0f}s for VMware Tools to report an IP address")
                address, reported = wait_for_ip(vm, options.ip_timeout), True
    for line in endpoints(address, options.control_port, options.guest.data_port):
        say(line)
    return DeployResult(options.name, vm._moId, address, reported, options.power_on, plan.warnings)


def deploy_from_flags(inventory: str, flags: Flags, say: Say = print) -> DeployResult:
    """`invoke deploy`: inventory defaults, flags over them, credentials from the environment or a prompt."""
    settings = load_settings(inventory)
    options = options_from(settings, flags)
    credentials = read_credentials(default_user=settings.builder.vsphere.get("username"))
    return deploy(options, credentials, say=say)


def import_plan(content: Any, package: OvaPackage, descriptor: ParsedDescriptor, target: Target,
                options: DeployOptions) -> ImportPlan:
    """CreateImportSpec with the network mapping, provisioning, properties and name; errors stop here."""
    from pyVmomi import vim

    properties = plan_properties(descriptor, options.guest.property_values())
    params = vim.OvfManager.CreateImportSpecParams(
        entityName=options.name,
        diskProvisioning=options.disk_provisioning,
        networkMapping=[vim.OvfManager.NetworkMapping(name=name, network=target.network)
                        for name in descriptor.networks],
        propertyMapping=[vim.KeyValue(key=k, value=v) for k, v in properties.values.items()],
        hostSystem=target.host,
    )
    try:
        result = content.ovfManager.CreateImportSpec(ovfDescriptor=package.descriptor_text.decode("utf-8"),
                                                     resourcePool=target.resource_pool,
                                                     datastore=target.datastore, cisp=params)
    except vim.fault.VimFault as exc:
        raise ImportSpecError(f"vCenter refused the OVF descriptor: {exc.msg}") from None
    if result.error:
        raise ImportSpecError("vCenter refused the OVF descriptor:\n  "
                              + "\n  ".join(_fault_message(e) for e in result.error))
    if result.importSpec is None:
        raise ImportSpecError("vCenter returned no import spec for the OVF descriptor (and no error)")
    _add_ovf_environment(result.importSpec.configSpec, descriptor, properties.values, content.about.fullName)
    warnings = properties.warnings + tuple(_fault_message(w) for w in result.warning or ())
    items = [FileItem(f.deviceId, f.path) for f in result.fileItem or ()]
    return ImportPlan(result.importSpec, items, warnings)


def _add_ovf_environment(config: Any, descriptor: ParsedDescriptor, values: dict[str, str], platform: str) -> None:
    """Give the guest its OVF environment through VMware Tools (guestinfo.ovfEnv).

    vCenter also regenerates it at power-on when the VM keeps its vApp options; writing it
    ourselves covers hosts and simulators that drop them, with the same content.
    """
    from pyVmomi import vim

    if config.vAppConfig is None:
        config.vAppConfig = vim.vApp.VmConfigSpec()
    transports = list(config.vAppConfig.ovfEnvironmentTransport or [])
    if GUESTINFO_TRANSPORT not in transports:
        config.vAppConfig.ovfEnvironmentTransport = transports + [GUESTINFO_TRANSPORT]
    extra = [o for o in config.extraConfig or [] if o.key != OVF_ENV_KEY]
    extra.append(vim.option.OptionValue(key=OVF_ENV_KEY, value=ovf_environment(descriptor, values, platform)))
    config.extraConfig = extra


def import_vm(content: Any, package: OvaPackage, target: Target, plan: ImportPlan, options: DeployOptions,
              fingerprint: tuple[tuple[str, int, int, int], ...], say: Say, progress: bool | None,
              progress_interval: float, abort_grace: float) -> Any:
    """ImportVApp, upload every disk, Complete; on any failure abort and leave no VM behind."""
    from pyVmomi import vmodl

    try:
        lease = target.resource_pool.ImportVApp(spec=plan.spec, folder=target.folder, host=target.host)
    except vmodl.MethodFault as exc:
        raise ImportSpecError(f"vCenter refused to import {options.name!r}: {exc.msg}") from None
    try:
        wait_until_ready(lease, options.lease_timeout)
        info = lease.info
        urls = [DeviceUrl(u.importKey, u.key, u.url, u.sslThumbprint or "") for u in info.deviceUrl]
        sizes = {item.path: package.member_size(item.path) for item in plan.file_items}
        uploads = plan_uploads(plan.file_items, urls, sizes, options.vcenter)
        _request_sha256_manifest(lease, uploads)
        keeper = LeaseKeeper(lease, sum(u.size for u in uploads), interval=progress_interval)
        for item in uploads:
            say(f"uploading {item.member} ({item.size / 2**20:.1f} MiB) to {item.host}")
            _upload_one(package, item, options, keeper, progress)
        if package_fingerprint(options.ova) != fingerprint:
            raise UploadError(f"{options.ova} changed while it was deployed: verify it again and rerun")
        _compare_server_manifest(lease, uploads, package, say)
        lease.Complete()
        return info.entity
    except BaseException as exc:
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        say(f"import {reason}: aborting the lease and removing the partial VM {options.name!r}")
        with _sigint_deferred():
            _abandon(lease, content, target, options.name, abort_grace, exc, say)
        raise


def _upload_one(package: OvaPackage, item: Upload, options: DeployOptions, keeper: LeaseKeeper,
                progress: bool | None) -> None:
    bar = byte_progress(item.size, item.member, enabled=progress)

    def on_bytes(n: int) -> None:
        bar.update(n)
        keeper.advance(n)

    try:
        with package.open_member(item.member) as source:
            upload(item, source, options.tls, on_bytes)
    finally:
        bar.close()


def package_fingerprint(path: Path) -> tuple[tuple[str, int, int, int], ...]:
    """Name, size, mtime and inode of the OVA (or every file of an OVF folder).

    The checks hashed every byte just before the upload; an unchanged fingerprint afterwards
    shows the bytes sent are the ones verified, without hashing them a second time.
    """
    if not path.exists():
        return ()  # verify-ova reports the missing package
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return tuple((f.name, st.st_size, st.st_mtime_ns, st.st_ino) for f in files for st in [f.stat()])


def _request_sha256_manifest(lease: Any, uploads: list[Upload]) -> None:
    """Ask for SHA-256 in the server's manifest (vSphere 6.7+), to compare with a SHA-256 .mf."""
    from pyVmomi import vim, vmodl

    try:
        lease.SetManifestChecksumType([vim.KeyValue(key=u.device_key, value="sha256") for u in uploads])
    except vmodl.MethodFault:
        pass  # older servers compute SHA-1 only; the comparison then covers SHA-1 .mf entries


def _compare_server_manifest(lease: Any, uploads: list[Upload], package: OvaPackage, say: Say) -> None:
    from pyVmomi import vmodl

    try:
        entries = lease.GetManifest() or []
    except vmodl.MethodFault:
        say("the server offers no manifest of the upload; the OVA sent is the one verified against its .mf")
        return
    member_of = {u.device_key: u.member for u in uploads}
    digests = [ServerDigest(member_of.get(e.key, e.key), (e.checksumType or "sha1"), e.checksum or e.sha1)
               for e in entries]
    mismatches, compared = manifest_mismatches(digests, package.manifest, package.manifest_algorithms)
    if mismatches:
        raise UploadError("vCenter received different bytes than the OVA's .mf lists:\n  " + "\n  ".join(mismatches))
    say(f"server manifest matches the .mf for {compared} of {len(uploads)} disk(s)")


def _abandon(lease: Any, content: Any, target: Target, name: str, grace: float, cause: BaseException,
             say: Say) -> None:
    """Abort the lease; then make sure the VM it created is gone (vCenter removes it, vcsim does not)."""
    from pyVmomi import vmodl

    try:
        lease.Abort(fault=vmodl.fault.SystemError(reason=str(cause) or type(cause).__name__))
    except Exception:  # noqa: BLE001 - the lease may already be gone (error state, timeout)
        pass
    else:
        say(f"aborted import lease {lease._moId}")
    deadline = time.monotonic() + grace
    while (vm := find_vm(content, target.datacenter, name)) is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    if vm is not None:
        remove_vm(vm)
    say(f"no VM {name!r} is left behind; fix the cause above and rerun the same command")


def remove_vm(vm: Any) -> None:
    """Power off (when on) and delete a VM with its disks."""
    name = vm.name
    if vm.runtime.powerState == "poweredOn":
        run_task(vm.PowerOffVM_Task(), f"power off {name}")
    run_task(vm.Destroy_Task(), f"delete {name}")


def run_task(task: Any, what: str) -> Any:
    from pyVim.task import WaitForTask
    from pyVmomi import vmodl

    try:
        WaitForTask(task)
    except vmodl.MethodFault as exc:
        raise DeployError(f"vCenter could not {what}: {exc.msg}") from None
    return task.info.result


def wait_for_ip(vm: Any, timeout: float, poll: float = 2.0) -> str:
    """The first IPv4 address VMware Tools reports (not link-local); GuestIpTimeout after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        address = guest_ipv4(vm.guest)
        if address:
            return address
        if time.monotonic() >= deadline:
            raise GuestIpTimeout(
                f"{vm.name} is deployed and powered on, but VMware Tools reported no IPv4 address within "
                f"{timeout:.0f}s: open its console to check first boot, the network mapping and the OVF IP "
                f"settings; the VM is kept")
        time.sleep(poll)


def guest_ipv4(guest: Any) -> str | None:
    candidates = [guest.ipAddress] if guest and guest.ipAddress else []
    for nic in (guest.net or []) if guest else []:
        candidates += list(nic.ipAddress or [])
    for text in candidates:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue
        if address.version == 4 and not address.is_link_local and not address.is_loopback:
            return text
    return None


@contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Let cleanup finish even if Ctrl-C is pressed again; the first Ctrl-C still ends the deploy."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _fault_message(fault: Any) -> str:
    return getattr(fault, "localizedMessage", None) or getattr(fault.fault, "msg", None) or type(fault.fault).__name__
