"""The data directory's configuration file is replaced atomically: a failed save keeps the old one."""
from __future__ import annotations

import errno
import json
import os

import pytest
from replication_appliance.common import fileio
from replication_appliance.common.datadir import ApplianceConfig, DataDir
from replication_appliance.common.errors import DataDirError


def _short_write_then_disk_full(fd, data, offset):
    os.pwrite(fd, bytes(data[:len(data) // 2]), offset)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fsync_fails(_fd):
    raise OSError(errno.EIO, os.strerror(errno.EIO))  # the data never reached the disk


@pytest.mark.parametrize("where, failure", [("pwrite", _short_write_then_disk_full), ("fsync", _fsync_fails)])
def test_failed_config_save_keeps_the_old_file(tmp_path, monkeypatch, where, failure):
    d = DataDir(tmp_path)
    d.save_config(ApplianceConfig(hostname="old.example", addresses=["10.0.0.1"], db_url="sqlite:///old.db"))
    before = d.config_path.read_bytes()
    monkeypatch.setattr(fileio if where == "pwrite" else os, where, failure)
    with pytest.raises(DataDirError, match=f"cannot save the configuration to {d.config_path}"):
        d.save_config(ApplianceConfig(hostname="new.example", addresses=["10.0.0.2"], db_url="sqlite:///new.db"))
    monkeypatch.undo()
    assert d.config_path.read_bytes() == before
    assert d.load_config().hostname == "old.example"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # no temp file left behind


def test_config_save_replaces_the_file_whole(tmp_path):
    d = DataDir(tmp_path)
    for name in ("a.example", "b.example"):
        d.save_config(ApplianceConfig(hostname=name, addresses=[], db_url="sqlite:///x.db"))
    assert json.loads(d.config_path.read_text())["hostname"] == "b.example"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
