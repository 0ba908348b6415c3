"""Read an OVA as a tar stream without extracting it, or a folder holding an .ovf.

Members are served straight from the OVA file at their offsets, so a 50 GB disk is read
once, in order, with constant memory, by verify-ova and by the deployer alike.
"""
from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import OvaError

_MANIFEST_LINE = re.compile(r"^(SHA1|SHA256|SHA512)\((.+)\)\s*=\s*([0-9a-fA-F]+)\s*$")
USTAR_MAGIC = b"ustar\x0000"  # POSIX; GNU tar writes "ustar  \0", which ovftool rejects


@dataclass(frozen=True)
class Member:
    name: str
    size: int
    data_offset: int  # for a folder package: 0
    header_magic: bytes  # b"" for a folder package
    is_regular: bool
    header_type: bytes = b"0"  # the first header's typeflag: "x"/"g" (pax) or "L" (GNU) are not USTAR


class _MemberReader(io.RawIOBase):
    """Reads `size` bytes of `path` from `offset`: one member of the tar, nothing more."""

    def __init__(self, path: Path, offset: int, size: int) -> None:
        self._fh = path.open("rb")
        self._fh.seek(offset)
        self._left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._left <= 0:
            return 0
        view = memoryview(buffer)[: min(len(buffer), self._left)]
        n = self._fh.readinto(view)
        if not n:
            raise OvaError("the OVA ends inside a member: the file is truncated")
        self._left -= n
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()


class OvaPackage:
    """An opened OVA or OVF folder: descriptor, manifest, members in stored order."""

    def __init__(self, path: Path, members: list[Member], is_tar: bool) -> None:
        self.path = path
        self.is_tar = is_tar
        self._members = {m.name: m for m in members}
        self.member_list = members
        ovfs = [m.name for m in members if m.name.lower().endswith(".ovf")]
        if len(ovfs) != 1:
            raise OvaError(f"{path} must hold exactly one .ovf descriptor, found {len(ovfs)}"
                           + (f": {', '.join(ovfs)}" if ovfs else ""))
        self.descriptor_name = ovfs[0]
        self.descriptor_text = self.read_member(self.descriptor_name, limit=16 * 1024 * 1024)
        mfs = [m.name for m in members if m.name.lower().endswith(".mf")]
        if len(mfs) > 1:
            raise OvaError(f"{path} holds {len(mfs)} manifests ({', '.join(mfs)}); at most one is allowed")
        self.manifest_name = mfs[0] if mfs else None
        self.manifest_algorithms: dict[str, str] = {}
        self.manifest: dict[str, str] = {}
        if self.manifest_name:
            self._parse_manifest(self.read_member(self.manifest_name, limit=1024 * 1024))

    @property
    def members(self) -> list[str]:
        return [m.name for m in self.member_list]

    def member(self, name: str) -> Member:
        try:
            return self._members[name]
        except KeyError:
            raise OvaError(f"{self.path} has no member {name!r}; it has: {', '.join(self.members)}") from None

    def member_size(self, name: str) -> int:
        return self.member(name).size

    def open_member(self, name: str) -> BinaryIO:
        member = self.member(name)
        if self.is_tar:
            # A small buffer: large reads (1 MiB uploads and digests) then go straight into the caller's buffer.
            return io.BufferedReader(_MemberReader(self.path, member.data_offset, member.size), 64 * 1024)
        return (self.path / name).open("rb")

    def read_member(self, name: str, limit: int) -> bytes:
        size = self.member_size(name)
        if size > limit:
            raise OvaError(f"{name} is {size} bytes, more than the {limit} allowed for it")
        with self.open_member(name) as fh:
            return fh.read()

    def _parse_manifest(self, data: bytes) -> None:
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if not line.strip():
                continue
            match = _MANIFEST_LINE.match(line)
            if not match:
                raise OvaError(f"{self.manifest_name} line {number} is not 'SHA256(file)= hex': {line[:80]!r}")
            algorithm, name, digest = match.groups()
            self.manifest[name] = digest.lower()
            self.manifest_algorithms[name] = algorithm


@contextmanager
def open_package(path: str | Path) -> Iterator[OvaPackage]:
    """Open an .ova (tar) or a folder with an .ovf; OvaError when it is neither."""
    path = Path(path)
    if path.is_dir():
        members = [Member(p.name, p.stat().st_size, 0, b"", p.is_file()) for p in sorted(path.iterdir()) if p.is_file()]
        yield OvaPackage(path, members, is_tar=False)
        return
    if not path.is_file():
        raise OvaError(f"{path} does not exist (expected an .ova file or a folder with an .ovf)")
    yield OvaPackage(path, _tar_members(path), is_tar=True)


def _tar_members(path: Path) -> list[Member]:
    members: list[Member] = []
    try:
        with path.open("rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            for info in tar:
                raw.seek(info.offset)
                header = raw.read(512)
                members.append(Member(info.name, info.size, info.offset_data, header[257:265], info.isreg(),
                                      header[156:157]))
    except tarfile.TarError as exc:
        raise OvaError(f"{path} is not a tar archive (an OVA is a USTAR tar): {exc}") from None
    if not members:
        raise OvaError(f"{path} is an empty archive")
    return members
