r"""The physical-server installer bundle: dist/replication-appliance-installer-<version>.zip.

Layout inside the zip (one top folder named like the zip):
    Install-ReplicationAppliance.ps1   entry script (installer/windows/)
    Test-AppliancePrerequisites.ps1    prerequisite checker (installer/windows/)
    Install-PythonRuntime.ps1          Python runtime step, shared with the agent (installer/windows/)
    README.md                          operator README (installer/windows/)
    prerequisites.json                 the seed's requirement rows and thresholds, for the checker
    setup/<Verb-Noun>.ps1              the Windows setup steps, copied from roles/*/files/ (the
                                       same files the Ansible roles run: one source of truth)
    wheels/*.whl                       the appliance wheel and every dependency, win_amd64 cp311
    agent-packages/                    the Mobility agent packages of the same version (Linux and
                                       Windows) and their SHA256SUMS, for push installs
    runtime/python-<v>-amd64.exe       only when a local copy was given; else downloaded and checked
    runtime/WinSW-x64.exe              the service wrapper, when a local copy was given; else the
                                       operator puts it in C:\Temp\ASRSetup (it is never downloaded)
    manifest.json                      versions and SHA-256 of every other file
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import PreflightError
from ..settings import (
    MIN_CACHE_GB,
    MIN_CPUS,
    MIN_MEMORY_MB,
    MIN_RETENTION_GB,
    Settings,
    load_settings,
)
from ..version import APPLIANCE_VERSION, REPO_ROOT
from . import archive, wheels
from .manifest import build_manifest, write_sha256sums

INSTALLER_DIR = REPO_ROOT / "installer" / "windows"
ROLES_DIR = REPO_ROOT / "roles"
BUNDLE_STEM = "replication-appliance-installer"
INSTALLER_FILES = ("Install-ReplicationAppliance.ps1", "Test-AppliancePrerequisites.ps1", "Install-PythonRuntime.ps1",
                   "README.md")


@dataclass(frozen=True)
class PinnedDownload:
    """A file the installer may download, pinned by size and SHA-256."""

    file: str
    version: str
    url: str
    sha256: str
    size: int


# python.org's Windows x64 installer of the last 3.11 binary release; the wheels target cp311.
PYTHON_RUNTIME = PinnedDownload(
    file="python-3.11.9-amd64.exe",
    version="3.11.9",
    url="https://www.python.org/ftp/python/3.11.9/python-3.11.9-amd64.exe",
    sha256="5ee42c4eee1e6b4464bb23722f90b45303f79442df63083f05322f1785f5fdde",
    size=26216840,
)


def bundle_path(dist: Path, version: str = APPLIANCE_VERSION) -> Path:
    return dist / f"{BUNDLE_STEM}-{version}.zip"


def setup_scripts(roles_dir: Path = ROLES_DIR) -> list[Path]:
    """Every Windows setup script of the Ansible roles, by file name (names are unique)."""
    scripts = sorted(roles_dir.glob("*/files/*.ps1"), key=lambda p: p.name)
    names = [p.name for p in scripts]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PreflightError(f"two roles ship a script of the same name: {', '.join(duplicates)}; "
                             "the bundle's setup/ folder needs unique names")
    return scripts


def check_python_runtime(path: Path) -> None:
    if not path.is_file():
        raise PreflightError(f"Python runtime {path} does not exist; give the path of {PYTHON_RUNTIME.file} "
                             "or leave --python-runtime out to have the installer download it")
    digest = wheels.sha256_file(path)
    if digest != PYTHON_RUNTIME.sha256:
        raise PreflightError(f"{path} is not {PYTHON_RUNTIME.file}: its SHA-256 is {digest}, "
                             f"the pinned one is {PYTHON_RUNTIME.sha256}")


def mysql_download_url(version: str, seed_installer_url: str) -> str:
    """The seed's MySQL Installer for 5.7.20, the server MSI for any other version (as the mysql role)."""
    if version == "5.7.20":
        return seed_installer_url
    major_minor = ".".join(version.split(".")[:2])
    return f"https://dev.mysql.com/get/Downloads/MySQL-{major_minor}/mysql-{version}-winx64.msi"


