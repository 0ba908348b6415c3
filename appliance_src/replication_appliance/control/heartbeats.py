"""Agent heartbeats served from memory and written to the database in batches.

200 agents at 1/s would otherwise cost seven database round trips each. Here a heartbeat is
validated and answered from an in-memory view of the machine (certificate fingerprint,
desired state, policy, process server), and the agent-owned figures it carries (state, sync
percent, disk counters, last heartbeat) are written once a second for all machines in one
transaction, together with the audit entries of state changes: state changes at the next
flush (1 s), plain counters of a machine at most every 30 s.

The view is reloaded from the database whenever an operator or a registration changes the
machine (`invalidate`), and operator reads never see older data than
the last answered heartbeat (they overlay `live` figures on the rows); other processes (`appliance status`) may see counters up to 30 s
old. A crash loses at most that much telemetry, never a state change older than 1 s."""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sqlalchemy import case, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, joinedload, selectinload, sessionmaker

from ..common.tls import ROLE_AGENT
from ..db.models import AuditEntry, Disk, Machine, ProcessServer
from ..health import rules
from ..health.state_machine import (
    Desired,
    Report,
    State,
    TransitionError,
    accept_report,
    settle_desired,
)
from . import schemas as s
from .service import (
    HEARTBEAT_INTERVAL_S,
    ConflictError,
    ForbiddenError,
    InvalidError,
    choose_process_server,
    load_machine,
    policy_out,
    ps_out,
)

__all__ = ["ForbiddenError", "HeartbeatStore"]

FLUSH_INTERVAL_S = 1.0
TELEMETRY_WRITE_S = 30.0
log = logging.getLogger("replication_appliance.control.heartbeats")


@dataclass
class MachineView:
    """What the server needs to answer a heartbeat; owned by operators and registration."""
    fingerprint: str | None
    desired: Desired
    policy: s.PolicyOut
    process_server: s.ProcessServerOut | None
    disk_ids: dict[str, int]  # name -> id

    @property
    def disk_names(self) -> frozenset[str]:
        return frozenset(self.disk_ids)


@dataclass
class AgentFigures:
    """What the agent owns; authoritative in memory once loaded, flushed to the database."""
    state: State
    percent: float | None
    state_changed_at: dt.datetime
    last_heartbeat_at: dt.datetime | None
    disks: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # name -> total, replicated, backlog
    disk_ids: dict[str, int] = field(default_factory=dict)
    audits: list[tuple[State, State, str, dt.datetime]] = field(default_factory=list)
    resync_settled: bool = False
    returned: bool = False  # first heartbeat after a silence (a new or restarted agent)
    written_at: float = 0.0  # monotonic time of the last write to the database

    def urgent(self) -> bool:
        """A state change (and its audit entry), or an agent heard again after a silence (push
        install waits for that), is written at the next flush, not later."""
        return bool(self.audits) or self.resync_settled or self.returned


