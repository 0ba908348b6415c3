"""Write an OVA: a USTAR tar with the .ovf first, then the .mf, then the disks, in one pass.

The manifest must precede the disks but holds their digests. Its size is known in advance
(one fixed-length line per file), so a placeholder is written, the disks are streamed and
hashed once, and the manifest's bytes are filled in at the end. Memory stays at one buffer.
The OVA appears under its final name only when complete: an interrupted write leaves nothing.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import OvaError
from ..progress import byte_progress

BLOCK = 512
RECORD = 20 * BLOCK
COPY_BUFFER = 1024 * 1024


@dataclass(frozen=True)
class DiskFile:
    name: str  # member name inside the OVA
    path: Path


def manifest_line(name: str, digest: str) -> str:
    return f"SHA256({name})= {digest}\n"


def write_ova(out: Path, descriptor_name: str, descriptor: bytes, manifest_name: str, disks: list[DiskFile],
              progress: bool | None = None) -> Path:
    """Write `out` atomically; returns it. Raises OvaError on bad names or I/O failure."""
    for name in [descriptor_name, manifest_name, *(d.name for d in disks)]:
        _check_member_name(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    names = [descriptor_name, *(d.name for d in disks)]
    manifest_size = sum(len(manifest_line(n, "0" * 64)) for n in names)
    total = sum(d.path.stat().st_size for d in disks)
    bar = byte_progress(total, f"writing {out.name}", progress)
    try:
        with partial.open("xb") as fh:
            digests = {descriptor_name: hashlib.sha256(descriptor).hexdigest()}
            _write_member(fh, descriptor_name, len(descriptor), mtime)
            fh.write(descriptor)
            _pad(fh, len(descriptor))
            _write_member(fh, manifest_name, manifest_size, mtime)
            manifest_offset = fh.tell()
            fh.write(b"\0" * manifest_size)
            _pad(fh, manifest_size)
            buffer = bytearray(COPY_BUFFER)
            view = memoryview(buffer)
            for disk in disks:
                size = disk.path.stat().st_size
                _write_member(fh, disk.name, size, mtime)
                digests[disk.name] = _copy_hashing(disk.path, fh, size, view, bar)
                _pad(fh, size)
            fh.write(b"\0" * (2 * BLOCK))
            end = fh.tell()
            if end % RECORD:
                fh.write(b"\0" * (RECORD - end % RECORD))
            manifest = "".join(manifest_line(n, digests[n]) for n in names).encode("ascii")
            assert len(manifest) == manifest_size
            fh.seek(manifest_offset)
            fh.write(manifest)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(partial, out)
    except BaseException as exc:
        partial.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OvaError(f"cannot write {out}: {exc.strerror or exc}") from None
        raise
    finally:
        bar.close()
    return out


def _copy_hashing(path: Path, fh, size: int, view: memoryview, bar) -> str:
    digest = hashlib.sha256()
    copied = 0
    with path.open("rb", buffering=0) as src:
        while True:
            n = src.readinto(view)
            if not n:
                break
            chunk = view[:n]
            digest.update(chunk)
            fh.write(chunk)
            copied += n
            bar.update(n)
    if copied != size:
        raise OvaError(f"{path} changed size while it was being written ({size} -> {copied} bytes)")
    return digest.hexdigest()


def _write_member(fh, name: str, size: int, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = 0o644
    info.uname = info.gname = ""
    fh.write(info.tobuf(format=tarfile.USTAR_FORMAT, encoding="ascii", errors="strict"))


def _pad(fh, size: int) -> None:
    if size % BLOCK:
        fh.write(b"\0" * (BLOCK - size % BLOCK))


def _check_member_name(name: str) -> None:
    if not name or len(name) > 99 or "/" in name or not name.isascii() or not name.isprintable():
        raise OvaError(f"member name {name!r} is not allowed: 1-99 printable ASCII characters, no '/' (USTAR)")
