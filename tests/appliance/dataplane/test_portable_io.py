"""A whole replication cycle, agent and process server in one process, on the file I/O paths
Windows takes (no pread/pwrite/preadv, no SEEK_DATA, no directory fsync, no statvfs, no
renaming or deleting a file that is open): the replica still equals the source after initial
replication and a delta."""
from __future__ import annotations

import os
import sys

from replication_appliance.apply.applier import MachineApplier
from replication_appliance.apply.recovery_points import export_disk
from replication_appliance.common import fileio
from replication_appliance.common.secrets import MasterKey
from replication_appliance.storage import open_store
from replication_appliance.storage.keyring import DataKeyring

from .conftest import (
    InProcessServer,
    make_machine,
    random_writes,
    refuse_renaming_open_files,
    replicator,
    sha256,
)

MiB = 1 << 20
# os functions Windows does not have: gone for the test, so a guarded use takes its fallback and
# an unguarded one fails as it would there
POSIX_ONLY = ("preadv", "pread", "pwrite", "posix_fadvise", "fdatasync", "sync")


def _recording(name: str, real, called: list[str]):
    """`real`, noting calls made straight from the appliance's code (the standard library's
    portable wrappers, such as shutil.disk_usage over os.statvfs, may still use it here)."""
    def call(*args, **kwargs):
        if sys._getframe(1).f_globals.get("__name__", "").startswith("replication_appliance"):
            called.append(name)
        return real(*args, **kwargs)
    return call


def test_a_replication_cycle_on_the_portable_paths(tmp_path, pki, monkeypatch):
    monkeypatch.setattr(fileio, "POSITIONAL", False)
    monkeypatch.setattr(fileio, "SPARSE", False)
    monkeypatch.setattr(fileio, "DIRECTORY_FSYNC", False)
    monkeypatch.setattr(fileio, "RENAME_OPEN", False)
    called = []
    for name in POSIX_ONLY:
        monkeypatch.delattr(os, name)
    monkeypatch.setattr(os, "statvfs", _recording("statvfs", os.statvfs, called))
    refuse_renaming_open_files(monkeypatch, called)
    store = open_store(str(tmp_path / "storage"))
    master = MasterKey(os.urandom(32))
    m = make_machine(tmp_path, "portable01", [12 * MiB], seed=5, ps_port=0)
    srv = InProcessServer(pki, tmp_path / "cache", [m.record], store, master, segment_max_age=0.2)
    try:
        applier = MachineApplier(store, DataKeyring(store, master), m.record)
        for cycle in range(2):
            if cycle:
                random_writes(m.images[0], 40, seed=9)
            report = replicator(pki, m, srv.port).run_cycle()
            assert report.bytes_sent > 0
            applier.apply_until(report.marker_seq, 60)
            out = tmp_path / f"replica-{cycle}.img"
            export_disk(store, m.record, 0, out, None)
            assert sha256(out) == sha256(m.images[0])
    finally:
        srv.stop()
    assert called == []
