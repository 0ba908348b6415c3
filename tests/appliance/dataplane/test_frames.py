"""The 9443 frame codec and per-connection validation: strict, and never crashes on garbage."""
from __future__ import annotations

import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from replication_appliance.dataplane import frames as F
from replication_appliance.dataplane.session import MachineRecord, Session

M = uuid.UUID("11111111-2222-3333-4444-555555555555")
OTHER = uuid.UUID("99999999-2222-3333-4444-555555555555")


def data(seq: int, offset: int = 0, payload: bytes = b"x" * 512, disk: int = 0, machine=M) -> F.Frame:
    return F.Frame(F.Kind.DATA, machine, disk=disk, seq=seq, offset=offset, payload=payload)


def test_round_trip_of_every_kind():
    for frame in (F.Frame(F.Kind.HELLO, M), data(7, 4096, bytes(range(256)) * 8),
                  F.Frame(F.Kind.MARKER, M, seq=9, offset=1_700_000_000_000_000_000, payload=b"abc"),
                  F.Frame(F.Kind.ACK, M, seq=9, flags=F.Flag.THROTTLED), F.error_frame(M, F.ErrorCode.SEQUENCE, "no")):
        raw = F.encode(frame)
        decoded, used = F.decode(raw + b"trailing")
        assert decoded == frame and used == len(raw)


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b"XXXX" + b[4:], "bad frame magic"),
    (lambda b: b[:4] + bytes([2]) + b[5:], "protocol version 2"),
    (lambda b: b[:5] + bytes([77]) + b[6:], "unknown frame kind 77"),
    (lambda b: b[:6] + b"\x00\x08" + b[8:], "unknown flags"),
    (lambda b: b[:26] + b"\x00\x01" + b[28:], "reserved header field"),
    (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "fails its checksum"),
])
def test_corruption_is_named(mutate, message):
    raw = F.encode(data(1))
    with pytest.raises(F.FrameError, match=message):
        F.decode(mutate(raw))


def test_data_must_be_sector_aligned_and_bounded():
    with pytest.raises(F.FrameError, match="multiples of 512"):
        F.decode(F.encode(data(1, offset=100)))
    with pytest.raises(F.FrameError, match="multiples of 512"):
        F.decode(F.encode(data(1, payload=b"x" * 100)))
    with pytest.raises(F.FrameError, match="exceeds"):
        F.encode(data(1, payload=bytes(F.MAX_DATA + 512)))
    head = bytearray(F.encode(data(1))[:F.HEADER_SIZE])
    head[44:48] = (F.MAX_DATA + 512).to_bytes(4, "big")
    with pytest.raises(F.FrameError, match="exceeds the limit"):
        F.decode_header(bytes(head))


def test_incomplete_frame_asks_for_more():
    raw = F.encode(data(1))
    with pytest.raises(F.IncompleteFrame):
        F.decode(raw[:-1])
    frames, used = F.decode_all(raw + raw[:10])
    assert len(frames) == 1 and used == len(raw)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_fuzz_garbage_gives_frame_error_or_frames(blob):
    try:
        _frames, used = F.decode_all(blob)
    except F.FrameError as e:
        assert str(e) and isinstance(e.code, F.ErrorCode)
    else:
        assert used <= len(blob)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=0, max_value=F.HEADER_SIZE + 511), st.integers(0, 255), st.integers(0, 7))
def test_fuzz_any_bit_flip_is_caught(pos, value, bit):
    raw = bytearray(F.encode(data(3, 1024, bytes(range(256)) * 2)))
    raw[pos] ^= 1 << bit
    if raw == F.encode(data(3, 1024, bytes(range(256)) * 2)):
        return
    with pytest.raises((F.FrameError, F.IncompleteFrame)):
        F.decode(bytes(raw))


@settings(max_examples=200)
@given(st.binary(min_size=F.HEADER_SIZE, max_size=F.HEADER_SIZE))
def test_fuzz_headers_through_the_session(head):
    session = Session(MachineRecord(M, "web01", (1 << 20,)), last_durable_seq=0)
    try:
        h = F.decode_header(head)
        session.check(h)
    except F.FrameError as e:
        assert str(e)


def _session() -> Session:
    s = Session(MachineRecord(M, "web01", (1 << 20, 1 << 21)), last_durable_seq=41)
    s.check(F.decode_header(F.encode(F.Frame(F.Kind.HELLO, M))))
    return s


def _hdr(frame: F.Frame) -> F.Header:
    return F.decode_header(F.encode(frame)[:F.HEADER_SIZE])


def test_session_rules():
    s = Session(MachineRecord(M, "web01", (1 << 20,)), last_durable_seq=0)
    with pytest.raises(F.FrameError, match="before HELLO"):
        s.check(_hdr(data(1)))
    with pytest.raises(F.FrameError, match="belongs to") as e:
        s.check(_hdr(F.Frame(F.Kind.HELLO, OTHER)))
    assert e.value.code is F.ErrorCode.NOT_AUTHORIZED
    s = _session()
    with pytest.raises(F.FrameError, match="expected 42"):
        s.check(_hdr(data(43)))
    s.check(_hdr(data(42)))
    with pytest.raises(F.FrameError, match="disk 2 is not registered"):
        s.check(_hdr(data(43, disk=2)))
    with pytest.raises(F.FrameError, match="past the end of disk 0"):
        s.check(_hdr(data(43, offset=(1 << 20) - 256 * 2, payload=bytes(1024))))
    s.check(_hdr(data(43, disk=1, offset=(1 << 21) - 1024, payload=bytes(1024))))
    with pytest.raises(F.FrameError, match="sent by the server"):
        s.check(_hdr(F.Frame(F.Kind.ACK, M, seq=44)))
    with pytest.raises(F.FrameError, match="HELLO sent twice"):
        s.check(_hdr(F.Frame(F.Kind.HELLO, M)))
    with pytest.raises(F.FrameError, match="whole machine"):
        s.check(_hdr(F.Frame(F.Kind.MARKER, M, disk=1, seq=44)))
