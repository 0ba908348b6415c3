"""Frame codec of the data port (9443).

Every frame is a fixed 56-byte header followed by `length` payload bytes:

    magic "RPD1" | version u8 | kind u8 | flags u16 | machine 16 bytes | disk u16 |
    reserved u16 (0) | seq u64 | offset u64 | length u32 | checksum u64

all big-endian. `checksum` is XXH3-64 of the header's first 48 bytes and the payload, so a
journal record (which is the frame itself) detects a torn tail, and a corrupted frame is
refused before any byte of it is written.

The codec is stateless and validates only what a frame says about itself; what depends on
the connection (which machine, disk sizes, sequence) is in `session.py`.
"""
from __future__ import annotations

import enum
import struct
import uuid
from dataclasses import dataclass

import xxhash

from ..common.errors import ApplianceError

MAGIC = b"RPD1"
VERSION = 1
HEADER = struct.Struct(">4sBBH16sHHQQIQ")
HEADER_SIZE = HEADER.size  # 56
_CHECKED = HEADER_SIZE - 8
SECTOR = 512
MAX_DATA = 4 * 1024 * 1024
MAX_CONTROL = 64 * 1024


class Kind(enum.IntEnum):
    HELLO = 1  # agent -> server: opens a session for `machine`; seq = the most it was ever acknowledged (0: unknown)
    WELCOME = 2  # server -> agent: seq = last durable sequence of that machine
    DATA = 3  # agent -> server: `length` bytes of disk `disk` at `offset`
    MARKER = 4  # agent -> server: consistency marker; offset = marker time (ns since epoch)
    ACK = 5  # server -> agent: everything up to seq is durable
    ERROR = 6  # server -> agent: payload is a UTF-8 message; offset = ErrorCode
    DIGEST_REQUEST = 7  # agent -> server (resync): digests of `disk` from `offset`; payload = block count (u32)
    DIGESTS = 8  # server -> agent: XXH3-128 of each 4 KiB block of the replica, or NOT_READY


class Flag(enum.IntFlag):
    THROTTLED = 0x1  # ACK: cache free space is under the throttle threshold, slow down
    RESYNC = 0x2  # WELCOME: the appliance asks for a resync
    NOT_READY = 0x4  # DIGESTS: the replica has not yet applied everything received; ask again later


ALLOWED_FLAGS = {
    Kind.HELLO: Flag(0),
    Kind.WELCOME: Flag.RESYNC,
    Kind.DATA: Flag(0),
    Kind.MARKER: Flag(0),
    Kind.ACK: Flag.THROTTLED,
    Kind.ERROR: Flag(0),
    Kind.DIGEST_REQUEST: Flag(0),
    Kind.DIGESTS: Flag.NOT_READY,
}


NO_FLAGS = Flag(0)


class ErrorCode(enum.IntEnum):
    MALFORMED = 1
    NOT_AUTHORIZED = 2
    OUT_OF_RANGE = 3
    SEQUENCE = 4
    PROTOCOL = 5
    INTERNAL = 6


class FrameError(ApplianceError):
    """A frame breaks the protocol. `code` says which rule; the message names what is wrong
    and what is allowed."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Frame:
    kind: Kind
    machine: uuid.UUID
    disk: int = 0
    seq: int = 0
    offset: int = 0
    payload: bytes | memoryview = b""  # a memoryview is copied once, by encode()
    flags: Flag = NO_FLAGS

    @property
    def length(self) -> int:
        return len(self.payload)


@dataclass(frozen=True)
class Header:
    kind: Kind
    flags: Flag
    machine: uuid.UUID
    disk: int
    seq: int
    offset: int
    length: int
    checksum: int


def _limit(kind: Kind) -> int:
    return MAX_DATA if kind in (Kind.DATA, Kind.DIGESTS) else MAX_CONTROL


def encode_header(frame: Frame) -> bytes:
    """The frame's 56 header bytes, the checksum over them and the payload included."""
    kind = Kind(frame.kind)
    if len(frame.payload) > _limit(kind):
        raise FrameError(ErrorCode.MALFORMED, f"{kind.name} payload of {len(frame.payload)} bytes exceeds {_limit(kind)}")
    head = HEADER.pack(MAGIC, VERSION, kind, int(frame.flags), frame.machine.bytes, frame.disk, 0,
                       frame.seq, frame.offset, len(frame.payload), 0)[:_CHECKED]
    h = xxhash.xxh3_64(head)
    h.update(frame.payload)
    return head + h.digest()


def encode(frame: Frame) -> bytes:
    """The frame's bytes: header and payload."""
    return encode_header(frame) + bytes(frame.payload)


