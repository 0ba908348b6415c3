"""`mobility-agent register|run`."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import socket
import ssl
import sys
import time
from pathlib import Path

from ..common.errors import ApplianceError
from ..common.tls import client_ssl_context
from . import control_client
from .link import Link, LinkLost, RateLimit
from .replicator import Replicator
from .source import disk_size, source_path
from .state import PHASE_INITIAL, AgentStateError, DiskConfig, StateDir

log = logging.getLogger("mobility-agent")
_RATE = re.compile(r"^(\d+(?:\.\d+)?)([KMG]?)$", re.IGNORECASE)


def parse_rate(text: str) -> float:
    """'100M' -> bytes per second (K, M, G are powers of 1024)."""
    m = _RATE.match(text.strip())
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"--max-rate {text!r} is not a rate: use bytes per second, e.g. 500K, 100M, 1G")
    return float(m.group(1)) * {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}[m.group(2).upper()]


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
    return value


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def cmd_register(args) -> int:
    disks = [DiskConfig(path, disk_size(path)) for path in map(source_path, args.disk)]
    passphrase = args.passphrase_file.read_text().strip()
    config = control_client.register(args.server, passphrase, args.ca_file, StateDir(args.state_dir), disks,
                                     args.hostname or socket.gethostname(), args.host_id or control_client.host_id())
    ps = config.process_server or "not assigned yet (the appliance assigns one on a later heartbeat)"
    print(f"registered {config.hostname} as machine {config.machine_id}; process server {ps}; {len(disks)} disk(s)")
    return 0


# The states to report first when the appliance refuses a jump (409), e.g. after it saw the
# machine as not_enabled: the state machine only moves one allowed step at a time.
_WALK = {
    "initial_sync": [("initiating", None)],
    "continuous": [("initiating", None), ("initial_sync", 100.0)],
    "resync": [("initiating", None), ("initial_sync", 100.0), ("continuous", None)],
}


class Reporter:
    """Heartbeats carrying the replication state and per-disk counters."""

    def __init__(self, config, state: StateDir, enabled: bool) -> None:
        self.config, self.state, self.enabled = config, state, enabled

    def _disks(self) -> list[dict]:
        out = []
        for i, d in enumerate(self.config.disks):
            st = self.state.load_disk(i)
            done = d.size if st.phase != PHASE_INITIAL else st.initial_offset
            out.append({"name": d.path, "total_bytes": d.size, "replicated_bytes": done, "backlog_bytes": d.size - done})
        return out

    def _send(self, state_name: str, percent: float | None):
        body: dict = {"state": state_name, "disks": self._disks()}
        if state_name == "initial_sync":
            total = sum(d["total_bytes"] for d in body["disks"])
            body["initial_sync_percent"] = percent if percent is not None else round(
                100 * sum(d["replicated_bytes"] for d in body["disks"]) / total, 1)
        return control_client.heartbeat(self.config, self.state, body)

    def send(self, state_name: str, percent: float | None = None):
        if not self.enabled:
            return None
        try:
            try:
                return self._send(state_name, percent)
            except control_client.ControlError as e:
                if e.status != 409 or state_name not in _WALK:
                    raise
                for step, pct in _WALK[state_name]:
                    try:
                        self._send(step, pct)
                    except control_client.ControlError as step_error:
                        if step_error.status != 409:
                            raise
                return self._send(state_name, percent)
        except ApplianceError as e:
            log.warning("heartbeat failed: %s", e)
            return None

    def current(self, resync: bool = False):
        if resync:
            return self.send("resync")
        initial = any(self.state.load_disk(i).phase == PHASE_INITIAL for i in range(len(self.config.disks)))
        return self.send("initial_sync" if initial else "continuous")


def next_desired(answer: control_client.Desired | None,
                 last: control_client.Desired | None) -> control_client.Desired | None:
    """The desired state after a cycle: the configuration server's answer or, if the heartbeat
    failed, the last one known, but not a resync: the cycle did it, and repeating it would
    delete the digest maps and resync again for as long as heartbeats fail."""
    if answer is not None:
        return answer
    if last is not None and last.state == "resync":
        return dataclasses.replace(last, state="replicate")
    return last


def cmd_run(args) -> int:
    state = StateDir(args.state_dir)
    config = state.load_config()
    try:
        ctx = client_ssl_context(state.ca, state.cert, state.key)
    except (ssl.SSLError, OSError) as e:
        raise AgentStateError(f"the agent's certificate, key or CA in {state.root} cannot be used ({e}): "
                              "run `mobility-agent register` again") from None
    rate = RateLimit(args.max_rate)
    reporter = Reporter(config, state, args.heartbeat)

    def connect(outbox):
        return Link(_address(config.process_server), ctx, config.machine, outbox, rate)

    desired = reporter.current()
    while True:
        interval = args.interval or (desired.interval_s if desired else config.interval_s)
        if desired and desired.process_server and desired.process_server != config.process_server:
            log.info("the appliance assigned process server %s", desired.process_server)
            config.process_server = desired.process_server
            state.save_config(config)
        if not config.process_server:
            raise AgentStateError("no process server is assigned to this machine yet: check `appliance status` "
                                  "on the appliance (process server health and headroom)")
        wanted = desired.state if desired else "replicate"
        if wanted in ("pause", "stop"):
            if args.once:
                raise AgentStateError(f"the appliance's desired state for this machine is {wanted!r}: enable or resume "
                                      "replication on the appliance first")
            desired = (reporter.send("paused") if wanted == "pause" else reporter.current()) or desired
            time.sleep(interval)
            continue
        resync = wanted == "resync"
        if resync:
            for i in range(len(config.disks)):
                state.digests(i).unlink(missing_ok=True)
        desired = reporter.current(resync) or desired
        try:
            report = Replicator(config, state, connect, reconnect_for=args.reconnect_for).run_cycle()
        except LinkLost as e:
            if args.once:
                raise
            # e.g. the process server is down for maintenance: a failed cycle is simply repeated
            log.error("cycle failed: %s; next attempt in %.0fs", e, interval)
        else:
            print(f"cycle done: marker {report.marker_id} (seq {report.marker_seq}); read {report.bytes_read} bytes "
                  f"(skipped {report.bytes_skipped} bytes of holes), "
                  f"sent {report.bytes_sent} bytes in {report.frames} frames, {report.seconds:.1f}s, "
                  f"{report.reconnects} reconnects, {report.throttle_events} throttle events", flush=True)
        desired = next_desired(reporter.current(), desired)
        if args.once:
            return 0
        time.sleep(interval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mobility-agent", description="Replicates this machine's disks to the appliance.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("register", help="register with the appliance and get a client certificate")
    p.add_argument("--server", required=True, help="configuration server HOST:PORT (443)")
    p.add_argument("--passphrase-file", type=Path, required=True, help="file holding the appliance's registration passphrase")
    p.add_argument("--ca-file", type=Path, required=True, help="the appliance CA certificate (DATA_DIR/ca.pem)")
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--disk", action="append", required=True, help=r"block device (/dev/sdb), Windows physical drive (\\.\PhysicalDrive1) or image file; "
                   "repeat for each disk")
    p.add_argument("--hostname", help="name to register (default: this host's name)")
    p.add_argument("--host-id", help="stable host identity (default: /etc/machine-id)")
    p.set_defaults(handler=cmd_register)
    p = sub.add_parser("run", help="replicate: initial replication, then a delta cycle every interval")
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--once", action="store_true", help="one cycle, returning once the process server acknowledged it")
    p.add_argument("--max-rate", type=parse_rate, help="bandwidth limit in bytes per second (500K, 100M, 1G)")
    p.add_argument("--interval", type=float, help="seconds between cycles (default: the policy's crash-consistent interval)")
    p.add_argument("--no-heartbeat", dest="heartbeat", action="store_false", help="do not call the configuration server")
    p.add_argument("--reconnect-for", type=_seconds, default=300.0, metavar="SECONDS",
                   help="how long a cycle keeps trying to reach the process server before it fails (default 300); "
                   "without --once the next cycle tries again")
    p.set_defaults(handler=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        with StateDir(args.state_dir).exclusive(create=args.command == "register"):
            return int(args.handler(args) or 0)
    except ApplianceError as e:
        print(f"mobility-agent {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
