"""Heartbeats answered from memory: what reaches the database, when, and after restarts."""
from __future__ import annotations

import pytest
from replication_appliance.control import heartbeats as hb_module
from replication_appliance.control import schemas as s
from replication_appliance.control.heartbeats import HeartbeatStore
from replication_appliance.db.models import AuditEntry, Disk, Machine, utcnow
from sqlalchemy import select

from .appliance_harness import DISKS, running_appliance


def row(appliance, machine_id):
    with appliance.serve_ctx.sessions.begin() as session:
        m = session.get(Machine, machine_id)
        disks = {d.name: d.replicated_bytes for d in session.scalars(select(Disk).where(Disk.machine_id == machine_id))}
        audits = session.scalars(select(AuditEntry.action).where(AuditEntry.target_id == machine_id)).all()
        return m.replication_state, m.last_heartbeat_at, disks, audits


def heartbeat(state="not_enabled", replicated=0):
    return s.Heartbeat(state=state, disks=[s.DiskCounters(name=d["name"], total_bytes=d["size_bytes"],
                                                          replicated_bytes=replicated, backlog_bytes=0) for d in DISKS])


def registered_agent_and_store(appliance, tmp_path):
    """A registered agent, a heartbeat store loaded from the database, and the agent's certificate fingerprint."""
    agent = appliance.register_agent(tmp_path)
    store = HeartbeatStore(appliance.serve_ctx.sessions)
    store.load_all()
    return agent, store, store._views[agent.machine_id].fingerprint


@pytest.mark.parametrize("backend", ["sqlite"])
def test_periodic_flush_writes_state_changes_now_and_counters_later(appliance, tmp_path, monkeypatch):
    agent, store, fingerprint = registered_agent_and_store(appliance, tmp_path)
    store._figures[agent.machine_id].written_at = hb_module.time.monotonic()  # just written

    # An agent heard for the first time (push install waits for this) is written at once.
    assert store.apply(agent.machine_id, fingerprint, heartbeat(replicated=3), "127.0.0.1", utcnow()) is not None
    assert store.flush(everything=False) == 1
    assert row(appliance, agent.machine_id)[1] is not None
    assert store.apply(agent.machine_id, fingerprint, heartbeat(replicated=7), "127.0.0.1", utcnow()) is not None
    assert store.flush(everything=False) == 0  # plain counters wait for their interval
    assert row(appliance, agent.machine_id)[2]["/dev/sda"] == 3

    with appliance.operator() as op:
        op.post(f"/api/v1/machines/{agent.machine_id}/actions", json={"action": "enable"})
    store.invalidate(agent.machine_id)
    store.load(agent.machine_id, utcnow())
    store.apply(agent.machine_id, fingerprint, heartbeat("initiating", replicated=9), "127.0.0.1", utcnow())
    assert store.flush(everything=False) == 1  # a state change goes at once, with its audit entry
    state, seen, disks, audits = row(appliance, agent.machine_id)
    assert state == "initiating" and seen is not None and disks["/dev/sda"] == 9
    assert "machine.state_changed" in audits

    store.apply(agent.machine_id, fingerprint, heartbeat("initiating", replicated=11), "127.0.0.1", utcnow())
    monkeypatch.setattr(hb_module, "TELEMETRY_WRITE_S", 0.0)
    assert store.flush(everything=False) == 1
    assert row(appliance, agent.machine_id)[2]["/dev/sda"] == 11


@pytest.mark.parametrize("backend", ["sqlite"])
def test_an_agent_heard_again_after_a_silence_is_written_at_once(appliance, tmp_path):
    import datetime as dt

    agent, store, fingerprint = registered_agent_and_store(appliance, tmp_path)
    start = utcnow()
    store.apply(agent.machine_id, fingerprint, heartbeat(), "127.0.0.1", start)
    assert store.flush(everything=False) == 1
    store.apply(agent.machine_id, fingerprint, heartbeat(), "127.0.0.1", start + dt.timedelta(seconds=5))
    assert store.flush(everything=False) == 0  # a regular heartbeat: nothing urgent
    back = start + dt.timedelta(seconds=5 + 3 * hb_module.HEARTBEAT_INTERVAL_S)
    store.apply(agent.machine_id, fingerprint, heartbeat(), "127.0.0.1", back)
    assert store.flush(everything=False) == 1
    assert row(appliance, agent.machine_id)[1] == back


@pytest.mark.parametrize("backend", ["sqlite"])
def test_invalid_report_leaves_memory_and_database_untouched(appliance, tmp_path):
    agent, store, fingerprint = registered_agent_and_store(appliance, tmp_path)
    with pytest.raises(Exception, match="allowed are"):
        store.apply(agent.machine_id, fingerprint, heartbeat("continuous", replicated=5), "127.0.0.1", utcnow())
    assert store._figures[agent.machine_id].disks["/dev/sda"][1] == 0
    assert store.flush() == 0


def test_shutdown_writes_the_last_heartbeats(appliance_dir, tmp_path):
    with running_appliance(appliance_dir) as first:
        agent = first.register_agent(tmp_path)
        with first.agent_client(agent) as c:
            assert c.post(f"/api/v1/agents/{agent.machine_id}/heartbeat",
                          json={"state": "not_enabled", "disks": heartbeat(replicated=42).model_dump()["disks"]}).status_code == 200
        engine_sessions = first.serve_ctx.sessions
    with engine_sessions.begin() as session:  # the server is stopped: what it wrote is all there is
        disk = session.scalars(select(Disk).where(Disk.machine_id == agent.machine_id, Disk.name == "/dev/sda")).one()
        assert disk.replicated_bytes == 42
        assert session.get(Machine, agent.machine_id).last_heartbeat_at is not None
    with running_appliance(appliance_dir) as second:  # and a restarted server knows the machine
        with second.agent_client(agent) as c:
            resp = c.post(f"/api/v1/agents/{agent.machine_id}/heartbeat", json={"state": "not_enabled"})
        assert resp.status_code == 200


@pytest.mark.parametrize("backend", ["sqlite"])
def test_policy_change_reaches_agents_at_their_next_heartbeat(appliance, tmp_path):
    agent = appliance.register_agent(tmp_path)
    with appliance.agent_client(agent) as c, appliance.operator() as op:
        url = f"/api/v1/agents/{agent.machine_id}/heartbeat"
        assert c.post(url, json={"state": "not_enabled"}).json()["policy"]["crash_consistent_minutes"] == 5
        assert op.patch("/api/v1/policies/1", json={"crash_consistent_minutes": 15}).status_code == 200
        assert c.post(url, json={"state": "not_enabled"}).json()["policy"]["crash_consistent_minutes"] == 15
