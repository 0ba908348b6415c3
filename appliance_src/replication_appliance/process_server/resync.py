"""Answers an agent's resync: digests of the replica's 4 KiB blocks, computed from the
replica page blob once it holds everything this process server has received (all of it
uploaded, and every log applied)."""
from __future__ import annotations

import uuid

from ..dataplane.digests import BLOCK, digest_blocks
from ..dataplane.segment import logs_prefix, replica_name, segno_of
from ..storage.base import BlobNotFound, BlobStore

READ = 4 * 1024 * 1024


def logs_applied(store: BlobStore, machine: uuid.UUID, disk_count: int) -> bool:
    """Whether every log in storage has been applied: none of any disk lies above its
    replica's applied segment. A disk with neither a replica nor a log (just added) has nothing
    to wait for; nor has one registered again after it was dropped, until a log of it comes."""
    for disk in range(disk_count):
        try:
            applied = int(store.get_metadata(replica_name(machine, disk)).get("applied_segno", -1))
        except BlobNotFound:
            applied = -1
        for blob in store.list_blobs(logs_prefix(machine, disk)):
            segno = segno_of(blob.name)
            if segno is not None and segno > applied:
                return False
    return True


def replica_digests(store: BlobStore, machine: uuid.UUID, disk: int, offset: int, blocks: int, disk_size: int) -> bytes:
    name = replica_name(machine, disk)
    end = min(offset + blocks * BLOCK, disk_size)
    try:
        stored = store.page_blob_size(name)
    except BlobNotFound:
        stored = 0  # never applied: the replica is all zeros
    out = []
    for pos in range(offset, end, READ):
        n = min(READ, end - pos)
        # A disk grown since its replica was sized (apply resizes it with the next log): what
        # lies beyond the replica's end is zeros there.
        have = max(0, min(n, stored - pos))
        data = store.read_pages(name, pos, have) + bytes(n - have) if have else bytes(n)
        out.append(digest_blocks(data))
    return b"".join(out)
