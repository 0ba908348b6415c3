"""Helpers for deploy tests (fixtures are in conftest.py)."""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from appliance_build.deploy.options import DeployOptions, Flags, options_from
from appliance_build.settings import Settings
from tests.fixtures.vcsim import Vcsim


def make_vmdk(path: Path, data: bytes, virtual_size: int = 64 * 2**20) -> Path:
    raw = path.with_suffix(".raw")
    with raw.open("wb") as fh:
        fh.write(data)
        fh.truncate(virtual_size)
    subprocess.run(["qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", str(raw), str(path)],
                   check=True, capture_output=True)
    raw.unlink()
    return path


def vcsim_flags(vcsim: Vcsim, ova: Path, name: str, **overrides: Any) -> Flags:
    """Flags for vcsim's default inventory: DC0, cluster DC0_C0, LocalDS_0, 'VM Network'."""
    values: dict[str, Any] = dict(vcenter=vcsim.address, ova=str(ova), name=name, datacenter="DC0",
                                  cluster="DC0_C0", datastore="LocalDS_0", network="VM Network",
                                  ca_file=str(vcsim.ca_file))
    values.update(overrides)
    return Flags(**values)


def vcsim_options(settings: Settings, vcsim: Vcsim, ova: Path, name: str, **overrides: Any) -> DeployOptions:
    return options_from(settings, vcsim_flags(vcsim, ova, name, **overrides))


def vm_named(si: Any, name: str) -> Any | None:
    from appliance_build.deploy.placement import find_vm

    content = si.RetrieveContent()
    datacenter = next(dc for dc in content.rootFolder.childEntity if dc.name == "DC0")
    return find_vm(content, datacenter, name)
