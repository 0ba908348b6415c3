"""An interrupted initial replication resumed: frames beyond the last checkpoint may already be
on the process server (and will be applied), so below the recorded sent limit the resumed pass
sends every block, zeros and holes included; a lost digest map after recorded progress gives a
resync. Real process server (TLS), local-directory storage, real apply and export."""
from __future__ import annotations

import os
import random
import threading

import pytest
from replication_appliance.agent.link import Link, RateLimit
from replication_appliance.agent.replicator import Replicator
from replication_appliance.apply.applier import MachineApplier
from replication_appliance.apply.recovery_points import export_disk
from replication_appliance.common.secrets import MasterKey
from replication_appliance.dataplane.frames import Kind
from replication_appliance.storage import open_store
from replication_appliance.storage.keyring import DataKeyring

from .conftest import InProcessServer, make_machine, replicator, sha256
from .test_sparse_source import punch

MiB = 1 << 20
FRAME = 256 * 1024  # 16 frames per 4 MiB chunk
BUDGET = 8 * MiB  # sent limits at 8, 16, 24 MiB
SENT_FRAMES = 37  # chunks 0 and 1 whole, then [8 MiB, 9.25 MiB) of chunk 2
DATA_END = 20 * MiB  # random data (no zero block) up to here, a hole after


class Killed(Exception):
    """Stands for the agent killed mid-pass: nothing more is recorded."""


def killed_after(pki, m, port: int, frames: int):
    """Connections on which each DATA frame is acknowledged before the next goes out (so the
    process server holds every frame sent, whatever the agent recorded) and the agent dies
    before sending DATA frame `frames` + 1."""
    ctx = pki.client_context(m.id)
    sent = 0

    class Dying(Link):
        def send(self, frame, on_ack=None, source=None):
            nonlocal sent
            if frame.kind is Kind.DATA and sent == frames:
                raise Killed
            super().send(frame, on_ack, source)
            self.wait_acked(frame.seq)
            sent += 1

    return lambda outbox: Dying(("127.0.0.1", port), ctx, m.id, outbox, RateLimit(None))


@pytest.fixture()
def setup(tmp_path, pki):
    store = open_store(str(tmp_path / "storage"))
    master = MasterKey(os.urandom(32))
    m = make_machine(tmp_path, "resume01", [24 * MiB], seed=51, ps_port=0)
    with open(m.images[0], "r+b") as f:
        f.write(random.Random(51).randbytes(DATA_END))
    punch(m.images[0], DATA_END, 24 * MiB - DATA_END)
    srv = InProcessServer(pki, tmp_path / "cache", [m.record], store, master, segment_max_age=0.2)
    yield store, master, m, srv
    srv.stop()


def interrupted_initial(pki, m, srv, checkpoint_every: float) -> int:
    """Initial replication killed after SENT_FRAMES frames reached the process server; the
    checkpoint it recorded."""
    rep = Replicator(m.config, m.state, killed_after(pki, m, srv.port, SENT_FRAMES), checkpoint_every=checkpoint_every,
                     frame_bytes=FRAME, sent_budget=BUDGET)
    with pytest.raises(Killed):
        rep.run_cycle()
    return m.state.load_disk(0).initial_offset


def assert_replica_is_source(store, master, m, seq: int, tmp_path) -> None:
    MachineApplier(store, DataKeyring(store, master), m.record).apply_until(seq, 60)
    out = tmp_path / "replica.img"
    export_disk(store, m.record, 0, out, None)
    assert sha256(out) == sha256(m.images[0]), "the replica differs from the source"


@pytest.mark.parametrize("checkpoint_every, became_zero", [(0.0, "zeroed"), (3600.0, "punched"), (0.0, "punched")],
                         ids=["checkpoint-per-chunk-zeroed", "no-checkpoint-punched", "checkpoint-per-chunk-punched"])
def test_resumed_initial_resends_below_the_sent_limit_blocks_that_became_zero(tmp_path, pki, setup,
                                                                               checkpoint_every, became_zero):
    store, master, m, srv = setup
    checkpoint = interrupted_initial(pki, m, srv, checkpoint_every)
    # the checkpoint lags what the process server holds: [0, 9.25 MiB)
    assert checkpoint in ((4 * MiB, 8 * MiB) if checkpoint_every == 0 else (0,))
    # a block the process server received beyond the checkpoint becomes zero on the source
    if became_zero == "zeroed":
        with open(m.images[0], "r+b") as f:
            f.seek(8 * MiB + 4096)
            f.write(bytes(4096))
    else:
        punch(m.images[0], 9 * MiB, 64 * 1024)

    report = replicator(pki, m, srv.port, frame_bytes=FRAME, sent_budget=BUDGET).run_cycle()
    assert report.phases == [f"disk 0: initial from {checkpoint}"]
    assert_replica_is_source(store, master, m, report.marker_seq, tmp_path)
    # below the limit recorded before the kill (16 MiB) everything is sent, zeros included; beyond
    # it the zeros (here the hole at the end) are skipped again
    assert report.bytes_sent == DATA_END - checkpoint
    st = m.state.load_disk(0)
    assert st.phase == "delta" and st.sent_limit == 0  # a finished cycle clears it


