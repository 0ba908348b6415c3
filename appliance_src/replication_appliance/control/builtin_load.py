"""serve.BACKGROUND_TASKS entry: the built-in process server's CPU, memory and cache figures,
sampled on the appliance itself (the data plane adds its upload backlog figures)."""
from __future__ import annotations

import asyncio
import logging
import shutil

import psutil
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from ..db.models import ProcessServer, utcnow
from . import schemas as s
from . import service

SAMPLE_INTERVAL_S = 30.0
log = logging.getLogger("replication_appliance.control.builtin_load")


def sample(cache_dir) -> s.ProcessServerLoad:
    usage = shutil.disk_usage(cache_dir)
    return s.ProcessServerLoad(cpu_percent=psutil.cpu_percent(interval=None), memory_percent=psutil.virtual_memory().percent,
                               cache_free_percent=round(100.0 * usage.free / usage.total, 2))


def record_builtin_sample(ctx) -> None:
    with ctx.sessions.begin() as session:
        ps = session.scalars(select(ProcessServer).where(ProcessServer.builtin.is_(True))).first()
        if ps is not None:
            service.record_process_server_load(session, ps.id, sample(ctx.data_dir.cache_dir), utcnow())


async def sample_builtin_process_server(ctx, interval_s: float = SAMPLE_INTERVAL_S) -> None:
    psutil.cpu_percent(interval=None)  # primes the counter: the first call always returns 0
    while True:
        await asyncio.sleep(min(1.0, interval_s))
        try:
            await asyncio.to_thread(record_builtin_sample, ctx)
        except SQLAlchemyError as exc:
            log.warning("could not record the built-in process server's load: %s", exc)
        await asyncio.sleep(max(0.0, interval_s - 1.0))
