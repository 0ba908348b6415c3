"""What a frame may say on one connection: the machine its certificate names, that
machine's disks and sizes, and the next sequence number. Pure logic; the server feeds it."""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Protocol

from .frames import ErrorCode, FrameError, Header, Kind


@dataclass(frozen=True)
class MachineRecord:
    machine_id: uuid.UUID
    hostname: str
    disk_sizes: tuple[int, ...]  # bytes, in registration order (disk index 0 first)
    cert_fingerprint: str | None = None  # SHA-256 of the machine's current certificate, when pinned


class MachineDirectory(Protocol):
    """Registered machines, as the configuration server knows them. A lookup that cannot be
    answered for now (the database is down) raises `common.errors.DatabaseError`."""

    def machine(self, machine_id: uuid.UUID) -> MachineRecord | None: ...

    def resolve(self, id_or_hostname: str) -> MachineRecord | None: ...


class StaticDirectory:
    """A directory given as records (tests, benchmarks, a process server without a database)."""

    def __init__(self, records: list[MachineRecord]) -> None:
        self._by_id = {r.machine_id: r for r in records}

    def machine(self, machine_id: uuid.UUID) -> MachineRecord | None:
        return self._by_id.get(machine_id)

    def register(self, record: MachineRecord) -> None:
        """Add a machine, or replace its record (as registering again does)."""
        self._by_id[record.machine_id] = record

    def resolve(self, id_or_hostname: str) -> MachineRecord | None:
        return resolve_in(self._by_id.values(), id_or_hostname)


def resolve_in(records, id_or_hostname: str) -> MachineRecord | None:
    for r in records:
        if str(r.machine_id) == id_or_hostname.lower() or r.machine_id.hex == id_or_hostname.lower():
            return r
    matches = [r for r in records if r.hostname.lower() == id_or_hostname.lower()]
    return matches[0] if len(matches) == 1 else None


class Session:
    """Checks each incoming header against the authenticated machine and the sequence."""

    def __init__(self, certified: MachineRecord, last_durable_seq: int) -> None:
        self.machine = certified
        self.expected_seq = last_durable_seq + 1
        self.greeted = False

    def check(self, h: Header) -> None:
        if h.kind in (Kind.WELCOME, Kind.ACK, Kind.ERROR, Kind.DIGESTS):
            raise FrameError(ErrorCode.PROTOCOL, f"{h.kind.name} frames are sent by the server, not by agents")
        if h.machine != self.machine.machine_id:
            raise FrameError(ErrorCode.NOT_AUTHORIZED,
                             f"frame names machine {h.machine} but the client certificate belongs to {self.machine.machine_id}")
        if h.kind is Kind.HELLO:
            if self.greeted:
                raise FrameError(ErrorCode.PROTOCOL, "HELLO sent twice on one connection")
            self.greeted = True
            return
        if not self.greeted:
            raise FrameError(ErrorCode.PROTOCOL, f"{h.kind.name} before HELLO: open the session with HELLO first")
        if h.kind is Kind.DIGEST_REQUEST:
            self._check_digest_request(h)
            return
        if h.seq != self.expected_seq:
            raise FrameError(ErrorCode.SEQUENCE,
                             f"sequence {h.seq} out of order: expected {self.expected_seq} (resend from the last acknowledged sequence + 1)")
        if h.kind is Kind.DATA:
            sizes = self.machine.disk_sizes
            if h.disk >= len(sizes):
                raise FrameError(ErrorCode.OUT_OF_RANGE,
                                 f"disk {h.disk} is not registered for machine {self.machine.machine_id}: disks 0..{len(sizes) - 1}")
            if h.offset + h.length > sizes[h.disk]:
                raise FrameError(ErrorCode.OUT_OF_RANGE,
                                 f"write of {h.length} bytes at offset {h.offset} runs past the end of disk {h.disk} ({sizes[h.disk]} bytes)")
        elif h.disk:
            raise FrameError(ErrorCode.MALFORMED, f"{h.kind.name} frames apply to the whole machine: disk must be 0")
        self.expected_seq += 1

    def _check_digest_request(self, h: Header) -> None:
        """Digest requests are not part of the stream: seq 0, and the payload is a block count."""
        sizes = self.machine.disk_sizes
        if h.seq != 0 or h.length != 4:
            raise FrameError(ErrorCode.MALFORMED, "DIGEST_REQUEST needs seq 0 and a 4-byte block count as payload")
        if h.disk >= len(sizes):
            raise FrameError(ErrorCode.OUT_OF_RANGE,
                             f"disk {h.disk} is not registered for machine {self.machine.machine_id}: disks 0..{len(sizes) - 1}")
        if h.offset % DIGEST_BLOCK or h.offset >= sizes[h.disk]:
            raise FrameError(ErrorCode.OUT_OF_RANGE, f"digest offset {h.offset} must be a multiple of {DIGEST_BLOCK} "
                             f"inside disk {h.disk} ({sizes[h.disk]} bytes)")


DIGEST_BLOCK = 4096
MAX_DIGEST_BLOCKS = 65536  # 256 MiB of disk per reply (1 MiB of digests)


def digest_block_count(payload: bytes | bytearray, offset: int, disk_size: int) -> int:
    """Blocks asked for, checked, and cut at the end of the disk."""
    count = int.from_bytes(payload, "big")
    if not 0 < count <= MAX_DIGEST_BLOCKS:
        raise FrameError(ErrorCode.OUT_OF_RANGE, f"digest request for {count} blocks: ask for 1..{MAX_DIGEST_BLOCKS}")
    return min(count, -(-(disk_size - offset) // DIGEST_BLOCK))
