"""Image files' holes: found with SEEK_DATA/SEEK_HOLE, never read, hashed as the zeros they
hold; in initial replication and in delta cycles, whole chunks or parts of them."""
from __future__ import annotations

import os
import random
import subprocess

from hypothesis import given, settings
from hypothesis import strategies as st
from replication_appliance.agent.source import DiskReader
from replication_appliance.apply.applier import MachineApplier
from replication_appliance.apply.recovery_points import export_disk, recovery_points
from replication_appliance.common.secrets import MasterKey
from replication_appliance.dataplane.digests import (
    BLOCK,
    CHUNK,
    digest_blocks,
    digest_extents,
)
from replication_appliance.storage import open_store
from replication_appliance.storage.keyring import DataKeyring

from .conftest import InProcessServer, make_machine, replicator, sha256

MiB = 1 << 20


def punch(path, offset: int, length: int) -> None:
    subprocess.run(["fallocate", "--punch-hole", "--offset", str(offset), "--length", str(length), str(path)], check=True)


def sparse_file(path, size: int, data: list[tuple[int, bytes]]):
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, payload in data:
            f.seek(offset)
            f.write(payload)
    return path


def test_data_extents_are_the_written_blocks_widened_to_the_alignment(tmp_path):
    img = sparse_file(tmp_path / "s.img", 8 * MiB, [(0, b"a" * 4096), (MiB + 4096, b"b" * 8192),
                                                     (2 * MiB + 100, b"c" * 10), (5 * MiB, b"d" * 3 * MiB)])
    with DiskReader(img, CHUNK) as r:
        assert r.data_extents(0, 4 * MiB, BLOCK) == [(0, 4096), (MiB + 4096, MiB + 12288), (2 * MiB, 2 * MiB + 4096)]
        assert r.data_extents(4 * MiB, 4 * MiB, BLOCK) == [(5 * MiB, 8 * MiB)]
        assert r.data_extents(3 * MiB, MiB, BLOCK) == []  # all hole
        # widened relative to the range's start, not cut short by it
        assert r.data_extents(MiB + 8192, 4096, BLOCK) == [(MiB + 8192, MiB + 12288)]
        out = memoryview(bytearray(b"\xff" * 4 * MiB))
        got = r.read_extents_into(0, out, r.data_extents(0, 4 * MiB, BLOCK))
        assert bytes(got) == img.read_bytes()[:4 * MiB]  # the stale buffer's bytes in the holes became zeros


def test_a_file_with_no_data_after_an_offset_and_a_block_device_path(tmp_path):
    img = sparse_file(tmp_path / "t.img", 4 * MiB, [(0, b"x" * 4096)])
    with DiskReader(img, CHUNK) as r:
        assert r.data_extents(MiB, MiB, BLOCK) == []  # SEEK_DATA answers ENXIO: no data to the end
        r._sparse = False  # as for a block device: everything is data, nothing asked
        assert r.data_extents(MiB, MiB, BLOCK) == [(MiB, 2 * MiB)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 64), st.integers(1, 16), st.booleans()), max_size=6),
       st.integers(1, 8))
def test_digest_extents_equals_hashing_the_zero_filled_chunk(pieces, tail_sectors):
    # a chunk of 64 blocks plus a short last block (a disk's size is a multiple of 512 bytes only)
    size = 64 * BLOCK + tail_sectors * 512
    chunk = bytearray(size)
    extents: list[tuple[int, int]] = []
    for first, count, zero_inside in sorted(pieces):
        lo, hi = first * BLOCK, min(size, (first + count) * BLOCK)
        if lo >= size or (extents and lo <= extents[-1][1]):
            continue
        if not zero_inside:  # an extent may hold zero blocks too (data that is zeros)
            chunk[lo:hi] = os.urandom(hi - lo)
        extents.append((lo, hi))
    assert digest_extents(chunk, extents) == digest_blocks(chunk)


def test_holes_are_not_read_in_initial_or_delta_cycles_and_a_punched_hole_replicates_as_zeros(tmp_path, pki, azurite):
    store = open_store(azurite.connection_string)
    master = MasterKey(os.urandom(32))
    m = make_machine(tmp_path, "sparse01", [24 * MiB], seed=41, ps_port=0)
    img = m.images[0]
    punch(img, 0, 24 * MiB)  # start from an empty sparse image, then data where we say
    with open(img, "r+b") as f:
        for offset, length in ((0, 6 * MiB), (9 * MiB + 4096, 20 * 4096), (16 * MiB, 8 * MiB)):
            f.seek(offset)
            f.write(random.Random(offset).randbytes(length))  # no zero block in it
    data = 6 * MiB + 20 * 4096 + 8 * MiB
    srv = InProcessServer(pki, tmp_path / "cache", [m.record], store, master, segment_max_age=0.2)
    try:
        applier = MachineApplier(store, DataKeyring(store, master), m.record)
        states = {}
        first = replicator(pki, m, srv.port).run_cycle()
        assert (first.bytes_read, first.bytes_skipped) == (data, 24 * MiB - data)
        states[first.marker_id] = sha256(img)

        # a delta cycle reads the data only too; a hole punched where data was is sent as zeros
        punch(img, 2 * MiB, MiB)
        with open(img, "r+b") as f:
            f.seek(17 * MiB)
            f.write(b"changed!" * 512)
        delta = replicator(pki, m, srv.port).run_cycle()
        assert (delta.bytes_read, delta.bytes_skipped) == (data - MiB, 24 * MiB - data + MiB)
        assert delta.bytes_sent == MiB + 4096  # the punched megabyte (now zeros) and the changed block
        states[delta.marker_id] = sha256(img)

        applier.apply_until(delta.marker_seq, 60)
        points = {p.marker_id: p for p in recovery_points(store, m.record)}
        assert set(points) == set(states)
        for marker, expected in states.items():  # each recovery point is the image as it was
            out = tmp_path / f"replica-{marker}.img"
            export_disk(store, m.record, 0, out, points[marker])
            assert sha256(out) == expected
    finally:
        srv.stop()
