"""Delete the answer-file CD that a vsphere-iso build leaves on the datastore.

vsphere-iso uploads the image it makes from cd_files (autounattend.xml, which holds the
administrator password) to `[datastore] packer_cache/` and deletes it itself only when the
build fails or is cancelled. build-ova reads the upload from Packer's output and deletes the
image after every build.
"""
from __future__ import annotations

import re
import time
from collections.abc import Iterable
from typing import Any

from .deploy.connection import Credentials, vcenter_session
from .deploy.options import TlsOptions, VcenterAddress

# Packer names the image it makes from cd_files packer<digits>.iso; an ISO it caches from
# iso_url is named by its checksum, and is left alone.
_UPLOAD_RE = re.compile(r"Uploading (packer\d+\.iso) to packer_cache/\1")
TASK_TIMEOUT = 120.0  # seconds for vCenter to delete one file


class CdUploads:
    """The cd_files images Packer reports uploading, collected from its output lines."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def see(self, line: str) -> None:
        for name in _UPLOAD_RE.findall(line):
            if name not in self.names:
                self.names.append(name)


def datastore_path(datastore: str, name: str) -> str:
    return f"[{datastore}] packer_cache/{name}"


def delete_cd_images(address: VcenterAddress, credentials: Credentials, tls: TlsOptions, datacenter: str,
                     datastore: str, names: Iterable[str]) -> list[str]:
    """Delete each uploaded image; returns, for each one left behind, its path and why."""
    from pyVmomi import vim, vmodl

    from .deploy.placement import named_objects

    paths = [datastore_path(datastore, name) for name in names]
    left: list[str] = []
    handled: list[str] = []
    try:
        with vcenter_session(address, credentials, tls) as si:
            content = si.RetrieveContent()
            found = [obj for name, obj in named_objects(content, content.rootFolder, vim.Datacenter)
                     if name == datacenter]
            if not found:
                return [f"{path}: vCenter has no datacenter {datacenter!r}" for path in paths]
            for path in paths:
                try:
                    fault = _task_fault(content, content.fileManager.DeleteDatastoreFile_Task(
                        name=path, datacenter=found[0]))
                except vmodl.MethodFault as exc:
                    fault = exc
                # FileNotFound: Packer deleted it itself (a failed or cancelled build).
                if fault is not None and not isinstance(fault, vim.fault.FileNotFound):
                    left.append(f"{path}: {fault.msg or type(fault).__name__}")
                handled.append(path)
    except Exception as exc:  # noqa: BLE001 - it runs in a finally after the build: it reports, never raises
        left += [f"{path}: {exc}" for path in paths if path not in handled]
    return left


def _task_fault(content: Any, task: Any, timeout: float = TASK_TIMEOUT) -> Any:
    """Wait for `task`; its fault, or None on success. Reads only the state and the fault: a
    whole TaskInfo need not deserialize (vcsim gives this task an entity pyVmomi refuses)."""
    from pyVmomi import vim, vmodl

    collector = vmodl.query.PropertyCollector
    spec = collector.FilterSpec(objectSet=[collector.ObjectSpec(obj=task)],
                                propSet=[collector.PropertySpec(type=vim.Task, pathSet=["info.state", "info.error"])])
    deadline = time.monotonic() + timeout
    while True:
        found = {p.name: p.val for p in content.propertyCollector.RetrieveContents([spec])[0].propSet}
        if found["info.state"] == vim.TaskInfo.State.success:
            return None
        if found["info.state"] == vim.TaskInfo.State.error:
            return found.get("info.error") or vmodl.MethodFault(msg="the task failed without saying why")
        if time.monotonic() > deadline:
            return vmodl.MethodFault(msg=f"not done after {timeout:.0f} s")
        time.sleep(0.2)
