"""Per-block digest map: XXH3-128 of every 4 KiB block as last sent (and acknowledged).

A delta cycle reads only the source, hashes each block and sends the blocks whose digest
changed; the map is kept in a file beside the agent state (16 bytes per block, 4 MiB per
GiB of disk, plus 16 bytes per 4 MiB chunk). Pure logic apart from load/save."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import xxhash

from ..common import fileio

BLOCK = 4096
DIGEST = 16
ZERO_BLOCK = bytes(BLOCK)
ZERO_DIGEST = xxhash.xxh3_128_digest(ZERO_BLOCK)
CHUNK = 1024 * BLOCK  # the agent reads and compares 4 MiB at a time
ZERO_CHUNK_DIGEST = xxhash.xxh3_128_digest(bytes(CHUNK))
_MAGIC = b"RADM2\n"


def chunk_digest(chunk: bytes | memoryview) -> bytes:
    return xxhash.xxh3_128_digest(chunk)


def digest_blocks(chunk: bytes | memoryview) -> bytes:
    """Concatenated digests of every whole 4 KiB block in `chunk`."""
    mv = memoryview(chunk)
    h = xxhash.xxh3_128_digest
    return b"".join([h(mv[i:i + BLOCK]) for i in range(0, len(mv), BLOCK)])


def digest_extents(chunk: bytes | memoryview, extents: list[tuple[int, int]]) -> bytes:
    """`digest_blocks(chunk)` for a chunk that holds zeros outside `extents` ((start, end)
    offsets in the chunk, in order, on BLOCK boundaries or at the chunk's end), without hashing
    those zeros: a hole's blocks are known to be all-zero."""
    mv = memoryview(chunk)
    parts: list[bytes] = []
    pos = 0
    for lo, hi in (*extents, (len(mv), len(mv))):
        if lo > pos:
            whole, rest = divmod(lo - pos, BLOCK)
            parts.append(ZERO_DIGEST * whole)
            if rest:  # a short last block, hashed as it is (as digest_blocks does)
                parts.append(xxhash.xxh3_128_digest(bytes(rest)))
        if hi > lo:
            parts.append(digest_blocks(mv[lo:hi]))
        pos = max(pos, hi)
    return b"".join(parts)


@dataclass(frozen=True)
class Run:
    """Blocks [first, first+count) of a chunk that must be sent."""
    first: int
    count: int


def changed_runs(old: bytes | memoryview, new: bytes | memoryview, max_blocks: int, skip_zero: bool) -> list[Run]:
    """Runs of blocks whose digest differs (or, with skip_zero, which are not all-zero), each at
    most `max_blocks` long."""
    n = len(new) // DIGEST
    new = bytes(new)
    if skip_zero:
        if new == ZERO_DIGEST * n:
            return []  # the common cases, each decided by one memcmp or one search
        skipped = _zero_digest_indices(new)
    else:
        old = bytes(old)
        if new == old:
            return []
        skipped = [i for i in range(n) if new[i * DIGEST:(i + 1) * DIGEST] == old[i * DIGEST:(i + 1) * DIGEST]]
    runs: list[Run] = []
    first = 0
    for end in (*skipped, n):  # the blocks to send lie between the skipped ones
        for start in range(first, end, max_blocks):
            runs.append(Run(start, min(max_blocks, end - start)))
        first = end + 1
    return runs


def every_run(blocks: int, max_blocks: int) -> list[Run]:
    """All of `blocks` blocks, in runs of at most `max_blocks`."""
    return [Run(first, min(max_blocks, blocks - first)) for first in range(0, blocks, max_blocks)]


def _zero_digest_indices(digests: bytes) -> list[int]:
    """Indices of the all-zero blocks' digests, found by bytes.find (no per-block Python loop
    when a chunk has no zero block, the usual case for data)."""
    found: list[int] = []
    i = digests.find(ZERO_DIGEST)
    while i >= 0:
        if i % DIGEST:  # a match straddling two digests: not a zero block
            i = digests.find(ZERO_DIGEST, i + 1)
            continue
        found.append(i // DIGEST)
        i = digests.find(ZERO_DIGEST, i + DIGEST)
    return found


class DigestMap:
    """Block digests plus one digest per 4 MiB chunk: an unchanged chunk is recognised by a
    single XXH3-128 call instead of 1024, which is what keeps the scan near `cat` speed."""

    def __init__(self, disk_size: int, data: bytearray | None = None, chunks: bytearray | None = None) -> None:
        self.blocks = (disk_size + BLOCK - 1) // BLOCK
        self.chunk_count = (disk_size + CHUNK - 1) // CHUNK
        if data is not None and len(data) != self.blocks * DIGEST:
            raise ValueError(f"digest map has {len(data)} bytes, expected {self.blocks * DIGEST}")
        # A fresh map says "all zero": that is what a new replica page blob holds.
        self.data = data if data is not None else bytearray(ZERO_DIGEST * self.blocks)
        # Chunk digests start unknown (zeros), which forces a per-block comparison.
        self.chunks = chunks if chunks is not None else bytearray(DIGEST * self.chunk_count)
        self.dirty = data is None  # unsaved changes (a cycle without changes rewrites nothing)

    def slice(self, first_block: int, count: int) -> memoryview:
        return memoryview(self.data)[first_block * DIGEST:(first_block + count) * DIGEST]

    def chunk_matches(self, offset: int, chunk_digest: bytes) -> bool:
        i = offset // CHUNK * DIGEST
        return self.chunks[i:i + DIGEST] == chunk_digest

    def update(self, offset: int, digests: bytes, chunk_digest: bytes) -> None:
        """Record a whole chunk read at `offset` (a multiple of CHUNK)."""
        first = offset // BLOCK * DIGEST
        self.data[first:first + len(digests)] = digests
        i = offset // CHUNK * DIGEST
        self.chunks[i:i + DIGEST] = chunk_digest
        self.dirty = True

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(_MAGIC + self.blocks.to_bytes(8, "big"))
            f.write(self.data)
            f.write(self.chunks)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fileio.fsync_dir(path.parent)  # else power loss can bring the old map back
        self.dirty = False

    @classmethod
    def load(cls, path: Path, disk_size: int) -> DigestMap | None:
        """The saved map, or None if it is missing or does not fit the disk (then: resync)."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        head = len(_MAGIC) + 8
        blocks = (disk_size + BLOCK - 1) // BLOCK
        chunks = (disk_size + CHUNK - 1) // CHUNK
        if (not raw.startswith(_MAGIC) or int.from_bytes(raw[len(_MAGIC):head], "big") != blocks
                or len(raw) - head != (blocks + chunks) * DIGEST):
            return None
        split = head + blocks * DIGEST
        return cls(disk_size, bytearray(raw[head:split]), bytearray(raw[split:]))
