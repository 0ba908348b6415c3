"""Wheels for offline installs: the appliance wheel (built reproducibly) and its dependencies.

Dependency wheels are pinned by a lock per (dependency set, platform) kept in the repository:
file name and SHA-256 of every wheel. A build downloads what its cache lacks and checks every
hash, so two builds of one commit ship the same wheels. When the dependencies in
appliance_src/pyproject.toml change, the lock is resolved again and rewritten (commit it).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..errors import PreflightError
from ..version import REPO_ROOT

APPLIANCE_SRC = REPO_ROOT / "appliance_src"
LOCK_DIR = Path(__file__).resolve().parent / "locks"
DEFAULT_CACHE = REPO_ROOT / "build" / "wheel-cache"
TARGET_PYTHON = "3.11"  # the Python the bundle installs on Windows and the agents need on Linux

_SKIP_PARTS = {"__pycache__", "build", "dist"}


@dataclass(frozen=True)
class Platform:
    """A wheel platform as pip download understands it."""

    name: str
    pip_platforms: tuple[str, ...]
    python_version: str = TARGET_PYTHON

    @property
    def abi(self) -> str:
        return "cp" + self.python_version.replace(".", "")


WINDOWS_X64 = Platform("win_amd64", ("win_amd64",))
LINUX_X64 = Platform("linux_x86_64", ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                                      "manylinux1_x86_64", "linux_x86_64"))


@dataclass(frozen=True)
class LockedWheel:
    filename: str
    sha256: str

    @property
    def name(self) -> str:
        return canonical_name(self.filename.split("-")[0])

    @property
    def version(self) -> str:
        return self.filename.split("-")[1]


def canonical_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def appliance_dependencies(source: Path = APPLIANCE_SRC) -> list[str]:
    with (source / "pyproject.toml").open("rb") as fh:
        return list(tomllib.load(fh)["project"]["dependencies"])


def select_dependencies(requirements: list[str], names: tuple[str, ...]) -> list[str]:
    """The requirement lines (with their version ranges) of the named distributions only."""
    wanted = {canonical_name(n) for n in names}
    chosen = [r for r in requirements if canonical_name(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]) in wanted]
    missing = wanted - {canonical_name(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]) for r in chosen}
    if missing:
        raise PreflightError(f"appliance_src/pyproject.toml does not list {', '.join(sorted(missing))}, "
                             "which the Mobility agent needs")
    return chosen


def build_appliance_wheel(out_dir: Path, epoch: int, version: str | None = None,
                          source: Path = APPLIANCE_SRC) -> Path:
    """Build replication_appliance's wheel from a clean copy of its source (version overridable)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="appliance-src-") as tmp:
        copy = Path(tmp) / "src"
        _copy_source(source, copy)
        if version is not None:
            _set_version(copy / "pyproject.toml", version)
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch), "PYTHONHASHSEED": "0"}
        wheel_dir = Path(tmp) / "wheel"
        # The build tools of this environment when they can make wheels (the same tools every
        # time: reproducible); otherwise pip fetches the backend pyproject.toml asks for.
        isolation = [] if _can_build_wheels() else ["--use-pep517"]
        no_isolation = ["--no-build-isolation"] if not isolation else []
        result = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", *no_isolation, *isolation, "--no-cache-dir",
             "--quiet", "--wheel-dir", str(wheel_dir), str(copy)],
            capture_output=True, text=True, env=env, check=False)
        built = sorted(wheel_dir.glob("*.whl"))
        if result.returncode != 0 or len(built) != 1:
            raise PreflightError(f"building the appliance wheel failed:\n{result.stderr.strip()[-2000:]}")
        target = out_dir / built[0].name
        shutil.copyfile(built[0], target)
        return target


def dependency_wheels(set_name: str, requirements: list[str], platform: Platform,
                      cache_dir: Path = DEFAULT_CACHE) -> list[Path]:
    """The dependency wheels of `requirements` for `platform`, pinned by the lock, from the cache."""
    lock_path = LOCK_DIR / f"{set_name}-{platform.name}-cp{platform.python_version.replace('.', '')}.json"
    fingerprint = _fingerprint(requirements, platform)
    locked = _read_lock(lock_path, fingerprint)
    if locked is None:
        locked = _resolve(requirements, platform, cache_dir)
        _write_lock(lock_path, fingerprint, requirements, locked)
        print(f"resolved {len(locked)} wheels for {platform.name} and wrote {lock_path.relative_to(REPO_ROOT)} "
              "(commit it)", file=sys.stderr)
    return _fetch(locked, platform, cache_dir)


