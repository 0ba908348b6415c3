"""`appliance serve`'s background tasks: the built-in process server's load figures have one
writer (the process server's hook, which adds the upload backlog to the host's CPU, memory and
cache figures), and its first heartbeat is recorded before any port opens, so the first agent
to register finds it judged and is assigned to it."""
from __future__ import annotations

import asyncio

from replication_appliance.db.models import ProcessServer
from replication_appliance.serve import BACKGROUND_TASKS, ServeContext, build_all
from sqlalchemy import event, select

from .appliance_harness import init_appliance


def test_one_heartbeat_writer_records_host_and_backlog_figures_before_the_ports_open(tmp_path):
    data_dir = init_appliance(tmp_path / "data")
    ctx = ServeContext.open(data_dir, "127.0.0.1")
    writes: list[dict] = []

    @event.listens_for(ProcessServer, "before_update")
    def count(_mapper, _conn, ps):
        writes.append({"cpu": ps.cpu_percent, "cache_free": ps.cache_free_percent, "backlog": ps.upload_backlog_bytes,
                       "rate": ps.upload_rate_bytes_per_s})

    try:
        specs, tasks = build_all(ctx)  # what serve does before opening the ports
        assert len(writes) == 1
        with ctx.sessions() as session:
            ps = session.scalars(select(ProcessServer).where(ProcessServer.builtin.is_(True))).one()
            assert ps.last_heartbeat_at is not None
            assert writes[0]["cache_free"] == ps.cache_free_percent > 0  # the process server's own view of its cache
            assert ps.upload_backlog_bytes == 0 and ps.upload_rate_bytes_per_s == 0.0
            assert 0.0 <= ps.cpu_percent <= 100.0 and 0.0 < ps.memory_percent <= 100.0

        async def run_briefly():
            running = [asyncio.ensure_future(t) for t in tasks]
            await asyncio.sleep(0.5)
            for t in running:
                t.cancel()
            await asyncio.gather(*running, return_exceptions=True)

        asyncio.run(run_briefly())
        for spec in specs:
            for coroutine in spec.tasks:
                coroutine.close()  # the servers themselves are not started here
        assert len(writes) == 1  # no second sampler writing the same figures beside it
        assert len(BACKGROUND_TASKS) == len(set(BACKGROUND_TASKS)) == 1
    finally:
        event.remove(ProcessServer, "before_update", count)
        ctx.engine.dispose()
