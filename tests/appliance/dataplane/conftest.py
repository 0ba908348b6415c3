"""Fixtures of the data path tests: a PKI made with the appliance's own CA code, source images
with real content, Azurite, and a process server run in-process or as a killable process."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from replication_appliance.agent.link import Link, RateLimit
from replication_appliance.agent.replicator import Replicator
from replication_appliance.agent.state import AgentConfig, DiskConfig, StateDir
from replication_appliance.apply.applier import MachineApplier, find_machine
from replication_appliance.apply.recovery_points import export_disk, recovery_points
from replication_appliance.common.secrets import MasterKey
from replication_appliance.common.tls import (
    CertificateAuthority,
    cert_to_pem,
    client_ssl_context,
    key_to_pem,
    make_csr,
    new_private_key,
    server_ssl_context,
)
from replication_appliance.dataplane.session import MachineRecord, StaticDirectory
from replication_appliance.process_server.server import (
    ProcessServer,
    ProcessServerConfig,
)
from replication_appliance.storage.keyring import DataKeyring

from tests.fixtures.ports import free_port, wait_for_port

REPO = Path(__file__).resolve().parents[3]


@dataclass
class Pki:
    dir: Path
    ca: CertificateAuthority

    @property
    def ca_pem(self) -> Path: return self.dir / "ca.pem"
    @property
    def server_cert(self) -> Path: return self.dir / "data.pem"
    @property
    def server_key(self) -> Path: return self.dir / "data-key.pem"

    def agent(self, machine: uuid.UUID, role: str = "agent", ca: CertificateAuthority | None = None) -> tuple[Path, Path]:
        key = new_private_key()
        cert = (ca or self.ca).sign_client_csr(make_csr(key, "agent"), role, str(machine))
        name = f"{role}-{machine}-{'own' if ca is None else 'foreign'}"
        (self.dir / f"{name}.pem").write_bytes(cert_to_pem(cert))
        (self.dir / f"{name}-key.pem").write_bytes(key_to_pem(key))
        return self.dir / f"{name}.pem", self.dir / f"{name}-key.pem"

    def server_context(self):
        return server_ssl_context(self.server_cert, self.server_key, self.ca_pem, require_client_cert=True)

    def client_context(self, machine: uuid.UUID, **kw):
        cert, key = self.agent(machine, **kw)
        return client_ssl_context(self.ca_pem, cert, key)


def make_pki(d: Path, ca_name: str) -> Pki:
    """A new CA and the data port's certificate for 127.0.0.1, written to directory `d`."""
    d.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority.create(ca_name)
    (d / "ca.pem").write_bytes(cert_to_pem(ca.cert))
    cert, key = ca.issue_server("127.0.0.1", ["127.0.0.1"])
    (d / "data.pem").write_bytes(cert_to_pem(cert))
    (d / "data-key.pem").write_bytes(key_to_pem(key))
    return Pki(d, ca)


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), "dataplane-test")


TEXT = (REPO / "appliance_src" / "replication_appliance" / "agent" / "replicator.py").read_bytes()


def real_content(rng: random.Random, n: int) -> bytes:
    """Mixed content like a real disk: text, random (already compressed) data, zeros."""
    kind = rng.random()
    if kind < 0.45:
        start = rng.randrange(len(TEXT))
        out = (TEXT[start:] + TEXT) * (n // len(TEXT) + 2)
        return out[:n]
    if kind < 0.75:
        return rng.randbytes(n)
    if kind < 0.9:
        return bytes(n // 2) + rng.randbytes(n - n // 2)
    return bytes(n)


def make_image(path: Path, size: int, seed: int, chunk: int = 1 << 20) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, chunk):
            if rng.random() < 0.2:
                continue  # never written: stays a hole of zeros
            f.seek(off)
            f.write(real_content(rng, chunk))


def random_writes(path: Path, count: int, seed: int, block: int = 4096) -> None:
    """Writes at random 4 KiB blocks, some of them zeroing data that was there."""
    rng = random.Random(seed)
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)  # st_size is 0 for a block device
        for _ in range(count):
            n = block * rng.choice((1, 1, 1, 2, 8, 32))
            off = rng.randrange(0, size - n, block)
            f.seek(off)
            f.write(bytes(n) if rng.random() < 0.1 else real_content(rng, n))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Machine:
    record: MachineRecord
    images: list[Path]
    state: StateDir
    config: AgentConfig

    @property
    def id(self) -> uuid.UUID:
        return self.record.machine_id


def make_machine(root: Path, hostname: str, sizes: list[int], seed: int, ps_port: int) -> Machine:
    mid = uuid.uuid4()
    images = []
    for i, size in enumerate(sizes):
        img = root / f"{hostname}-disk{i}.img"
        make_image(img, size, seed + i)
        images.append(img)
    record = MachineRecord(mid, hostname, tuple(sizes))
    state = StateDir(root / f"{hostname}-agent")
    config = AgentConfig(str(mid), hostname, "127.0.0.1:1", f"127.0.0.1:{ps_port}",
                         [DiskConfig(str(p), s) for p, s in zip(images, sizes)])
    state.save_config(config)
    return Machine(record, images, state, config)