def _can_build_wheels() -> bool:
    """setuptools builds wheels itself from 70.1 on; before that it needs the `wheel` package."""
    import importlib.metadata
    import importlib.util

    try:
        version = tuple(int(p) for p in importlib.metadata.version("setuptools").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return version >= (70, 1) or importlib.util.find_spec("wheel") is not None


def _copy_source(source: Path, dest: Path) -> None:
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if path.is_dir() or set(rel.parts) & _SKIP_PARTS or any(p.endswith(".egg-info") for p in rel.parts) \
                or path.suffix in (".pyc", ".pyo"):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        target.chmod(0o644)


def _set_version(pyproject: Path, version: str) -> None:
    text = pyproject.read_text(encoding="utf-8")
    new, count = re.subn(r'(?m)^version\s*=\s*"[^"]*"', f'version = "{version}"', text, count=1)
    if count != 1:
        raise PreflightError(f"{pyproject} has no version line to override")
    pyproject.write_text(new, encoding="utf-8")


def _fingerprint(requirements: list[str], platform: Platform) -> str:
    data = json.dumps([sorted(requirements), platform.pip_platforms, platform.python_version])
    return hashlib.sha256(data.encode()).hexdigest()


def _read_lock(path: Path, fingerprint: str) -> list[LockedWheel] | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("fingerprint") != fingerprint:
        return None
    return [LockedWheel(w["filename"], w["sha256"]) for w in data["wheels"]]


def _write_lock(path: Path, fingerprint: str, requirements: list[str], wheels: list[LockedWheel]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"fingerprint": fingerprint, "requirements": sorted(requirements),
            "wheels": [{"filename": w.filename, "sha256": w.sha256} for w in sorted(wheels, key=lambda w: w.filename)]}
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _pip_download(args: list[str], platform: Platform, dest: Path) -> None:
    platforms = [arg for p in platform.pip_platforms for arg in ("--platform", p)]
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", *platforms,
         "--python-version", platform.python_version, "--implementation", "cp", "--abi", platform.abi,
         "--abi", "abi3", "--abi", "none", "--dest", str(dest), *args],
        capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise PreflightError(f"pip download for {platform.name} failed (PyPI must be reachable to fill the "
                             f"wheel cache):\n{result.stderr.strip()[-2000:]}")


def _resolve(requirements: list[str], platform: Platform, cache_dir: Path) -> list[LockedWheel]:
    with tempfile.TemporaryDirectory(prefix="wheels-") as tmp:
        _pip_download(list(requirements), platform, Path(tmp))
        locked = []
        pool = cache_dir / platform.name
        pool.mkdir(parents=True, exist_ok=True)
        for wheel in sorted(Path(tmp).glob("*.whl")):
            shutil.copyfile(wheel, pool / wheel.name)
            locked.append(LockedWheel(wheel.name, sha256_file(wheel)))
        return locked


def _fetch(locked: list[LockedWheel], platform: Platform, cache_dir: Path) -> list[Path]:
    pool = cache_dir / platform.name
    pool.mkdir(parents=True, exist_ok=True)
    missing = [w for w in locked if not (pool / w.filename).is_file() or sha256_file(pool / w.filename) != w.sha256]
    if missing:
        with tempfile.TemporaryDirectory(prefix="wheels-") as tmp:
            reqs = Path(tmp) / "requirements.txt"
            reqs.write_text("".join(f"{w.name}=={w.version} --hash=sha256:{w.sha256}\n" for w in missing))
            _pip_download(["--no-deps", "--require-hashes", "-r", str(reqs)], platform, Path(tmp) / "dl")
            for w in missing:
                shutil.copyfile(Path(tmp) / "dl" / w.filename, pool / w.filename)
    paths = []
    for w in locked:
        if sha256_file(pool / w.filename) != w.sha256:
            raise PreflightError(f"{w.filename} in {pool} does not match the SHA-256 in the lock")
        paths.append(pool / w.filename)
    return paths
