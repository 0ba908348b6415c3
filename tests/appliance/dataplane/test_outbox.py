"""The agent's outbox: frames sent from a read buffer hold it (no copy) until acknowledged, and
the buffer counts whole against the window, however few bytes of it the frames carry."""
from __future__ import annotations

from replication_appliance.agent.link import Outbox, Pending
from replication_appliance.dataplane.digests import CHUNK
from replication_appliance.dataplane.frames import HEADER_SIZE

HEADER = b"h" * HEADER_SIZE


def test_a_read_buffer_counts_whole_until_its_last_frame_is_acknowledged_then_is_reused():
    box = Outbox(window_bytes=8 * CHUNK)
    buf = box.read_buffer(CHUNK)
    assert box.bytes == CHUNK
    view = memoryview(buf.data)
    box.add(Pending(1, HEADER, view[0:4096], None, buf))  # two small runs of one chunk
    box.add(Pending(2, HEADER, view[8192:12288], None, buf))
    box.release(buf)  # the reader is done with it; the frames still hold it
    assert box.bytes == CHUNK + 2 * HEADER_SIZE
    box.ack(1)
    assert box.bytes == CHUNK + HEADER_SIZE and box.read_buffer(CHUNK) is not buf  # frame 2 still holds it
    box.ack(2)
    assert box.bytes == CHUNK  # only the buffer taken just above
    assert box.read_buffer(CHUNK) is buf  # handed out again, not allocated afresh


def test_frames_without_a_read_buffer_count_their_own_bytes():
    box = Outbox(window_bytes=CHUNK)
    box.add(Pending(1, HEADER, b"x" * 512, None))
    assert box.bytes == HEADER_SIZE + 512
    box.ack(1)
    assert box.bytes == 0 and box.acked == 1 and not box.items
