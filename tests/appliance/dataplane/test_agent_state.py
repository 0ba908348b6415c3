"""The agent's state files are replaced atomically and the replacement made durable: the folder
is fsynced after the rename, so power loss cannot bring back the previous file."""
from __future__ import annotations

from pathlib import Path

from replication_appliance.agent.state import (
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
