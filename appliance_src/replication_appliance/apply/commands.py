"""`appliance apply`, `appliance recovery-points`, `appliance replica export`: the cloud side,
which needs only the cache storage account and the master key (for the data keys)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
import uuid
from pathlib import Path

from ..common import fileio
from ..common.datadir import DataDir
from ..process_server.journal import read_state
from ..storage import store_for_data_dir
from ..storage.base import StorageError
from ..storage.keyring import DataKeyring
from .applier import ApplyError, MachineApplier, find_machine
from .recovery_points import export_disk, find_point, prune, recovery_points

DEFAULT_RETENTION_H = 24.0
MAX_RETRY_S = 30.0
log = logging.getLogger(__name__)


def _open(args):
    dd = DataDir(args.data_dir)
    store = store_for_data_dir(dd.root)
    machine = find_machine(store, args.machine)
    return dd, store, machine


def newest_received_marker(dd: DataDir, machine: uuid.UUID) -> int:
    """The newest consistency marker this appliance's process server has acknowledged."""
    return read_state(dd.cache_dir / str(machine)).last_marker_seq


def _hold_apply_lock(dd: DataDir, machine) -> int:
    """One apply per machine at a time: two would write the same replica out of order, and a
    recovery point snapshotted by one could hold the other's older data."""
    path = dd.root / f"apply-{machine.machine_id}.lock"
    fd = fileio.open_fd(path, os.O_RDWR | os.O_CREAT, 0o600)
    if not fileio.try_lock(fd):
        try:
            holder = fileio.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:  # Windows refuses to read a range another process locked
            holder = ""
        os.close(fd)
        raise ApplyError(f"another `appliance apply` for {machine.hostname} is running (process {holder or '?'}): "
                         "stop it first, or let it do the work")
    fileio.pwrite_all(fd, f"{os.getpid():<20}\n".encode(), 0)  # fixed width: no truncation of a locked file
    return fd  # held open (locked) until this process ends


def cmd_apply(args) -> int:
    dd, store, machine = _open(args)
    _hold_apply_lock(dd, machine)
    applier = MachineApplier(store, DataKeyring(store, dd.master_key()), machine)
    # applier.machine, not machine: apply follows the manifest as registrations change it
    if args.once:
        applier.apply_until(newest_received_marker(dd, machine.machine_id), args.timeout)
        pruned = prune(store, applier.machine, args.retention_hours * 3600)
        print(f"{applier.machine.hostname}: applied up to sequence {applier.applied_seq()}; "
              f"{len(recovery_points(store, applier.machine))} recovery point(s), {len(pruned)} pruned")
        return 0
    delay = args.poll
    while True:
        try:
            applied = applier.apply_available()
            pruned = prune(store, applier.machine, args.retention_hours * 3600)
            if applied or pruned:
                print(f"{applier.machine.hostname}: applied {applied} log(s), up to sequence {applier.applied_seq()}; "
                      f"{len(pruned)} recovery point(s) pruned", flush=True)
            delay = args.poll
        except StorageError as e:
            # Running on, storage outages pass: what is applied is recorded in storage, and a log
            # applied again after an interruption skips the sequences it already holds.
            delay = min(max(delay, args.poll) * 2, MAX_RETRY_S)
            log.warning("storage unavailable (%s); retrying in %.0fs", e, delay)
        time.sleep(delay)


def cmd_recovery_points(args) -> int:
    _, store, machine = _open(args)
    points = recovery_points(store, machine)
    if args.json:
        print(json.dumps([{"id": p.marker_id, "time": p.time_iso, "seq": p.seq,
                           "disks": [d for d, s in enumerate(p.snapshots) if s is not None],
                           "disk_sizes": [s for s in p.sizes if s is not None]} for p in points], indent=1))
    else:
        for p in points:
            missing = [str(d) for d, s in enumerate(p.snapshots) if s is None]
            added = f"  (before disk {', '.join(missing)} was added)" if missing else ""
            print(f"{p.marker_id}  {p.time_iso}  seq={p.seq}{added}")
    return 0


def cmd_export(args) -> int:
    _, store, machine = _open(args)
    point = find_point(store, machine, args.recovery_point) if args.recovery_point else None
    if args.out.exists() and args.out.is_dir():
        raise ApplyError(f"--out {args.out} is a directory: give the path of the raw image to write")
    size, written = export_disk(store, machine, args.disk, args.out, point)
    what = f"recovery point {point.marker_id} ({point.time_iso})" if point else "the current replica"
    print(f"wrote disk {args.disk} of {machine.hostname} from {what} to {args.out} ({size} bytes, {written} stored)")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, required=True, help="appliance data directory")
    p.add_argument("--machine", required=True, help="machine id or hostname")


def _hours(text: str) -> float:
    v = float(text)
    if not 0 < v <= 360:
        raise argparse.ArgumentTypeError(f"retention {text} h is not allowed: more than 0 and at most 360 (15 days)")
    return v


def register(subparsers) -> None:
    p = subparsers.add_parser("apply", help="apply cache logs to the replica disks (cloud side)",
                              description="Apply a machine's cache logs, in order, to its replica page blobs; "
                              "each consistency marker becomes a recovery point.")
    _common(p)
    p.add_argument("--once", action="store_true", help="apply up to the newest marker received, then return")
    p.add_argument("--timeout", type=float, default=600.0, help="with --once: seconds to wait for logs (default 600)")
    p.add_argument("--retention-hours", type=_hours, default=DEFAULT_RETENTION_H, help="recovery point retention (default 24)")
    p.add_argument("--poll", type=float, default=2.0, help=argparse.SUPPRESS)
    p.set_defaults(handler=cmd_apply)

    p = subparsers.add_parser("recovery-points", help="list a machine's recovery points")
    _common(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_recovery_points)

    replica = subparsers.add_parser("replica", help="replica disks").add_subparsers(dest="replica_command", required=True)
    p = replica.add_parser("export", help="write a replica disk (or a recovery point) as a raw image")
    _common(p)
    p.add_argument("--disk", type=int, required=True, help="disk index in registration order (0 first)")
    p.add_argument("--recovery-point", help="recovery point id or sequence (default: the current replica, as apply "
                   "left it: while apply runs, that may lie between two markers; a recovery point is consistent)")
    p.add_argument("--out", type=Path, required=True, help="raw image file to write")
    p.set_defaults(handler=cmd_export)
