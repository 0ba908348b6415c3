"""Find where the VM goes, by name; when a name is not found, say which ones exist."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import PlacementError
from .options import Placement

T = TypeVar("T")


@dataclass(frozen=True)
class Target:
    """The resolved managed objects of a Placement."""
    datacenter: Any
    compute: Any  # ClusterComputeResource or ComputeResource
    host: Any | None
    resource_pool: Any
    datastore: Any
    folder: Any
    network: Any


def pick(kind: str, wanted: str, candidates: Iterable[tuple[str, T]], where: str, flag: str) -> T:
    """The candidate named `wanted`, else PlacementError listing the names that exist."""
    found: dict[str, T] = {}
    for name, obj in candidates:
        found.setdefault(name, obj)  # vCenter lists a DVS portgroup once per host: keep one
    if wanted in found:
        return found[wanted]
    names = ", ".join(repr(n) for n in sorted(found)) or "none"
    raise PlacementError(f"{kind} {wanted!r} not found in {where}; {flag} must be one of: {names}")


def named_objects(content: Any, root: Any, vim_type: Any) -> list[tuple[str, Any]]:
    """(name, object) of every `vim_type` below `root`, in one PropertyCollector call."""
    from pyVmomi import vim, vmodl

    collector = vmodl.query.PropertyCollector
    view = content.viewManager.CreateContainerView(root, [vim_type], True)
    try:
        traversal = collector.TraversalSpec(name="view", path="view", skip=False, type=vim.view.ContainerView)
        spec = collector.FilterSpec(
            objectSet=[collector.ObjectSpec(obj=view, skip=True, selectSet=[traversal])],
            propSet=[collector.PropertySpec(type=vim_type, pathSet=["name"])],
        )
        return [(item.propSet[0].val, item.obj) for item in content.propertyCollector.RetrieveContents([spec])]
    finally:
        view.Destroy()


def resolve(content: Any, placement: Placement) -> Target:
    from pyVmomi import vim

    if not placement.cluster and not placement.host:
        raise PlacementError("give --cluster or --host (or set deploy.cluster in the inventory)")
    datacenter = pick("datacenter", placement.datacenter, named_objects(content, content.rootFolder, vim.Datacenter),
                      "vCenter", "--datacenter")
    in_dc = f"datacenter {datacenter.name!r}"
    computes = named_objects(content, datacenter.hostFolder, vim.ComputeResource)
    host = None
    if placement.cluster:
        compute = pick("cluster", placement.cluster,
                       ((n, c) for n, c in computes if isinstance(c, vim.ClusterComputeResource)), in_dc, "--cluster")
    if placement.host:
        scope = [compute] if placement.cluster else [c for _, c in computes]
        host = pick("host", placement.host, ((h.name, h) for c in scope for h in c.host),
                    f"cluster {placement.cluster!r}" if placement.cluster else in_dc, "--host")
        compute = host.parent

    pool = compute.resourcePool
    if placement.resource_pool:
        root = compute.resourcePool
        pools = [(root.name, root)] + named_objects(content, root, vim.ResourcePool)
        pool = pick("resource pool", placement.resource_pool,
                    ((n, p) for n, p in pools if not isinstance(p, vim.VirtualApp)),
                    f"{compute.name!r}", "--resource-pool")

    reach = host or compute
    reach_name = f"{'host' if host else 'cluster'} {reach.name!r}"
    datastore = pick("datastore", placement.datastore, ((d.name, d) for d in reach.datastore
                                                          if d.summary.accessible), reach_name, "--datastore")
    network = pick("network", placement.network, ((n.name, n) for n in reach.network), reach_name, "--network")
    folder = _folder(datacenter, placement.folder)
    return Target(datacenter, compute, host, pool, datastore, folder, network)


def _folder(datacenter: Any, path: str) -> Any:
    """`A/B` below the datacenter's VM folder; "" is the VM folder itself."""
    from pyVmomi import vim

    folder = datacenter.vmFolder
    walked = []
    for part in [p for p in path.split("/") if p]:
        children = [(c.name, c) for c in folder.childEntity if isinstance(c, vim.Folder)]
        where = f"VM folder {'/'.join(walked) or '(root)'} of datacenter {datacenter.name!r}"
        folder = pick("folder", part, children, where, "--folder")
        walked.append(part)
    return folder


def find_vm(content: Any, datacenter: Any, name: str) -> Any | None:
    """The VM (or template) named `name` anywhere in the datacenter's VM folders."""
    from pyVmomi import vim

    return next((vm for vm_name, vm in named_objects(content, datacenter.vmFolder, vim.VirtualMachine)
                 if vm_name == name), None)
