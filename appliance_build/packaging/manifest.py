"""manifest.json (versions and SHA-256 of every file of a package) and dist/SHA256SUMS."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .wheels import sha256_file

SUMS_NAME = "SHA256SUMS"
_ARTIFACT_SUFFIXES = (".zip", ".tar.gz")  # the installer artifacts; the OVA has its own .sha256


def wheel_record(filename: str) -> dict[str, str]:
    """name, version and tags from a wheel file name (PEP 427: name-ver[-build]-py-abi-plat.whl)."""
    parts = filename[:-len(".whl")].split("-")
    return {"name": parts[0], "version": parts[1], "python": parts[-3], "abi": parts[-2], "platform": parts[-1]}


def build_manifest(product: str, version: str, files: dict[str, Path], extra: dict[str, Any]) -> str:
    entries = {name: {"sha256": sha256_file(src), "size": src.stat().st_size} for name, src in sorted(files.items())}
    wheels = [dict(file=name.split("/")[-1], **wheel_record(name.split("/")[-1]))
              for name in sorted(files) if name.endswith(".whl")]
    document = {"product": product, "version": version, **extra, "wheels": wheels, "files": entries}
    return json.dumps(document, indent=1, sort_keys=True) + "\n"


def write_sha256sums(dist: Path) -> Path:
    """SHA256SUMS for every artifact in dist/ (`sha256sum -c` format), rewritten whole."""
    lines = [f"{sha256_file(p)}  {p.name}\n" for p in sorted(dist.iterdir())
             if p.is_file() and p.name.endswith(_ARTIFACT_SUFFIXES)]
    path = dist / SUMS_NAME
    path.write_text("".join(lines))
    return path