def prerequisites_document(settings: Settings) -> dict:
    """What the checker checks: the seed's rows with the numbers the settings module enforces."""
    from replication_appliance.requirements import requirement_rows, seed, time_source

    return {
        "rows": requirement_rows(),
        "thresholds": {
            "min_cpus": MIN_CPUS, "min_memory_mb": MIN_MEMORY_MB, "min_cache_gb": MIN_CACHE_GB,
            "min_retention_gb": MIN_RETENTION_GB, "min_dotnet_release": 393295,
            "os_builds": {"Windows Server 2016": 14393, "Windows Server 2012 R2": 9600},
            "locale": settings.windows.locale,
        },
        "ports": {"control": settings.ports.control, "data": settings.ports.data},
        "cloud": settings.cloud,
        "time_source": time_source(settings.cloud),
        "mysql": {"version": settings.mysql_version, "offline_dir": seed()["mysql_offline_dir"],
                  "download_url": mysql_download_url(settings.mysql_version, seed()["mysql_installer_url"])},
    }


def build_bundle(dist: Path, inventory: str = "local", python_runtime: Path | None = None,
                 service_wrapper: Path | None = None, cache_dir: Path = wheels.DEFAULT_CACHE,
                 version: str | None = None, roles_dir: Path = ROLES_DIR) -> Path:
    """Write the bundle zip and SHA256SUMS into `dist`; return the zip's path."""
    settings = load_settings(inventory)
    version = version or APPLIANCE_VERSION
    if python_runtime is not None:
        check_python_runtime(python_runtime)
    if service_wrapper is not None and not service_wrapper.is_file():
        raise PreflightError(f"service wrapper {service_wrapper} does not exist; give the path of WinSW-x64.exe "
                             "or leave --service-wrapper out (the operator then puts it in C:\\Temp\\ASRSetup)")
    for name in INSTALLER_FILES:
        if not (INSTALLER_DIR / name).is_file():
            raise PreflightError(f"installer file {INSTALLER_DIR / name} is missing")
    epoch = archive.source_date_epoch()
    top = f"{BUNDLE_STEM}-{version}"
    with tempfile.TemporaryDirectory(prefix="bundle-") as tmp:
        work = Path(tmp)
        appliance_wheel = wheels.build_appliance_wheel(work / "wheels", epoch, version=version)
        deps = wheels.dependency_wheels("appliance", wheels.appliance_dependencies(), wheels.WINDOWS_X64, cache_dir)
        files: dict[str, Path] = {name: INSTALLER_DIR / name for name in INSTALLER_FILES}
        files.update({f"setup/{p.name}": p for p in setup_scripts(roles_dir)})
        files.update({f"wheels/{p.name}": p for p in [appliance_wheel, *deps]})
        from .agent_packages import (
            build_agent_packages,  # it takes PYTHON_RUNTIME from this module
        )

        agents_dir = work / "agent-packages"
        build_agent_packages(agents_dir, cache_dir=cache_dir, version=version)
        files.update({f"agent-packages/{p.name}": p for p in sorted(agents_dir.iterdir())})
        if python_runtime is not None:
            files[f"runtime/{PYTHON_RUNTIME.file}"] = python_runtime
        if service_wrapper is not None:
            files["runtime/WinSW-x64.exe"] = service_wrapper
        prereqs = work / "prerequisites.json"
        prereqs.write_text(json.dumps(prerequisites_document(settings), indent=1, sort_keys=True) + "\n")
        files["prerequisites.json"] = prereqs
        manifest = build_manifest(
            product="replication-appliance", version=version, files=files,
            extra={"python_runtime": {**PYTHON_RUNTIME.__dict__, "bundled": python_runtime is not None},
                   "target": {"platform": wheels.WINDOWS_X64.name, "python": wheels.TARGET_PYTHON},
                   "entry_point": "Install-ReplicationAppliance.ps1"})
        manifest_path = work / "manifest.json"
        manifest_path.write_text(manifest)
        files["manifest.json"] = manifest_path
        dist.mkdir(parents=True, exist_ok=True)
        out = bundle_path(dist, version)
        archive.write_zip(out, [archive.Entry(f"{top}/{name}", src) for name, src in files.items()], epoch)
    write_sha256sums(dist)
    return out
