"""Answers an agent's resync: digests of the replica's 4 KiB blocks, computed from the
replica page blob once it holds everything this process server has received."""
from __future__ import annotations

import uuid

from ..dataplane.digests import BLOCK, digest_blocks
from ..dataplane.segment import logs_prefix, replica_name
from ..storage.base import BlobNotFound, BlobStore

READ = 4 * 1024 * 1024


def applied_seq(store: BlobStore, machine: uuid.UUID, disk_count: int) -> int:
    """How far every replica disk of the machine has been applied (0: nothing yet). A disk
    with neither a replica nor a log (just added: nothing of it received or uploaded yet)
    has nothing to wait for; the other disks' logs hold back the segments still to come."""
    seqs = []
    for disk in range(disk_count):
        try:
            seqs.append(int(store.get_metadata(replica_name(machine, disk)).get("applied_seq", 0)))
        except BlobNotFound:
            if store.list_blobs(logs_prefix(machine, disk)):
                seqs.append(0)
    return min(seqs) if seqs else 0


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
