"""Process server health and machine RPO alerts, as pure functions of the figures reported.

Thresholds are the published ones (shared/reference/domain-facts.md, "Process server health"):
CPU/memory warning > 80 %, critical > 95 %, each sustained 15 min; cache free space warning
< 30 %, critical < 25 %, throttled < 20 %; upload backlog drain time warning >= 30 min,
critical >= 45 min; no heartbeat for 15 min critical. Overall health is the worst alert.
"""
from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass, field

LOAD_WARNING_PERCENT = 80.0
LOAD_CRITICAL_PERCENT = 95.0
LOAD_SUSTAIN = dt.timedelta(minutes=15)
CACHE_FREE_WARNING_PERCENT = 30.0
CACHE_FREE_CRITICAL_PERCENT = 25.0
CACHE_FREE_THROTTLE_PERCENT = 20.0
DRAIN_WARNING = dt.timedelta(minutes=30)
DRAIN_CRITICAL = dt.timedelta(minutes=45)
HEARTBEAT_LOSS = dt.timedelta(minutes=15)
ASSIGNMENT_HEADROOM_PERCENT = 30.0
RPO_CRITICAL_FACTOR = 2  # RPO above twice the threshold is critical, above it a warning


class Health(enum.IntEnum):
    HEALTHY = 0
    WARNING = 1
    CRITICAL = 2

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Alert:
    code: str
    severity: Health
    message: str


@dataclass(frozen=True)
class LoadSample:
    """The figures a process server reports, plus since when CPU/memory have been high."""
    at: dt.datetime
    cpu_percent: float
    memory_percent: float
    cache_free_percent: float
    upload_backlog_bytes: int
    upload_rate_bytes_per_s: float
    cpu_warning_since: dt.datetime | None = None
    cpu_critical_since: dt.datetime | None = None
    memory_warning_since: dt.datetime | None = None
    memory_critical_since: dt.datetime | None = None


@dataclass(frozen=True)
class HealthReport:
    overall: Health
    alerts: list[Alert] = field(default_factory=list)
    throttled: bool = False
    headroom_percent: float = 0.0


def track_since(since: dt.datetime | None, value: float, threshold: float, now: dt.datetime) -> dt.datetime | None:
    """When `value` first went above `threshold` in the current run of samples (None if not above)."""
    if value > threshold:
        return since or now
    return None


def _sustained(since: dt.datetime | None, now: dt.datetime) -> bool:
    return since is not None and now - since >= LOAD_SUSTAIN


def drain_time(backlog_bytes: int, rate_bytes_per_s: float) -> dt.timedelta | None:
    """How long the cache needs to upload its backlog (None = never: backlog and no upload)."""
    if backlog_bytes <= 0:
        return dt.timedelta(0)
    if rate_bytes_per_s <= 0:
        return None
    return dt.timedelta(seconds=backlog_bytes / rate_bytes_per_s)


def load_alerts(name: str, percent: float, warning_since: dt.datetime | None,
                critical_since: dt.datetime | None, now: dt.datetime) -> list[Alert]:
    if _sustained(critical_since, now):
        return [Alert(f"{name}_critical", Health.CRITICAL, f"{name} above {LOAD_CRITICAL_PERCENT:.0f} % for 15 min (now {percent:.0f} %)")]
    if _sustained(warning_since, now):
        return [Alert(f"{name}_warning", Health.WARNING, f"{name} above {LOAD_WARNING_PERCENT:.0f} % for 15 min (now {percent:.0f} %)")]
    return []


def cache_alerts(free_percent: float) -> list[Alert]:
    if free_percent < CACHE_FREE_CRITICAL_PERCENT:
        return [Alert("cache_critical", Health.CRITICAL, f"cache free space {free_percent:.0f} % is below {CACHE_FREE_CRITICAL_PERCENT:.0f} %")]
    if free_percent < CACHE_FREE_WARNING_PERCENT:
        return [Alert("cache_warning", Health.WARNING, f"cache free space {free_percent:.0f} % is below {CACHE_FREE_WARNING_PERCENT:.0f} %")]
    return []


