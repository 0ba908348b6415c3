"""Invoke tasks: the user manual of the build (`invoke --list`, `invoke --help TASK`).

Each task parses its options, calls one function of `appliance_build`, and turns a known
failure (BuildError) into a clean exit with its message.
"""
from __future__ import annotations

import shlex
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from invoke import Collection, Context, Exit, task

from appliance_build.errors import BuildError

INVENTORY_HELP = "inventory under inventory/ to use (default: local, the local KVM build)"


@contextmanager
def user_errors() -> Iterator[None]:
    """Show a BuildError as its message and exit 1, instead of a traceback."""
    try:
        yield
    except BuildError as exc:
        raise Exit(f"error: {exc}", code=1) from None
    except KeyboardInterrupt:
        raise Exit("interrupted", code=130) from None


def _inventory(c: Context, inventory: str | None) -> str:
    return inventory or c.config.get("appliance", {}).get("inventory", "local")


@task(help={"inventory": INVENTORY_HELP})
def render(c: Context, inventory: str | None = None) -> None:
    """Render the Packer template, answer file, first-boot scripts and Ansible vars into build/."""
    from appliance_build import render as rendering

    with user_errors():
        out = rendering.render_inventory(_inventory(c, inventory))
        print(f"rendered into {out}")


@task(help={"inventory": INVENTORY_HELP})
def validate(c: Context, inventory: str | None = None) -> None:
    """Render, then packer fmt/validate, ansible syntax-check + lint, and OVF checks."""
    from appliance_build import validate as validation

    with user_errors():
        validation.validate_all(_inventory(c, inventory))


@task(
    name="build-ova",
    help={
        "inventory": INVENTORY_HELP,
        "iso": "path of a local Windows Server 2016 ISO (default: the pinned evaluation ISO download)",
        "force": "overwrite an OVA of the same version already in dist/",
    },
)
def build_ova(c: Context, inventory: str | None = None, iso: str | None = None, force: bool = False) -> None:
    """The main job: build dist/<name>-<version>.ova (+ .sha256) with Packer and Ansible."""
    from appliance_build import build as building

    with user_errors():
        ova = building.build_ova(_inventory(c, inventory), iso=iso, force=force)
        print(f"built {ova}")


@task(
    name="assemble-ova",
    help={
        "disks": "comma-separated VMDKs in order: OS, cache, retention",
        "out": "OVA to write (default: dist/<name>-<version>.ova)",
        "inventory": INVENTORY_HELP,
    },
)
def assemble_ova(c: Context, disks: str, out: str | None = None, inventory: str | None = None) -> None:
    """Write an OVA (descriptor from the inventory, manifest, disks) from three VMDKs."""
    from appliance_build.ova import assemble

    with user_errors():
        path = assemble.assemble_from_inventory(_inventory(c, inventory), disks.split(","), out)
        print(f"wrote {path}")


@task(name="verify-ova", help={"ova": "OVA file (or folder with an .ovf) to check"})
def verify_ova(c: Context, ova: str) -> None:
    """Check any OVA against the OVF schema and the appliance requirements; print a table."""
    from appliance_build.ova import verify

    with user_errors():
        report = verify.verify_package(ova)
        print(report.table())
        report.raise_for_failures()


@task(help={"k": "only run tests matching this expression", "x": "stop at the first failure"})
def test(c: Context, k: str | None = None, x: bool = False) -> None:
    """Run the whole test suite (starts MariaDB, Azurite, vcsim and sshd on free loopback ports)."""
    args = ["python", "-m", "pytest"]
    if k:
        args += ["-k", k]
    if x:
        args.append("-x")
    result = c.run(shlex.join(args), warn=True, pty=False)
    # pytest exits 5 when no test ran: treat that as a failure, never as a pass.
    if result.exited != 0:
        raise Exit(f"tests failed (pytest exit {result.exited})", code=result.exited or 1)


@task(
    help={
        "inventory": INVENTORY_HELP,
        "python_runtime": "local copy of python-3.11.9-amd64.exe to put in the bundle "
                          "(default: the installer downloads it and checks its pinned SHA-256)",
        "service_wrapper": "local copy of WinSW-x64.exe to put in the bundle "
                           "(default: the operator places it in C:\\Temp\\ASRSetup)",
        "dist": "output folder (default: dist)",
    },
)
def bundle(c: Context, inventory: str | None = None, python_runtime: str | None = None,
           service_wrapper: str | None = None, dist: str = "dist") -> None:
    """Build dist/replication-appliance-installer-<version>.zip (+ SHA256SUMS) for physical servers."""
    from pathlib import Path

    from appliance_build.packaging import bundle as bundling

    with user_errors():
        out = bundling.build_bundle(Path(dist), inventory=_inventory(c, inventory),
                                    python_runtime=Path(python_runtime) if python_runtime else None,
                                    service_wrapper=Path(service_wrapper) if service_wrapper else None)
        print(f"built {out}")