class HeartbeatStore:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self._views: dict[str, MachineView] = {}
        self._figures: dict[str, AgentFigures] = {}
        self._dirty: set[str] = set()
        self._throttled: dict[str, bool] = {}
        self._all_stale = False
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()

    # --- views -------------------------------------------------------------------------------
    def invalidate(self, machine_id: str | None = None) -> None:
        """Forget the operator-owned view of one machine (None: of every machine, reloaded in bulk)."""
        with self._lock:
            if machine_id is None:
                self._views.clear()
                self._all_stale = True
            else:
                self._views.pop(machine_id, None)

    def needs_load(self, machine_id: str) -> bool:
        with self._lock:
            view = self._views.get(machine_id)
            return view is None or (view.process_server is None and view.desired != Desired.STOP)

    def load(self, machine_id: str, now: dt.datetime) -> None:
        """Read the machine from the database (and assign a process server if it needs one); after
        a global invalidation, read every machine at once rather than one request each."""
        if self._all_stale:
            self.load_all()
            if not self.needs_load(machine_id):
                return
        with self._sessions.begin() as session:
            machine = load_machine(session, machine_id)
            if machine.process_server is None and machine.desired_state != Desired.STOP.value:
                machine.process_server = choose_process_server(session, now)
            self._keep(machine)

    def load_all(self) -> None:
        """Every machine's view in three queries: at start, so 200 agents do not each hit the database."""
        with self._sessions.begin() as session:
            machines = session.scalars(select(Machine).options(selectinload(Machine.disks), joinedload(Machine.policy),
                                                               joinedload(Machine.process_server))).unique().all()
            with self._lock:
                self._all_stale = False
            for machine in machines:
                self._keep(machine)

    def _keep(self, machine: Machine) -> None:
        view = MachineView(machine.cert_fingerprint, Desired(machine.desired_state), policy_out(machine.policy),
                           ps_out(machine.process_server), {d.name: d.id for d in machine.disks})
        figures = AgentFigures(State(machine.replication_state), machine.initial_sync_percent,
                               machine.state_changed_at, machine.last_heartbeat_at,
                               {d.name: (d.total_bytes, d.replicated_bytes, d.backlog_bytes) for d in machine.disks})
        if machine.process_server is not None:
            self._throttled[machine.process_server.id] = (
                machine.process_server.cache_free_percent < rules.CACHE_FREE_THROTTLE_PERCENT)
        # Spread the machines' telemetry writes over the interval instead of writing them all together.
        figures.written_at = time.monotonic() - random.uniform(0, TELEMETRY_WRITE_S)
        with self._lock:
            self._views[machine.id] = view
            current = self._figures.setdefault(machine.id, figures)
            # Disks a re-registration added or removed: keep counters only for registered disks.
            current.disks = {n: current.disks.get(n, figures.disks.get(n, (0, 0, 0))) for n in view.disk_ids}
            current.disk_ids = dict(view.disk_ids)

    # --- the hot path ------------------------------------------------------------------------
    def apply(self, machine_id: str, fingerprint: str, hb: s.Heartbeat, remote: str,
              now: dt.datetime) -> s.DesiredStateOut | None:
        """The answer to a heartbeat (None: the view was invalidated meanwhile, load it again)."""
        with self._lock:
            view, figures = self._views.get(machine_id), self._figures.get(machine_id)
            if view is None or figures is None:
                return None
            if view.fingerprint != fingerprint:
                raise ForbiddenError("this certificate was replaced by a newer registration of the machine: use the new one")
            try:
                stored = accept_report(figures.state, figures.percent, Report(State(hb.state), hb.initial_sync_percent))
            except TransitionError as exc:
                raise ConflictError(str(exc)) from None
            counters = {}
            for c in hb.disks:  # validate every disk before changing anything
                if c.name not in view.disk_names:
                    raise InvalidError(f"disk {c.name!r} is not registered for this machine: registered are "
                                       f"{', '.join(sorted(view.disk_names))}")
                if c.replicated_bytes > c.total_bytes:
                    raise InvalidError(f"disk {c.name!r}: replicated_bytes {c.replicated_bytes} exceeds total_bytes {c.total_bytes}")
                counters[c.name] = (c.total_bytes, c.replicated_bytes, c.backlog_bytes)
            if stored.state != figures.state:
                figures.audits.append((figures.state, stored.state, remote, now))
                figures.state_changed_at = now
            silence = dt.timedelta(seconds=2 * HEARTBEAT_INTERVAL_S)
            if figures.last_heartbeat_at is None or now - figures.last_heartbeat_at > silence:
                figures.returned = True
            figures.state, figures.percent, figures.last_heartbeat_at = stored.state, stored.initial_sync_percent, now
            figures.disks.update(counters)
            settled = settle_desired(view.desired, stored.state)
            if settled != view.desired:
                view.desired, figures.resync_settled = settled, True
            self._dirty.add(machine_id)
            throttled = view.process_server is not None and self._throttled.get(view.process_server.id, False)
            return s.DesiredStateOut(desired_state=view.desired, process_server=view.process_server, throttled=throttled,
                                     policy=view.policy, heartbeat_interval_s=HEARTBEAT_INTERVAL_S)

    def live(self, machine_id: str) -> AgentFigures | None:
        """A copy of the newest agent figures of a machine, for operator reads (None: not in memory)."""
        with self._lock:
            f = self._figures.get(machine_id)
            return None if f is None else AgentFigures(f.state, f.percent, f.state_changed_at, f.last_heartbeat_at,
                                                       dict(f.disks))

    # --- writing -----------------------------------------------------------------------------
    def flush(self, everything: bool = True) -> int:
        """Write machines heartbeated since their last write; returns how many. The periodic
        flush (`everything=False`) writes state changes at once but plain telemetry of a machine
        at most every TELEMETRY_WRITE_S, so the database and the GIL see a trickle, not a burst;
        operator reads flush everything first."""
        with self._flush_lock:
            return self._flush(everything)

    def _flush(self, everything: bool) -> int:
        now = time.monotonic()
        with self._lock:
            due = [m for m in self._dirty if everything or self._figures[m].urgent()
                   or now - self._figures[m].written_at >= TELEMETRY_WRITE_S]
            batch = {m: self._take(m, now) for m in due}
            self._dirty.difference_update(due)
        if not batch:
            return 0
        try:
            self._write(batch)
        except SQLAlchemyError:
            with self._lock:  # keep them for the next flush; newer heartbeats win
                for m, snap in batch.items():
                    self._figures[m].audits[:0] = snap["audits"]
                    self._figures[m].resync_settled |= snap["resync_settled"]
                    self._figures[m].returned |= snap["returned"]
                    self._dirty.add(m)
            raise
        return len(batch)

    @contextmanager
    def registering(self) -> Iterator[Callable[[str], None]]:
        """Around an agent registration: pending state changes are written first and no flush
        runs until it ends. Call the yielded function with the machine id once the registration
        committed: the replaced agent's figures are dropped, so the next load takes the new
        agent's from the row the registration wrote, and no flush of old figures lands on it."""
        with self._flush_lock:
            self._flush(everything=False)
            yield self._forget

    def _forget(self, machine_id: str) -> None:
        with self._lock:
            self._views.pop(machine_id, None)
            self._figures.pop(machine_id, None)
            self._dirty.discard(machine_id)

    def _take(self, machine_id: str, now: float) -> dict:
        f = self._figures[machine_id]
        f.written_at = now
        snap = {"state": f.state.value, "percent": f.percent, "changed": f.state_changed_at, "seen": f.last_heartbeat_at,
                "disks": {f.disk_ids[n]: c for n, c in f.disks.items() if n in f.disk_ids}, "audits": f.audits, "resync_settled": f.resync_settled,
                "returned": f.returned}
        f.audits, f.resync_settled, f.returned = [], False, False
        return snap

    def _write(self, batch: dict[str, dict]) -> None:
        with self._sessions.begin() as session:
            conn = session.connection()
            machines = [(m, v) for m, v in batch.items()]
            for chunk in _chunks(machines):
                ids = [m for m, _ in chunk]
                conn.execute(update(Machine).where(Machine.id.in_(ids)).values(
                    replication_state=_case(Machine.id, {m: v["state"] for m, v in chunk}),
                    initial_sync_percent=_case(Machine.id, {m: v["percent"] for m, v in chunk}),
                    state_changed_at=_case(Machine.id, {m: v["changed"] for m, v in chunk}),
                    last_heartbeat_at=_case(Machine.id, {m: v["seen"] for m, v in chunk}),
                ).execution_options(synchronize_session=False))
            disks = [(disk_id, counters) for v in batch.values() for disk_id, counters in v["disks"].items()]
            for chunk in _chunks(disks):
                conn.execute(update(Disk).where(Disk.id.in_([d for d, _ in chunk])).values(
                    total_bytes=_case(Disk.id, {d: c[0] for d, c in chunk}),
                    replicated_bytes=_case(Disk.id, {d: c[1] for d, c in chunk}),
                    backlog_bytes=_case(Disk.id, {d: c[2] for d, c in chunk}),
                ).execution_options(synchronize_session=False))
            settled = [m for m, v in batch.items() if v["resync_settled"]]
            if settled:  # only if no operator changed it meanwhile
                conn.execute(update(Machine).where(Machine.id.in_(settled), Machine.desired_state == Desired.RESYNC.value)
                             .values(desired_state=Desired.REPLICATE.value).execution_options(synchronize_session=False))
            for m, v in batch.items():
                for before, after, remote, at in v["audits"]:
                    session.add(AuditEntry(at=at, actor=f"{ROLE_AGENT}:{m}", action="machine.state_changed",
                                           target_type="machine", target_id=m,
                                           details=json.dumps({"from": before.value, "to": after.value}), remote_address=remote))

    def refresh_process_servers(self) -> None:
        """Which process servers are throttling (cache free space below 20 %)."""
        with self._sessions.begin() as session:
            rows = session.execute(select(ProcessServer.id, ProcessServer.cache_free_percent)).all()
        # replaced whole (one assignment), so a removed process server goes too
        self._throttled = {ps_id: free < rules.CACHE_FREE_THROTTLE_PERCENT for ps_id, free in rows}

    async def run_flusher(self, interval_s: float = FLUSH_INTERVAL_S) -> None:
        """Flush every `interval_s` until cancelled, then a last time."""
        try:
            while True:
                await asyncio.sleep(interval_s)
                try:
                    await asyncio.to_thread(self.flush, False)
                    await asyncio.to_thread(self.refresh_process_servers)
                except SQLAlchemyError as exc:
                    log.warning("heartbeat flush failed, retrying: %s", exc)
        finally:
            try:
                self.flush()
            except SQLAlchemyError as exc:
                log.error("final heartbeat flush failed: %s", exc)


def _chunks(rows: list, size: int = 400) -> list[list]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def _case(key_column, values: dict):
    """One UPDATE for many rows: SET col = CASE key WHEN k1 THEN v1 ... END (SQLite and MySQL alike)."""
    return case(values, value=key_column, else_=None) if values else None
