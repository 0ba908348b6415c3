"""serve.BACKGROUND_TASKS entry: the built-in process server's CPU, memory and cache figures,
sampled on the appliance itself (the data plane adds its upload backlog figures)."""
from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

import psutil
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from ..db.models import ProcessServer, utcnow
from . import schemas as s
from . import service

SAMPLE_INTERVAL_S = 30.0
log = logging.getLogger("replication_appliance.control.builtin_load")


def cache_free_percent(cache_dir: Path, quota_bytes: int | None) -> float:
    """Free share of the cache: of its filesystem, or of its quota when it shares one."""
    usage = shutil.disk_usage(cache_dir)
    if quota_bytes is None:
        return 100.0 * usage.free / usage.total
    used = sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file())
    return 100.0 * max(0, min(usage.free, quota_bytes - used)) / quota_bytes


def sample(cache_dir: Path, quota_bytes: int | None) -> s.ProcessServerLoad:
    return s.ProcessServerLoad(cpu_percent=psutil.cpu_percent(interval=None), memory_percent=psutil.virtual_memory().percent,
                               cache_free_percent=round(cache_free_percent(cache_dir, quota_bytes), 2))


def record_builtin_sample(ctx) -> None:
    with ctx.sessions.begin() as session:
        ps = session.scalars(select(ProcessServer).where(ProcessServer.builtin.is_(True))).first()
        if ps is not None:
            load = sample(ctx.data_dir.cache_dir, ctx.config.cache_quota_bytes)
            service.record_process_server_load(session, ps.id, load, utcnow())


def sample_builtin_process_server(ctx, interval_s: float = SAMPLE_INTERVAL_S):
    """Records one sample before the servers open (so the first agent finds the built-in
    process server judged), then returns the coroutine that keeps sampling."""
    psutil.cpu_percent(interval=0.2)  # primes the counter: a first call without interval returns 0
    record_builtin_sample(ctx)
    return _keep_sampling(ctx, interval_s)


async def _keep_sampling(ctx, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await asyncio.to_thread(record_builtin_sample, ctx)
        except SQLAlchemyError as exc:
            log.warning("could not record the built-in process server's load: %s", exc)