def backlog_alerts(backlog_bytes: int, rate_bytes_per_s: float) -> list[Alert]:
    drain = drain_time(backlog_bytes, rate_bytes_per_s)
    if drain is None:
        return [Alert("upload_critical", Health.CRITICAL, f"{backlog_bytes} bytes waiting and nothing is being uploaded")]
    minutes = drain.total_seconds() / 60
    if drain >= DRAIN_CRITICAL:
        return [Alert("upload_critical", Health.CRITICAL, f"upload backlog needs {minutes:.0f} min to drain (critical at 45)")]
    if drain >= DRAIN_WARNING:
        return [Alert("upload_warning", Health.WARNING, f"upload backlog needs {minutes:.0f} min to drain (warning at 30)")]
    return []


def heartbeat_alerts(last_seen: dt.datetime | None, now: dt.datetime) -> list[Alert]:
    if last_seen is None or now - last_seen >= HEARTBEAT_LOSS:
        ago = "never" if last_seen is None else f"{(now - last_seen).total_seconds() / 60:.0f} min ago"
        return [Alert("heartbeat_lost", Health.CRITICAL, f"no heartbeat for 15 min (last: {ago})")]
    return []


def headroom_percent(sample: LoadSample, machines: int, capacity_machines: int) -> float:
    """The scarcest resource's free share: CPU, memory, cache, machine slots."""
    slots = 100.0 * (1 - machines / capacity_machines) if capacity_machines > 0 else 0.0
    return max(0.0, min(100.0 - sample.cpu_percent, 100.0 - sample.memory_percent, sample.cache_free_percent, slots))


def process_server_health(sample: LoadSample | None, last_seen: dt.datetime | None, now: dt.datetime,
                          machines: int = 0, capacity_machines: int = 200) -> HealthReport:
    alerts = heartbeat_alerts(last_seen, now)
    if sample is None:
        return HealthReport(max((a.severity for a in alerts), default=Health.HEALTHY), alerts, False, 0.0)
    alerts += load_alerts("cpu", sample.cpu_percent, sample.cpu_warning_since, sample.cpu_critical_since, now)
    alerts += load_alerts("memory", sample.memory_percent, sample.memory_warning_since, sample.memory_critical_since, now)
    alerts += cache_alerts(sample.cache_free_percent)
    alerts += backlog_alerts(sample.upload_backlog_bytes, sample.upload_rate_bytes_per_s)
    overall = max((a.severity for a in alerts), default=Health.HEALTHY)
    return HealthReport(overall, alerts, sample.cache_free_percent < CACHE_FREE_THROTTLE_PERCENT,
                        headroom_percent(sample, machines, capacity_machines))


@dataclass(frozen=True)
class Candidate:
    id: str
    health: HealthReport


def choose_process_server(candidates: list[Candidate]) -> str | None:
    """New machines go to a non-critical server with >= 30 % headroom, the one with most."""
    eligible = [c for c in candidates
                if c.health.overall != Health.CRITICAL and c.health.headroom_percent >= ASSIGNMENT_HEADROOM_PERCENT]
    if not eligible:
        return None
    return max(eligible, key=lambda c: (c.health.headroom_percent, -c.health.overall, c.id)).id


def rpo(last_recovery_point_at: dt.datetime | None, replicating_since: dt.datetime, now: dt.datetime) -> dt.timedelta:
    """Current RPO: age of the newest recovery point (or time since replication began)."""
    return now - (last_recovery_point_at or replicating_since)


def rpo_alerts(current_rpo: dt.timedelta, threshold_minutes: int) -> list[Alert]:
    minutes = current_rpo.total_seconds() / 60
    if minutes > RPO_CRITICAL_FACTOR * threshold_minutes:
        return [Alert("rpo_critical", Health.CRITICAL, f"RPO {minutes:.0f} min is over twice the {threshold_minutes} min threshold")]
    if minutes > threshold_minutes:
        return [Alert("rpo_exceeded", Health.WARNING, f"RPO {minutes:.0f} min exceeds the {threshold_minutes} min threshold")]
    return []


def worst(*reports: Health) -> Health:
    return max(reports, default=Health.HEALTHY)
