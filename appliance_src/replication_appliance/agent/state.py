"""The agent's state directory.

    S/agent.json          identity, servers, disks (written by `register`)
    S/agent.pem, S/agent-key.pem, S/ca.pem   client certificate, its key (0600), appliance CA
    S/disk-<n>.json       phase (initial / delta), initial replication checkpoint and sent limit, cycles
    S/disk-<n>.digests    digest map of what the replica holds (see digests.py)
    S/agent.lock          locked by the one `register` or `run` using the folder
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from ..common import fileio
from ..common.errors import ApplianceError

PHASE_INITIAL = "initial"
PHASE_DELTA = "delta"


class AgentStateError(ApplianceError):
    """The state directory is missing, incomplete, or not this agent's."""


def _write_atomic(path: Path, text: str) -> None:
    fileio.replace_file(path, text.encode())


def _lock(fd: int, exclusive: bool) -> None:
    """Lock the file without waiting (OSError: another process holds it), or unlock it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK if exclusive else msvcrt.LK_UNLCK, 1)
    else:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_UN)


@dataclass
class DiskConfig:
    path: str
    size: int


@dataclass
class AgentConfig:
    machine_id: str
    hostname: str
    control_server: str  # host:port of the configuration server (443)
    process_server: str  # host:port of the assigned process server (9443)
    disks: list[DiskConfig]
    interval_s: float = 300.0  # crash-consistent interval (policy; default 5 min)

    @property
    def machine(self) -> uuid.UUID:
        return uuid.UUID(self.machine_id)


@dataclass
class DiskState:
    phase: str = PHASE_INITIAL
    initial_offset: int = 0  # initial replication acknowledged up to here
    # Initial replication sends nothing at or beyond this offset before recording a larger one:
    # frames up to here may have reached the process server without being acknowledged yet. A
    # delta cycle sets it to the disk's size before its first frame; every finished cycle
    # clears it, so a delta phase with a limit means a cycle broke off after sending (resync).
    sent_limit: int = 0
    cycles: int = 0
    last_marker_id: str = ""
    # The machine's sequence the process server had acknowledged when this state was saved: a
    # server that later reports less lost data it made durable (its cache replaced, or the
    # machine moved before the old cache was uploaded), which only a resync repairs.
    acked_seq: int = 0
    resyncs: int = 0
    bytes_sent: int = 0


@dataclass
class StateDir:
    root: Path

    @property
    def config_path(self) -> Path: return self.root / "agent.json"
    @property
    def ca(self) -> Path: return self.root / "ca.pem"
    @property
    def cert(self) -> Path: return self.root / "agent.pem"
    @property
    def key(self) -> Path: return self.root / "agent-key.pem"

    @contextlib.contextmanager
    def exclusive(self, create: bool = False) -> Iterator[None]:
        """Held by `register` (which `create`s the folder) and `run`: two agents on one state
        folder would each number the machine's frames and overwrite each other's digest maps
        and checkpoints."""
        path = self.root / "agent.lock"
        if not create and not self.root.is_dir():
            raise AgentStateError(f"{self.root} holds no registered agent (no such folder): run `mobility-agent "
                                  "register` first")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise AgentStateError(f"the state folder {self.root} cannot be used: {e.strerror or e}") from None
        try:
            try:
                _lock(fd, exclusive=True)
            except OSError:
                raise AgentStateError(f"another mobility-agent is using {self.root} (it holds {path}): stop it first, "
                                      "or give this one a state folder of its own") from None
            yield
            _lock(fd, exclusive=False)
        finally:
            os.close(fd)  # releases the lock too (at once on POSIX, some time after on Windows)

    def digests(self, disk: int) -> Path:
        return self.root / f"disk-{disk}.digests"

    def load_config(self) -> AgentConfig:
        try:
            data = json.loads(self.config_path.read_text())
        except FileNotFoundError:
            raise AgentStateError(f"{self.root} holds no registered agent (no agent.json): run `mobility-agent register` first") from None
        except json.JSONDecodeError as e:
            raise AgentStateError(f"{self.config_path} is not valid JSON: {e}") from None
        try:
            data["disks"] = [DiskConfig(**d) for d in data["disks"]]
            return AgentConfig(**data)
        except (KeyError, TypeError) as e:
            raise AgentStateError(f"{self.config_path} is incomplete or has unknown fields: {e}") from None

    def save_config(self, config: AgentConfig) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.config_path, json.dumps(asdict(config), indent=1))

    def drop_disks_from(self, count: int) -> None:
        """The machine is registered again with `count` disks, fewer than the config here has.
        Data of the dropped ones still waiting on the process server goes with them, so their
        digest maps (which count it as sent) no longer describe their replicas: should such a
        disk be registered again, it is resynced (a delta phase without a map)."""
        try:
            had = len(self.load_config().disks)
        except AgentStateError:  # nothing registered here before
            return
        for disk in range(count, had):
            self.digests(disk).unlink(missing_ok=True)  # first: without a map, any phase with progress resyncs
            self.save_disk(disk, DiskState(phase=PHASE_DELTA))

    def load_disk(self, disk: int) -> DiskState:
        try:
            return DiskState(**json.loads((self.root / f"disk-{disk}.json").read_text()))
        except FileNotFoundError:
            return DiskState()

    def save_disk(self, disk: int, state: DiskState) -> None:
        _write_atomic(self.root / f"disk-{disk}.json", json.dumps(asdict(state)))
