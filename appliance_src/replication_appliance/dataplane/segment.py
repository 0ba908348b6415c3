"""Journal segments: records are whole frames back to back, except that zero padding up to the
next SEGMENT_ALIGN boundary may follow a record (the journal's direct writes end on those
boundaries; a record never starts with a zero byte). A sealed segment is split per
disk (its DATA frames plus every MARKER, so each disk sees every consistency point), then
compressed with zstd and encrypted with AES-256-GCM under that disk's data key. The blob's
format, name, key id, last sequence (kept in its metadata: apply advances its position by it)
and the disk's size its records were checked against (apply sizes the replica by it) are the
associated data, so a blob cannot be swapped, replayed elsewhere, told to skip records or
resize a replica. Logs of format FORMAT_V2 (earlier versions) carry no size."""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..common.errors import ApplianceError
from .frames import (
    HEADER_SIZE,
    FrameError,
    Header,
    IncompleteFrame,
    Kind,
    check_payload,
    decode_header,
)

FORMAT = "zstd+aes256gcm/3"
FORMAT_V2 = "zstd+aes256gcm/2"  # without the disk size: still read
SEGMENT_ALIGN = 4096
NONCE = 12
ZSTD_LEVELS = (1, 2, 3)


class SegmentError(ApplianceError):
    """A log blob cannot be opened (wrong key, altered or truncated) or parsed."""


@dataclass(frozen=True)
class Record:
    header: Header
    payload: memoryview


def iter_records(buf: bytes | memoryview) -> Iterator[Record]:
    """Every whole, checksum-valid record; stops (without error) at a torn or corrupt tail.
    Use `valid_prefix` to learn where that tail starts."""
    for rec, _, _ in _scan(buf):
        yield rec


def _skip_padding(mv: memoryview, pos: int) -> int:
    """Where the record after one ending at `pos` starts: `pos`, or past the zero padding that
    fills up to the next SEGMENT_ALIGN boundary."""
    if pos % SEGMENT_ALIGN == 0 or pos >= len(mv) or mv[pos] != 0:
        return pos
    end = min(len(mv), pos - pos % SEGMENT_ALIGN + SEGMENT_ALIGN)
    return end if mv[pos:end] == bytes(end - pos) else pos


def _scan(buf: bytes | memoryview) -> Iterator[tuple[Record, int, int]]:
    """(record, its start, its end) for every whole, checksum-valid record."""
    mv = memoryview(buf)
    pos = 0
    while pos + HEADER_SIZE <= len(mv):
        try:
            h = decode_header(mv[pos:pos + HEADER_SIZE])
            end = pos + HEADER_SIZE + h.length
            if end > len(mv):
                raise IncompleteFrame(end - len(mv))
            payload = mv[pos + HEADER_SIZE:end]
            check_payload(mv[pos:pos + HEADER_SIZE], h, payload)
        except (FrameError, IncompleteFrame):
            return
        yield Record(h, payload), pos, end
        pos = _skip_padding(mv, end)


def valid_prefix(buf: bytes | memoryview) -> tuple[int, int]:
    """(length of the valid prefix, the padding after its last record included; last sequence
    in it or -1)."""
    end, last = 0, -1
    for rec, _, e in _scan(buf):
        end, last = e, rec.header.seq
    return _skip_padding(memoryview(buf), end), last


def prefix_through(buf: bytes | memoryview, seq: int) -> int:
    """Length of the prefix of valid records with sequence at most `seq` (records are in
    sequence order), the padding after the last of them included."""
    end = 0
    for rec, _, e in _scan(buf):
        if rec.header.seq > seq:
            break
        end = e
    return _skip_padding(memoryview(buf), end)


def split_by_disk(buf: bytes | memoryview, disk_count: int) -> list[bytes]:
    mv = memoryview(buf)
    parts: list[list[memoryview]] = [[] for _ in range(disk_count)]
    pos = 0
    for rec, start, end in _scan(mv):
        whole = mv[start:end]  # the record without padding: blobs hold records back to back
        if rec.header.kind is Kind.DATA:
            if rec.header.disk < disk_count:  # else a disk registered no more (its data has nowhere to go)
                parts[rec.header.disk].append(whole)
        elif rec.header.kind is Kind.MARKER:
            for p in parts:
                p.append(whole)
        pos = end
    pos = _skip_padding(mv, pos)
    if pos != len(mv):
        raise SegmentError(f"sealed segment is corrupt at byte {pos} of {len(mv)}: refusing to upload it")
    return [b"".join(p) for p in parts]


def logs_prefix(machine: uuid.UUID, disk: int) -> str:
    return f"logs/{machine}/{disk}/"


def blob_name(machine: uuid.UUID, disk: int, segno: int) -> str:
    return f"{logs_prefix(machine, disk)}{segno:012d}.log"


def segno_of(name: str) -> int | None:
    """The segment number of a log blob's name (None: not a log of this naming)."""
    stem, dot, ext = name.rsplit("/", 1)[-1].partition(".")
    return int(stem) if stem.isdigit() and dot and ext == "log" else None


def replica_name(machine: uuid.UUID, disk: int) -> str:
    return f"replicas/{machine}/disk{disk}"


def _aad(name: str, key_id: str, last_seq: int, disk_size: int | None) -> bytes:
    if disk_size is None:
        return f"{FORMAT_V2}|{name}|{key_id}|{last_seq}".encode()
    return f"{FORMAT}|{name}|{key_id}|{last_seq}|{disk_size}".encode()


def seal(plain: bytes | memoryview, key: bytes, name: str, key_id: str, last_seq: int, disk_size: int | None,
         level: int = 1) -> bytes:
    """A log blob of FORMAT (`disk_size` None: of FORMAT_V2, as earlier versions wrote)."""
    if level not in ZSTD_LEVELS:
        raise SegmentError(f"zstd level {level} is not allowed: use one of {ZSTD_LEVELS}")
    packed = zstandard.ZstdCompressor(level=level).compress(plain)
    nonce = os.urandom(NONCE)
    return nonce + AESGCM(key).encrypt(nonce, packed, _aad(name, key_id, last_seq, disk_size))


def unseal(blob: bytes, key: bytes, name: str, key_id: str, last_seq: int, disk_size: int | None) -> bytes:
    """`disk_size` None: a log of FORMAT_V2."""
    if len(blob) < NONCE + 16:
        raise SegmentError(f"log blob {name} is truncated ({len(blob)} bytes)")
    try:
        packed = AESGCM(key).decrypt(blob[:NONCE], blob[NONCE:], _aad(name, key_id, last_seq, disk_size))
    except InvalidTag:
        raise SegmentError(f"log blob {name} fails authentication: wrong data key, or the blob or its metadata "
                           "was altered") from None
    try:
        return zstandard.ZstdDecompressor().decompress(packed, max_output_size=1 << 31)
    except zstandard.ZstdError as e:
        raise SegmentError(f"log blob {name} does not decompress: {e}") from None