def first_disk_only(m: Machine) -> tuple[AgentConfig, MachineRecord, MachineRecord]:
    """Register the machine with its first disk only, for a test that adds the others later:
    (the config with every disk, the record with every disk, the record with the first)."""
    every_disk, record = m.config, m.record
    m.config = dataclasses.replace(every_disk, disks=every_disk.disks[:1])
    m.state.save_config(m.config)
    return every_disk, record, dataclasses.replace(record, disk_sizes=record.disk_sizes[:1])


def replicator(pki: Pki, m: Machine, port: int | None = None, **kw) -> Replicator:
    ctx = pki.client_context(m.id)
    port = port or int(m.config.process_server.rsplit(":", 1)[1])

    def connect(outbox):
        return Link(("127.0.0.1", port), ctx, m.id, outbox, RateLimit(None))

    return Replicator(m.config, m.state, connect, **kw)


def wait_uploaded(server: ProcessServer, timeout: float = 60) -> None:
    """Until everything received has left the cache: stop() leaves segments not yet uploaded
    there (the next start uploads them), and a test that applies after it would wait in vain."""
    wait_until(lambda: all(j.drained() for j in server.journals.all()), timeout, "the cache to be uploaded")


class InProcessServer:
    def __init__(self, pki: Pki, cache: Path, records: list[MachineRecord], store, master: MasterKey, **cfg) -> None:
        self.directory = StaticDirectory(records)
        self.server = ProcessServer(ProcessServerConfig(cache, port=0, **cfg), pki.server_context(),
                                    self.directory, store, master)
        self.port = self.server.start()

    def stop(self) -> None:
        self.server.stop()


@dataclass
class ServerProcess:
    """`python -m replication_appliance.process_server` as a child process that tests can SIGKILL."""
    pki: Pki
    workdir: Path
    records: list[MachineRecord]
    storage: str  # connection string or directory
    port: int = field(default_factory=free_port)
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None

    @property
    def cache(self) -> Path: return self.workdir / "cache"
    @property
    def master_key_path(self) -> Path: return self.workdir / "private" / "master.key"  # DataDir layout

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.master_key_path.exists():
            MasterKey.create(self.master_key_path)
        machines = self.workdir / "machines.json"
        machines.write_text(json.dumps([{"machine_id": str(r.machine_id), "hostname": r.hostname,
                                         "disk_sizes": list(r.disk_sizes)} for r in self.records]))
        env = dict(os.environ, APPLIANCE_STORAGE_CONNECTION_STRING=self.storage)
        with open(self.workdir / "process-server.log", "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "replication_appliance.process_server", "--cache-dir", str(self.cache),
                 "--cert", str(self.pki.server_cert), "--key", str(self.pki.server_key), "--ca", str(self.pki.ca_pem),
                 "--machines", str(machines), "--master-key", str(self.master_key_path), "--storage", "env",
                 "--port", str(self.port), "--segment-age", "1", *self.extra],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_for_port(self.port, timeout=30)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def health(self) -> dict:
        return json.loads((self.cache / "health.json").read_text())

    def master(self) -> MasterKey:
        return MasterKey.load(self.master_key_path)

    def log(self) -> str:
        return (self.workdir / "process-server.log").read_text()


def wait_until(pred, timeout: float, what: str, poll: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


def _open_here(path) -> bool:
    """Whether this process holds a descriptor of the file at `path`."""
    target = os.path.realpath(path)
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                return True
        except OSError:
            pass
    return False


def refuse_renaming_open_files(monkeypatch, refused: list[str]) -> None:
    """Make os.replace/rename/unlink/remove refuse a file this process holds open, as Windows
    does (os.open there does not ask for FILE_SHARE_DELETE); each refusal is noted in `refused`."""
    def refusing(real, name):
        def call(path, *args, **kwargs):
            # os.replace/rename(src, dst): neither may be open; unlink/remove(path)
            for p in (path, *args[:1]):
                if os.path.exists(p) and _open_here(p):
                    refused.append(f"{name} of an open file {p}")
                    raise PermissionError(13, "The process cannot access the file because it is being used by "
                                              "another process (Windows' sharing rule, emulated)", str(p))
            return real(path, *args, **kwargs)
        return call

    for name in ("replace", "rename", "unlink", "remove"):
        monkeypatch.setattr(os, name, refusing(getattr(os, name), name))


def verify_points(store, master, m, states: dict[int, list[str]], tmp: Path) -> None:
    """Apply everything, then compare every recovery point (by marker seq) with the source states."""
    applier = MachineApplier(store, DataKeyring(store, master), find_machine(store, str(m.id)))
    applier.apply_until(max(states), timeout=120)
    points = {p.seq: p for p in recovery_points(store, m.record)}
    assert set(states) <= set(points), (sorted(states), sorted(points))
    for seq, hashes in states.items():
        for disk, expected in enumerate(hashes):
            out = tmp / f"verify-{seq}-{disk}.img"
            export_disk(store, m.record, disk, out, points[seq])
            assert sha256(out) == expected, f"recovery point at seq {seq}, disk {disk} differs from the source"
            out.unlink()
