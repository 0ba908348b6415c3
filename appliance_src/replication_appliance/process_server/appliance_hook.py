"""The built-in process server inside `appliance serve` (a `serve.BACKGROUND_TASKS` entry):
machines come from the configuration database, and the server's health figures (cache,
upload backlog and rate) are recorded as the built-in process server's heartbeat."""
from __future__ import annotations

import asyncio
import logging
import uuid

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import selectinload

from ..common.errors import DatabaseError
from ..common.tls import server_ssl_context
from ..dataplane.session import MachineRecord
from ..db.models import Machine, utcnow
from ..db.models import ProcessServer as ProcessServerRow
from ..storage import store_for_data_dir
from .server import ProcessServer, ProcessServerConfig

log = logging.getLogger(__name__)
REPORT_INTERVAL_S = 30.0


def _record(m: Machine) -> MachineRecord:
    # Machine.disks is ordered by Disk.index: `--disk N` and the agent's disk numbers.
    return MachineRecord(uuid.UUID(m.id), m.hostname, tuple(d.size_bytes for d in m.disks), m.cert_fingerprint)


class DatabaseDirectory:
    """Machines registered with this appliance and assigned to its built-in process server.
    While the database cannot answer (MySQL restarting), lookups raise `DatabaseError`: the
    data port refuses sessions for the time being and uploads wait, rather than either
    treating the machine as unregistered."""

    def __init__(self, sessions) -> None:
        self._sessions = sessions

    def _query(self, where):
        try:
            with self._sessions() as session:
                builtin = select(ProcessServerRow.id).where(ProcessServerRow.builtin.is_(True)).scalar_subquery()
                rows = session.scalars(select(Machine).options(selectinload(Machine.disks))
                                       .where(where, Machine.process_server_id == builtin,
                                              Machine.cert_fingerprint.is_not(None))).all()
                return [_record(m) for m in rows]
        except SQLAlchemyError as e:
            # The driver's own words (e.g. "Can't connect to MySQL server"), not the SQL text.
            raise DatabaseError(f"the configuration database cannot be read: {getattr(e, 'orig', None) or type(e).__name__}") from None

    def machine(self, machine_id: uuid.UUID) -> MachineRecord | None:
        found = self._query(Machine.id == str(machine_id))
        return found[0] if found else None

    def resolve(self, id_or_hostname: str) -> MachineRecord | None:
        found = self._query((Machine.id == id_or_hostname) | (Machine.hostname == id_or_hostname))
        return found[0] if len(found) == 1 else None


def run_builtin_process_server(ctx):
    """Binds the data port now (so a port conflict fails `serve` at once) and records a first
    heartbeat before the ports open (so the first agent finds the server judged), then returns
    the coroutine that reports health until shutdown and stops the server."""
    d = ctx.data_dir
    tls = server_ssl_context(d.server_cert("data"), d.server_key("data"), d.ca_cert, require_client_cert=True)
    config = ProcessServerConfig(d.cache_dir, host=ctx.bind, port=ctx.data_port,
                                 cache_capacity_bytes=ctx.config.cache_quota_bytes)
    server = ProcessServer(config, tls, DatabaseDirectory(ctx.sessions), store_for_data_dir(d.root), d.master_key())
    server.start()
    try:
        _report(ctx, server)
    except BaseException:
        server.stop()
        raise
    return _report_until_cancelled(ctx, server)


def _report(ctx, server: ProcessServer) -> None:
    from ..control import builtin_load, service

    h = server.health()
    load = builtin_load.sample(ctx.data_dir.cache_dir, ctx.config.cache_quota_bytes).model_copy(update={
        "cache_free_percent": round(100 * h.cache_free_fraction, 2),
        "upload_backlog_bytes": h.backlog_bytes, "upload_rate_bytes_per_s": h.upload_bytes_per_s})
    with ctx.sessions.begin() as session:
        ps = session.scalars(select(ProcessServerRow).where(ProcessServerRow.builtin.is_(True))).first()
        if ps is not None:
            service.record_process_server_load(session, ps.id, load, utcnow())


async def _report_until_cancelled(ctx, server: ProcessServer) -> None:
    try:
        while True:
            await asyncio.sleep(REPORT_INTERVAL_S)
            try:
                await asyncio.to_thread(_report, ctx, server)
            except Exception as e:  # noqa: BLE001 - health reporting must never take the data port down
                log.warning("could not record the process server's health: %s", e)
    finally:
        await asyncio.to_thread(server.stop)
