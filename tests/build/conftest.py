"""Fixtures for the build tests: real streamOptimized VMDKs made with qemu-img."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from appliance_build.settings import load_settings


def make_vmdk(directory: Path, name: str, content: bytes, virtual_size: str | None = None) -> Path:
    """A real streamOptimized VMDK holding `content` at its start (qemu-img convert from raw)."""
    if shutil.which("qemu-img") is None:
        pytest.fail("qemu-img is not installed (Debian: qemu-utils); ./bootstrap.sh installs it")
    raw = directory / f"{name}.raw"
    raw.write_bytes(content)
    if virtual_size:
        subprocess.run(["qemu-img", "resize", "-f", "raw", str(raw), virtual_size], check=True, capture_output=True)
    vmdk = directory / f"{name}.vmdk"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
                    str(raw), str(vmdk)], check=True, capture_output=True)
    raw.unlink()
    return vmdk


def disk_content(seed: int, size: int = 4 * 1024 * 1024) -> bytes:
    """Mixed content: text, zeros and pseudo-random bytes, like a real disk."""
    import random

    rng = random.Random(seed)
    text = (f"appliance disk {seed} " * 64).encode()
    parts = [text, b"\0" * 65536, rng.randbytes(size // 2)]
    data = b"".join(parts)
    return (data * (size // len(data) + 1))[:size]


@pytest.fixture(scope="session")
def vmdks(tmp_path_factory) -> list[Path]:
    directory = tmp_path_factory.mktemp("vmdks")
    return [make_vmdk(directory, role, disk_content(n)) for n, role in enumerate(("os", "cache", "retention"))]


@pytest.fixture(scope="session")
def local_settings():
    return load_settings("local")


@pytest.fixture
def rendered_local(tmp_path, monkeypatch) -> Path:
    """The local (qemu) inventory rendered as `invoke render` does, for the Packer found here."""
    from appliance_build import render
    from appliance_build.packer import detect_packer_version

    version = detect_packer_version()
    if version is None:
        pytest.fail("packer is not installed (Debian: apt-get install packer); ./bootstrap.sh installs it")
    monkeypatch.setattr(render, "BUILD_ROOT", tmp_path)
    return render.write_rendered(load_settings("local"), version)
