"""`appliance status` as readable tables."""
from __future__ import annotations

from .service import StatusSummary


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def render_status(summary: StatusSummary) -> str:
    servers = table(["PROCESS SERVER", "ADDRESS", "HEALTH", "MACHINES", "HEADROOM", "ALERTS"], [
        [p.name, p.address, p.health, str(p.machines), f"{p.headroom_percent:.0f} %",
         "; ".join(a.message for a in p.alerts) or "-"] for p in summary.process_servers])
    machines = table(["MACHINE", "STATE", "DESIRED", "SYNC", "RPO", "HEALTH", "ALERTS"], [
        [m.hostname, m.replication_state.value, m.desired_state.value,
         f"{m.initial_sync_percent:.0f} %" if m.initial_sync_percent is not None else "-",
         f"{m.rpo_minutes:.0f} min" if m.rpo_minutes is not None else "-", m.health,
         "; ".join(a.message for a in m.alerts) or "-"] for m in summary.machines])
    if not summary.machines:
        machines += "\n(no machines registered yet)"
    return f"overall health: {summary.overall}\n\n{servers}\n\n{machines}"
