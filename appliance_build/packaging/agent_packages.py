"""Mobility agent packages: dist/mobility-agent-<version>-linux.tar.gz and -windows.zip.

Linux (`mobility-agent-<v>-linux/`): install.sh (check, install or upgrade under a prefix,
start/stop, uninstall), install_wheels.py (the venv and its wheels in one process, no pip), the
systemd unit (runs as root), wheels for manylinux x86_64 cp311 and manifest.json.
Windows (`mobility-agent-<v>-windows/`): Install-MobilityAgent.ps1, the service host, the shared
Python-runtime step, win_amd64 cp311 wheels and manifest.json. Both carry the appliance wheel
(the agent is `replication_appliance.agent`) with only the distributions the agent imports (and
theirs), so the target needs nothing but Python; Windows also gets pip as a wheel (its installer
runs it) and pywin32.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from ..version import APPLIANCE_VERSION, REPO_ROOT
from . import archive, wheels
from .bundle import PYTHON_RUNTIME
from .manifest import build_manifest, write_sha256sums

INSTALLER_DIR = REPO_ROOT / "installer"
# The distributions the agent imports (a subset of the appliance's; versions come from its pyproject).
# Only these: every wheel is copied, unpacked and written on every target (zstandard, which httpx
# would use if present, alone was 23 MB installed). tests/bundle/test_agent_install_script.py
# imports every agent module in the venv installed from the package, without the rest.
AGENT_DEPENDENCIES = ("cryptography", "httpx", "xxhash")
# Linux installs with install_wheels.py (no pip). Windows runs pip from its wheel to fill a venv
# made without pip, and pywin32 hosts the agent as a service (mobility_agent_service.py).
PLATFORM_REQUIREMENTS = {wheels.LINUX_X64.name: [], wheels.WINDOWS_X64.name: ["pip", "pywin32"]}

LINUX_FILES = {"install.sh": "agent/linux/install.sh", "install_wheels.py": "agent/linux/install_wheels.py",
               "mobility-agent.service": "agent/linux/mobility-agent.service"}
WINDOWS_FILES = {"Install-MobilityAgent.ps1": "agent/windows/Install-MobilityAgent.ps1",
                 "mobility_agent_service.py": "agent/windows/mobility_agent_service.py",
                 "Install-PythonRuntime.ps1": "windows/Install-PythonRuntime.ps1"}


def package_paths(dist: Path, version: str = APPLIANCE_VERSION) -> tuple[Path, Path]:
    return dist / f"mobility-agent-{version}-linux.tar.gz", dist / f"mobility-agent-{version}-windows.zip"


def agent_requirements(platform: wheels.Platform) -> list[str]:
    return (wheels.select_dependencies(wheels.appliance_dependencies(), AGENT_DEPENDENCIES)
            + PLATFORM_REQUIREMENTS[platform.name])


def build_agent_packages(dist: Path, cache_dir: Path = wheels.DEFAULT_CACHE, version: str | None = None) -> list[Path]:
    """Write both agent packages and SHA256SUMS into `dist`; `version` overrides the appliance's (tests)."""
    version = version or APPLIANCE_VERSION
    epoch = archive.source_date_epoch()
    linux_out, windows_out = package_paths(dist, version)
    dist.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="agent-packages-") as tmp:
        work = Path(tmp)
        appliance_wheel = wheels.build_appliance_wheel(work / "wheels", epoch, version=version)
        for platform, out, installer_files, writer, extra in (
            (wheels.LINUX_X64, linux_out, LINUX_FILES, archive.write_tar_gz, {}),
            (wheels.WINDOWS_X64, windows_out, WINDOWS_FILES, archive.write_zip,
             {"python_runtime": {**PYTHON_RUNTIME.__dict__, "bundled": False}}),
        ):
            deps = wheels.dependency_wheels("agent", agent_requirements(platform), platform, cache_dir)
            files = {name: INSTALLER_DIR / rel for name, rel in installer_files.items()}
            files.update({f"wheels/{p.name}": p for p in [appliance_wheel, *deps]})
            manifest_path = work / f"manifest-{platform.name}.json"
            manifest_path.write_text(build_manifest(
                product="mobility-agent", version=version, files=files,
                extra={"target": {"platform": platform.name, "python": wheels.TARGET_PYTHON}, **extra}))
            files["manifest.json"] = manifest_path
            top = out.name.removesuffix(".tar.gz").removesuffix(".zip")
            writer(out, [archive.Entry(f"{top}/{name}", src) for name, src in files.items()], epoch)
    write_sha256sums(dist)
    return [linux_out, windows_out]
