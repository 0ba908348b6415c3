"""`appliance status` tables."""
from __future__ import annotations

from replication_appliance.control import schemas as s
from replication_appliance.control.service import StatusSummary
from replication_appliance.control.status_view import render_status, table


def test_table_aligns_columns():
    assert table(["A", "BB"], [["xxx", "y"]]).splitlines() == ["A    BB", "---  --", "xxx  y"]


def test_status_shows_health_rpo_and_alerts():
    ps = s.ProcessServerHealthOut(id="p", name="builtin", address="a:9443", builtin=True, health="warning", throttled=False,
                                  headroom_percent=28.0, machines=1, last_heartbeat_at=None,
                                  alerts=[s.AlertOut(code="cache_warning", severity="warning", message="cache free space 28 % is below 30 %")])
    m = s.MachineOut(id="m", host_id="h", hostname="web01", os_family="linux", os_name="", agent_version="", addresses=[],
                     process_server_id="p", policy_id=1, desired_state="replicate", replication_state="continuous",
                     initial_sync_percent=None, last_heartbeat_at=None, last_recovery_point_at=None, rpo_minutes=75.0,
                     health="warning", disks=[],
                     alerts=[s.AlertOut(code="rpo_exceeded", severity="warning", message="RPO 75 min exceeds the 60 min threshold")])
    text = render_status(StatusSummary([ps], [m]))
    assert text.startswith("overall health: warning")
    assert "cache free space 28 % is below 30 %" in text and "28 %" in text
    line = next(line for line in text.splitlines() if line.startswith("web01"))
    assert "continuous" in line and "75 min" in line and "RPO 75 min exceeds" in line
