"""End to end through the commands users run: `mobility-agent run` -> process server (its own
process) -> Azurite -> `appliance apply` -> `appliance recovery-points` / `replica export`."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from replication_appliance.storage import open_store

from .conftest import TEXT, ServerProcess, make_machine, random_writes, sha256, wait_until

MiB = 1 << 20
HOLE = 40 * MiB


def run(args: list[str], env: dict | None = None) -> str:
    p = subprocess.run(args, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, f"{args[:3]} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p.stdout


def agent_cycle(state_dir: Path) -> tuple[str, int, int]:
    """(marker id, bytes sent, bytes of holes skipped without reading)"""
    out = run([sys.executable, "-m", "replication_appliance.agent.cli", "run", "--state-dir", str(state_dir),
               "--once", "--no-heartbeat"])
    m = re.search(r"marker (\w+) \(seq (\d+)\); read (\d+) bytes \(skipped (\d+) bytes of holes\), sent (\d+) bytes", out)
    assert m, out
    return m.group(1), int(m.group(5)), int(m.group(4))


def appliance(data_dir: Path, env: dict, *args: str) -> str:
    return run([sys.executable, "-m", "replication_appliance.cli", *args, "--data-dir", str(data_dir)], env)


def process_server_for(pki, m, azurite) -> tuple[ServerProcess, dict]:
    """A process server (not started yet) for machine `m`, whose agent state then points at it
    and holds its certificates; and the environment `appliance` commands need."""
    ps = ServerProcess(pki, m.state.root.parent / "appliance", [m.record], azurite.connection_string)
    m.config.process_server = f"127.0.0.1:{ps.port}"
    m.state.save_config(m.config)
    for name, src in (("ca.pem", pki.ca_pem), *zip(("agent.pem", "agent-key.pem"), pki.agent(m.id))):
        (m.state.root / name).write_bytes(Path(src).read_bytes())
    return ps, dict(os.environ, APPLIANCE_STORAGE_CONNECTION_STRING=azurite.connection_string)


def nonzero_bytes(path: Path) -> int:
    zero, n = bytes(4096), 0
    with open(path, "rb") as f:
        while block := f.read(4096):
            n += len(block) if block != zero else 0
    return n


@pytest.mark.slow
def test_initial_then_delta_cycles_replica_and_every_recovery_point_match(tmp_path, pki, azurite):
    # two disks: a 256 MiB system disk and a small data disk, each with real (mixed) content
    m = make_machine(tmp_path, "web01", [256 * MiB, 16 * MiB], seed=7, ps_port=0)
    # and a hole in the system disk's image, as a sparse file has where nothing was written
    subprocess.run(["fallocate", "--punch-hole", "--offset", str(64 * MiB + 512 * 1024), "--length", str(HOLE),
                    str(m.images[0])], check=True)
    ps, env = process_server_for(pki, m, azurite)
    ps.start()
    try:
        states: dict[str, list[str]] = {}
        marker, sent, skipped = agent_cycle(m.state.root)
        states[marker] = [sha256(p) for p in m.images]
        assert 0 < sent <= sum(nonzero_bytes(p) for p in m.images)  # zero blocks were skipped
        assert skipped >= HOLE  # the hole (and the image's other holes) was not even read
        delta_sent = []
        for cycle in range(3):
            random_writes(m.images[0], 300, seed=100 + cycle)
            random_writes(m.images[1], 20, seed=200 + cycle)
            marker, sent, skipped = agent_cycle(m.state.root)
            states[marker] = [sha256(p) for p in m.images]
            delta_sent.append(sent)
            assert skipped >= HOLE - 8 * MiB  # delta cycles do not read holes either
        assert all(0 < s < 16 * MiB for s in delta_sent), delta_sent  # deltas send the changes, not the disks

        # the cache logs in storage hold no plaintext: a run of source text is nowhere in them
        wait_until(lambda: ps.health()["backlog_bytes"] == 0, 60, "every segment uploaded")
        store = open_store(azurite.connection_string)
        needle = TEXT[1000:1064]
        assert needle in m.images[0].read_bytes()
        logs = store.list_blobs(f"logs/{m.id}/")
        assert logs and all(needle not in store.get_blob(b.name)[0] for b in logs)
        assert all(b.metadata.get("key_id") for b in logs)

        out = appliance(ps.workdir, env, "apply", "--machine", "web01", "--once")
        assert "applied up to sequence" in out and "4 recovery point(s)" in out
        assert store.list_blobs(f"logs/{m.id}/") == []  # applied logs are deleted from cache storage
        listing = appliance(ps.workdir, env, "recovery-points", "--machine", str(m.id)).splitlines()
        assert len(listing) == 4
        for line in listing:
            point_id, when, _ = line.split()
            assert point_id in states and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", when)
            for disk, expected in enumerate(states[point_id]):
                out_file = tmp_path / f"rp-{point_id}-{disk}.img"
                appliance(ps.workdir, env, "replica", "export", "--machine", "web01", "--disk", str(disk),
                          "--recovery-point", point_id, "--out", str(out_file))
                assert sha256(out_file) == expected, f"recovery point {point_id} disk {disk} differs from the source"
                out_file.unlink()
        current = tmp_path / "current.img"
        appliance(ps.workdir, env, "replica", "export", "--machine", "web01", "--disk", "0", "--out", str(current))
        assert sha256(current) == sha256(m.images[0])
        health = ps.health()
        assert health["backlog_bytes"] == 0 and health["upload_failures"] == 0 and health["ingested_bytes"] > 0
    finally:
        ps.stop()


@pytest.fixture()
def loop_device(tmp_path):
    """Attach an image to a free loop device (root and /dev/loop-control needed, as in CI)."""
    if os.geteuid() != 0 or not shutil.which("losetup") or not Path("/dev/loop-control").exists():
        pytest.skip("loop devices need root and /dev/loop-control")
    attached: list[str] = []

    def attach(image: Path) -> str:
        dev = subprocess.run(["losetup", "--find", "--show", str(image)], check=True, capture_output=True,
                             text=True).stdout.strip()
        attached.append(dev)
        return dev

    yield attach
    for dev in attached:
        subprocess.run(["losetup", "--detach", dev], check=False)


@pytest.mark.slow
def test_a_block_device_replicates_like_an_image(tmp_path, pki, azurite, loop_device):
    m = make_machine(tmp_path, "blk01", [48 * MiB], seed=21, ps_port=0)
    device = loop_device(m.images[0])
    assert Path(device).is_block_device()
    m.config.disks[0].path = device  # the agent reads the block device, not the file behind it
    ps, env = process_server_for(pki, m, azurite)
    ps.start()
    try:
        states = {}
        marker, sent, skipped = agent_cycle(m.state.root)
        states[marker] = sha256(Path(device))
        assert 0 < sent and skipped == 0  # a block device has no holes to skip
        random_writes(Path(device), 200, seed=5)  # written through the device
        marker, sent, _ = agent_cycle(m.state.root)
        states[marker] = sha256(Path(device))
        assert 0 < sent < 16 * MiB  # the changes, not the 48 MiB disk
        appliance(ps.workdir, env, "apply", "--machine", "blk01", "--once")
        for point_id, expected in states.items():
            out_file = tmp_path / f"rp-{point_id}.img"
            appliance(ps.workdir, env, "replica", "export", "--machine", "blk01", "--disk", "0",
                      "--recovery-point", point_id, "--out", str(out_file))
            assert sha256(out_file) == expected, f"recovery point {point_id} differs from the block device"
    finally:
        ps.stop()