def decode_header(buf: bytes | memoryview) -> Header:
    """Parse and check a header; the payload checksum is checked by `check_payload`."""
    if len(buf) != HEADER_SIZE:
        raise FrameError(ErrorCode.MALFORMED, f"frame header must be {HEADER_SIZE} bytes, got {len(buf)}")
    magic, version, kind_v, flags_v, machine, disk, reserved, seq, offset, length, checksum = HEADER.unpack(buf)
    if magic != MAGIC:
        raise FrameError(ErrorCode.MALFORMED, f"bad frame magic {bytes(magic)!r}: expected {MAGIC!r} (is this a replication agent?)")
    if version != VERSION:
        raise FrameError(ErrorCode.MALFORMED, f"protocol version {version} is not supported: this server speaks version {VERSION}")
    try:
        kind = Kind(kind_v)
    except ValueError:
        raise FrameError(ErrorCode.MALFORMED, f"unknown frame kind {kind_v}: allowed are "
                         + ", ".join(f"{k.value} ({k.name})" for k in Kind)) from None
    if flags_v & ~int(ALLOWED_FLAGS[kind]):
        raise FrameError(ErrorCode.MALFORMED, f"{kind.name} frame has unknown flags {flags_v:#x}: allowed {int(ALLOWED_FLAGS[kind]):#x}")
    if reserved:
        raise FrameError(ErrorCode.MALFORMED, "reserved header field must be zero")
    if length > _limit(kind):
        raise FrameError(ErrorCode.MALFORMED, f"{kind.name} payload length {length} exceeds the limit of {_limit(kind)} bytes")
    if kind is Kind.DATA and (length == 0 or length % SECTOR or offset % SECTOR):
        raise FrameError(ErrorCode.MALFORMED, f"DATA offset {offset} and length {length} must be positive multiples of {SECTOR} bytes")
    return Header(kind, Flag(flags_v), uuid.UUID(bytes=bytes(machine)), disk, seq, offset, length, checksum)


def check_payload(header_bytes: bytes | memoryview, header: Header, payload: bytes | memoryview) -> None:
    if len(payload) != header.length:
        raise FrameError(ErrorCode.MALFORMED, f"frame payload truncated: {len(payload)} of {header.length} bytes")
    h = xxhash.xxh3_64(header_bytes[:_CHECKED])
    h.update(payload)
    if h.intdigest() != header.checksum:
        raise FrameError(ErrorCode.MALFORMED, f"{header.kind.name} frame seq {header.seq} fails its checksum (corrupted in transit or on disk)")


def to_frame(header: Header, payload: bytes) -> Frame:
    return Frame(header.kind, header.machine, header.disk, header.seq, header.offset, payload, header.flags)


def decode(buf: bytes | memoryview) -> tuple[Frame, int]:
    """Decode one whole frame from the start of `buf`; returns it and the bytes consumed.
    Raises IncompleteFrame when `buf` ends inside the frame."""
    mv = memoryview(buf)
    if len(mv) < HEADER_SIZE:
        raise IncompleteFrame(HEADER_SIZE - len(mv))
    header = decode_header(mv[:HEADER_SIZE])
    end = HEADER_SIZE + header.length
    if len(mv) < end:
        raise IncompleteFrame(end - len(mv))
    payload = mv[HEADER_SIZE:end]
    check_payload(mv[:HEADER_SIZE], header, payload)
    return to_frame(header, bytes(payload)), end


class IncompleteFrame(Exception):
    """Not an error of the peer: more bytes are needed (`missing` at least)."""

    def __init__(self, missing: int) -> None:
        super().__init__(f"{missing} more bytes needed")
        self.missing = missing


def decode_all(buf: bytes | memoryview) -> tuple[list[Frame], int]:
    """Decode every whole frame in `buf`; returns them and the length of the valid prefix."""
    frames: list[Frame] = []
    pos = 0
    mv = memoryview(buf)
    while pos < len(mv):
        try:
            frame, used = decode(mv[pos:])
        except IncompleteFrame:
            break
        frames.append(frame)
        pos += used
    return frames, pos


def error_frame(machine: uuid.UUID, code: ErrorCode, message: str) -> Frame:
    return Frame(Kind.ERROR, machine, offset=int(code), payload=message.encode("utf-8")[:MAX_CONTROL])


def error_text(frame: Frame) -> str:
    try:
        code = ErrorCode(frame.offset).name
    except ValueError:
        code = f"code {frame.offset}"
    return f"{code}: {frame.payload.decode('utf-8', 'replace')}"