def test_sent_limit_is_recorded_before_frames_beyond_it_go_out(tmp_path, pki, setup):
    _, _, m, srv = setup
    interrupted_initial(pki, m, srv, 3600.0)
    # frames up to 9.25 MiB were sent: the limit was raised at 0 and at 8 MiB, by one budget each
    assert m.state.load_disk(0).sent_limit == 16 * MiB


def test_digest_map_lost_during_initial_replication_resyncs_the_disk(tmp_path, pki, setup):
    store, master, m, srv = setup
    checkpoint = interrupted_initial(pki, m, srv, 0.0)
    assert checkpoint > 0
    # the appliance asks for a resync (`mobility-agent run` deletes the maps), and blocks the
    # process server holds become zero: one below the checkpoint, one beyond it
    m.state.digests(0).unlink()
    with open(m.images[0], "r+b") as f:
        for offset in (4096, 8 * MiB + 4096):
            f.seek(offset)
            f.write(bytes(4096))
    # the replica's digests are served once what was received is applied
    applier = MachineApplier(store, DataKeyring(store, master), m.record)
    applying = threading.Thread(target=applier.apply_until, args=(SENT_FRAMES, 60), daemon=True)
    applying.start()
    report = replicator(pki, m, srv.port, frame_bytes=FRAME, sent_budget=BUDGET).run_cycle()
    applying.join(60)
    assert report.phases == ["disk 0: resync"]
    # the two zeroed blocks and what the replica lacks, [9.25 MiB, 20 MiB)
    assert report.bytes_sent == 2 * 4096 + DATA_END - SENT_FRAMES * FRAME
    assert_replica_is_source(store, master, m, report.marker_seq, tmp_path)
    st = m.state.load_disk(0)
    assert (st.phase, st.resyncs) == ("delta", 1) and m.state.digests(0).exists()


def test_a_delta_cycle_broken_off_after_sending_is_followed_by_a_resync(tmp_path, pki, setup):
    """A delta cycle that dies after some of its frames reached the process server leaves the
    map as it was before the cycle: a block sent by it that then goes back to its old content
    matches the map, and a plain delta would never send it again."""
    store, master, m, srv = setup
    first = replicator(pki, m, srv.port, frame_bytes=FRAME, sent_budget=BUDGET).run_cycle()
    before = bytearray(4096)
    with open(m.images[0], "r+b") as f:
        f.seek(4096)
        before[:] = f.read(4096)
        f.seek(4096)
        f.write(os.urandom(4096))  # A -> B
        f.seek(12 * MiB)
        f.write(os.urandom(4096))
    rep = Replicator(m.config, m.state, killed_after(pki, m, srv.port, 1), frame_bytes=FRAME, sent_budget=BUDGET)
    with pytest.raises(Killed):
        rep.run_cycle()  # B reached the process server; the agent died before the next frame
    assert m.state.load_disk(0).sent_limit == 24 * MiB
    with open(m.images[0], "r+b") as f:
        f.seek(4096)
        f.write(before)  # B -> A: what the (old) map says
    applier = MachineApplier(store, DataKeyring(store, master), m.record)
    applying = threading.Thread(target=applier.apply_until, args=(first.marker_seq + 1, 60), daemon=True)
    applying.start()  # the resync's digests are served once what was received is applied
    report = replicator(pki, m, srv.port, frame_bytes=FRAME, sent_budget=BUDGET).run_cycle()
    applying.join(60)
    assert report.phases == ["disk 0: resync"]
    assert report.bytes_sent == 2 * 4096  # A again, and the block the broken cycle never sent
    assert_replica_is_source(store, master, m, report.marker_seq, tmp_path)
    st = m.state.load_disk(0)
    assert (st.phase, st.sent_limit, st.resyncs) == ("delta", 0, 1)
    # and the next cycle is a plain delta again
    assert replicator(pki, m, srv.port, frame_bytes=FRAME).run_cycle().phases == ["disk 0: delta"]


def test_an_agent_that_lost_its_whole_state_resyncs_rather_than_starting_initial_again(tmp_path, pki, setup):
    """Reinstalled (or its state folder lost) and registered again, the agent has nothing
    recorded, but the replica holds the earlier agent's data: a fresh initial pass, which
    skips zeros, would leave blocks that are zero on the source now."""
    store, master, m, srv = setup
    first = replicator(pki, m, srv.port, frame_bytes=FRAME).run_cycle()
    for f in m.state.root.glob("disk-*"):
        f.unlink()
    with open(m.images[0], "r+b") as f:
        f.seek(4 * MiB)
        f.write(bytes(64 * 1024))  # data the replica holds, zero now
    applier = MachineApplier(store, DataKeyring(store, master), m.record)
    applying = threading.Thread(target=applier.apply_until, args=(first.marker_seq, 60), daemon=True)
    applying.start()
    report = replicator(pki, m, srv.port, frame_bytes=FRAME).run_cycle()
    applying.join(60)
    assert report.phases == ["disk 0: resync"]
    assert report.bytes_sent == 64 * 1024
    assert_replica_is_source(store, master, m, report.marker_seq, tmp_path)
