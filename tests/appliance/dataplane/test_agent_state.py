"""The agent's state files are replaced atomically and the replacement made durable: the folder
is fsynced after the rename, so power loss cannot bring back the previous file. Disks dropped
by a registration are marked for a resync should they come back."""
from __future__ import annotations

from pathlib import Path

from replication_appliance.agent.replicator import _needs_resync
from replication_appliance.agent.state import (
    PHASE_DELTA,
    AgentConfig,
    DiskConfig,
    DiskState,
    StateDir,
)
from replication_appliance.common import fileio
from replication_appliance.dataplane.digests import DigestMap

MiB = 1 << 20


def test_state_and_digest_map_saves_fsync_their_folder_after_the_rename(tmp_path, monkeypatch):
    synced: list[tuple[Path, list[str]]] = []  # each folder fsynced, with what it held then
    monkeypatch.setattr(fileio, "fsync_dir", lambda p: synced.append((Path(p), sorted(f.name for f in Path(p).iterdir()))))
    state = StateDir(tmp_path / "agent")

    state.save_config(AgentConfig("00000000-0000-0000-0000-000000000001", "host", "cs:443", "ps:9443",
                                  [DiskConfig("/dev/sdb", 8 * MiB)]))
    assert synced == [(state.root, ["agent.json"])]
    state.save_disk(0, DiskState(initial_offset=4 * MiB, sent_limit=8 * MiB))
    assert synced[1:] == [(state.root, ["agent.json", "disk-0.json"])]
    DigestMap(8 * MiB).save(state.digests(0))
    assert synced[2:] == [(state.root, ["agent.json", "disk-0.digests", "disk-0.json"])]
    assert state.load_disk(0).sent_limit == 8 * MiB


def test_disks_dropped_by_a_registration_are_resynced_if_they_come_back(tmp_path):
    state = StateDir(tmp_path)
    state.drop_disks_from(0)  # nothing registered here yet: nothing to do
    disks = [DiskConfig(str(tmp_path / f"d{i}.img"), MiB) for i in range(3)]
    state.save_config(AgentConfig("00000000-0000-0000-0000-000000000001", "h", "a:443", "a:9443", disks))
    for disk in range(3):
        state.save_disk(disk, DiskState(phase=PHASE_DELTA, cycles=4))
        DigestMap(MiB).save(state.digests(disk))
    state.drop_disks_from(3)  # none dropped
    assert all(state.digests(d).exists() for d in range(3))
    state.drop_disks_from(1)
    assert state.digests(0).exists() and state.load_disk(0).cycles == 4
    for disk in (1, 2):
        assert not state.digests(disk).exists()
        assert _needs_resync(state.load_disk(disk), None, agent_state_lost=False, server_seq=0)


def test_a_server_reporting_less_than_it_acknowledged_asks_for_a_resync():
    """A process server whose WELCOME is below what it acknowledged for a disk's state lost
    durable data (cache replaced, machine moved before its old cache was uploaded)."""
    dmap = DigestMap(MiB)
    delta = DiskState(phase=PHASE_DELTA, cycles=3, acked_seq=500)
    initial = DiskState(initial_offset=MiB // 2, sent_limit=MiB, acked_seq=500)
    for st in (delta, initial):
        assert not _needs_resync(st, dmap, agent_state_lost=False, server_seq=500)
        assert _needs_resync(st, dmap, agent_state_lost=False, server_seq=499)
    # a state saved before the sequence was recorded asks for nothing
    assert not _needs_resync(DiskState(phase=PHASE_DELTA, cycles=3), dmap, agent_state_lost=False, server_seq=0)
