"""Read a VMDK's sparse extent header: the virtual capacity and the subformat."""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import BinaryIO

from ..errors import OvaError

SECTOR = 512
_MAGIC = b"KDMV"
# magic, version, flags, capacity, grainSize, descriptorOffset, descriptorSize (sectors)
_HEADER = struct.Struct("<4sIIQQQQ")
_CREATE_TYPE_RE = re.compile(rb'createType\s*=\s*"([^"]+)"')
_MAX_DESCRIPTOR = 64 * 1024


@dataclass(frozen=True)
class VmdkInfo:
    capacity_bytes: int
    create_type: str

    @property
    def stream_optimized(self) -> bool:
        return self.create_type == "streamOptimized"


def read_vmdk_info(stream: BinaryIO, name: str = "disk") -> VmdkInfo:
    """Parse the header at the stream's position; reads at most the header and its descriptor."""
    head = stream.read(SECTOR)
    if len(head) < _HEADER.size or head[:4] != _MAGIC:
        raise OvaError(f"{name} is not a sparse VMDK (no 'KDMV' header): export it as streamOptimized, e.g. "
                       f"qemu-img convert -O vmdk -o subformat=streamOptimized")
    _magic, _version, _flags, capacity, _grain, desc_offset, desc_size = _HEADER.unpack_from(head)
    create_type = "unknown"
    if desc_offset and 0 < desc_size * SECTOR <= _MAX_DESCRIPTOR:
        skip = (desc_offset - 1) * SECTOR
        if skip:
            stream.read(skip)
        descriptor = stream.read(desc_size * SECTOR)
        match = _CREATE_TYPE_RE.search(descriptor)
        if match:
            create_type = match.group(1).decode("ascii", "replace")
    return VmdkInfo(capacity_bytes=capacity * SECTOR, create_type=create_type)
