"""The appliance host's load figures (CPU, memory, cache free space) for the built-in process
server. `process_server.appliance_hook` is their only writer: it records them, with the
cache and upload backlog figures of the running server, as the built-in process server's
heartbeat (one writer, so two samplers never overwrite each other's figures)."""
from __future__ import annotations

import functools
import shutil
from pathlib import Path

import psutil

from . import schemas as s


def cache_free_percent(cache_dir: Path, quota_bytes: int | None) -> float:
    """Free share of the cache: of its filesystem, or of its quota when it shares one."""
    usage = shutil.disk_usage(cache_dir)
    if quota_bytes is None:
        return 100.0 * usage.free / usage.total
    used = sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file())
    return 100.0 * max(0, min(usage.free, quota_bytes - used)) / quota_bytes


@functools.cache
def _prime_cpu_counter() -> None:
    psutil.cpu_percent(interval=0.2)  # the first call without an interval returns a meaningless 0


def sample(cache_dir: Path, quota_bytes: int | None) -> s.ProcessServerLoad:
    _prime_cpu_counter()
    return s.ProcessServerLoad(cpu_percent=psutil.cpu_percent(interval=None), memory_percent=psutil.virtual_memory().percent,
                               cache_free_percent=round(cache_free_percent(cache_dir, quota_bytes), 2))