@task(name="agent-packages", help={"dist": "output folder (default: dist)"})
def agent_packages(c: Context, dist: str = "dist") -> None:
    """Build dist/mobility-agent-<version>-windows.zip and -linux.tar.gz (+ SHA256SUMS)."""
    from pathlib import Path

    from appliance_build.packaging import agent_packages as packaging

    with user_errors():
        for out in packaging.build_agent_packages(Path(dist)):
            print(f"built {out}")


@task(
    auto_shortflags=False,  # 24 options: long names only, no surprising one-letter flags
    help={
        "vcenter": "vCenter: host, host:port or https://host[:port] (default: deploy.vcenter of the inventory)",
        "ova": "OVA file or folder with an .ovf (default: dist/<name>-<version>.ova)",
        "name": "VM name (default: appliance.name of the inventory)",
        "datacenter": "datacenter name (default: deploy.datacenter)",
        "cluster": "cluster name (default: deploy.cluster; not needed with --host)",
        "host": "ESXi host name, instead of or within the cluster",
        "resource_pool": "resource pool name (default: the cluster's or host's root pool)",
        "datastore": "datastore name (default: deploy.datastore)",
        "network": "vCenter network or portgroup the appliance's OVF network maps to (default: deploy.network)",
        "folder": "VM folder path below the datacenter, e.g. Infra/Appliances (default: deploy.folder)",
        "ip": "appliance IPv4 address, optionally with a prefix: 10.0.0.5/24 (default: network.ip/prefix)",
        "gateway": "default gateway (default: network.gateway)",
        "dns": "comma-separated DNS servers, 1 to 3 (default: network.dns)",
        "hostname": "Windows computer name, 15 characters at most (default: network.hostname)",
        "disk_provisioning": "thin, thick or eagerZeroedThick (default: deploy.disk_provisioning, thin)",
        "ca_file": "PEM file with the CA that signed vCenter's (and the ESXi hosts') certificates",
        "insecure": "do not verify vCenter's TLS certificate (only on a network you trust)",
        "replace": "delete an existing VM of the same name first (otherwise the deploy refuses)",
        "strict": "treat vCenter's import warnings as errors",
        "power_on": "power the VM on after the import",
        "wait_ip": "with --power-on: wait until VMware Tools reports an IP address",
        "ip_timeout": "seconds --wait-ip waits (default: 900)",
        "lease_timeout": "seconds to wait for vCenter's import lease to be ready (default: 300)",
        "inventory": INVENTORY_HELP,
    },
)
def deploy(c: Context, vcenter: str | None = None, ova: str | None = None, name: str | None = None,
           datacenter: str | None = None, cluster: str | None = None, host: str | None = None,
           resource_pool: str | None = None, datastore: str | None = None, network: str | None = None,
           folder: str | None = None, ip: str | None = None, gateway: str | None = None, dns: str | None = None,
           hostname: str | None = None, disk_provisioning: str | None = None, ca_file: str | None = None,
           insecure: bool = False, replace: bool = False, strict: bool = False, power_on: bool = False,
           wait_ip: bool = False, ip_timeout: str | None = None, lease_timeout: str | None = None,
           inventory: str | None = None) -> None:
    """Deploy the OVA into vCenter (VSPHERE_USER/VSPHERE_PASSWORD): verify, import, upload, power on."""
    from appliance_build.deploy import deployer
    from appliance_build.deploy.options import Flags

    with user_errors():
        deployer.deploy_from_flags(_inventory(c, inventory), Flags(
            vcenter=vcenter, ova=ova, name=name, datacenter=datacenter, cluster=cluster, host=host,
            resource_pool=resource_pool, datastore=datastore, network=network, folder=folder, ip=ip,
            gateway=gateway, dns=dns, hostname=hostname, disk_provisioning=disk_provisioning, ca_file=ca_file,
            insecure=insecure, replace=replace, strict=strict, power_on=power_on, wait_ip=wait_ip,
            ip_timeout=ip_timeout, lease_timeout=lease_timeout))


TASKS: list[Callable[..., Any]] = [
    render, validate, build_ova, assemble_ova, verify_ova, deploy, bundle, agent_packages, test,
]
ns = Collection(*TASKS)
