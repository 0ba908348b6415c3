"""Process server health, assignment and RPO rules against the published thresholds."""
from __future__ import annotations

import datetime as dt

import pytest
from replication_appliance.health import rules
from replication_appliance.health.rules import Health

NOW = dt.datetime(2026, 1, 1, 12, 0, 0)
MIN = dt.timedelta(minutes=1)


def sample(**kw) -> rules.LoadSample:
    base = dict(at=NOW, cpu_percent=10.0, memory_percent=10.0, cache_free_percent=90.0, upload_backlog_bytes=0,
                upload_rate_bytes_per_s=1e6)
    return rules.LoadSample(**{**base, **kw})


def health(**kw) -> rules.HealthReport:
    return rules.process_server_health(sample(**kw), NOW, NOW)


def codes(report: rules.HealthReport) -> set[str]:
    return {a.code for a in report.alerts}


def test_idle_server_is_healthy():
    report = health()
    assert report.overall == Health.HEALTHY and report.alerts == [] and not report.throttled


@pytest.mark.parametrize("free, expected, throttled", [
    (30.0, Health.HEALTHY, False), (29.9, Health.WARNING, False), (25.0, Health.WARNING, False),
    (24.9, Health.CRITICAL, False), (20.0, Health.CRITICAL, False), (19.9, Health.CRITICAL, True),
])
def test_cache_free_space_thresholds(free, expected, throttled):
    report = health(cache_free_percent=free)
    assert report.overall == expected and report.throttled is throttled


@pytest.mark.parametrize("metric", ["cpu", "memory"])
def test_load_alerts_need_15_minutes_sustained(metric):
    high = {f"{metric}_percent": 85.0}
    assert health(**high, **{f"{metric}_warning_since": NOW - 14 * MIN}).overall == Health.HEALTHY
    assert health(**high, **{f"{metric}_warning_since": NOW - 15 * MIN}).overall == Health.WARNING
    very = {f"{metric}_percent": 97.0, f"{metric}_warning_since": NOW - 30 * MIN}
    assert health(**very, **{f"{metric}_critical_since": NOW - 5 * MIN}).overall == Health.WARNING
    report = health(**very, **{f"{metric}_critical_since": NOW - 15 * MIN})
    assert report.overall == Health.CRITICAL and codes(report) == {f"{metric}_critical"}


def test_track_since_starts_keeps_and_resets():
    first = rules.track_since(None, 81.0, rules.LOAD_WARNING_PERCENT, NOW)
    assert first == NOW
    assert rules.track_since(first, 90.0, rules.LOAD_WARNING_PERCENT, NOW + 5 * MIN) == NOW
    assert rules.track_since(first, 80.0, rules.LOAD_WARNING_PERCENT, NOW + 6 * MIN) is None


@pytest.mark.parametrize("backlog, rate, expected", [
    (0, 0.0, Health.HEALTHY),
    (29 * 60 * 1_000_000, 1e6, Health.HEALTHY),
    (30 * 60 * 1_000_000, 1e6, Health.WARNING),
    (44 * 60 * 1_000_000, 1e6, Health.WARNING),
    (45 * 60 * 1_000_000, 1e6, Health.CRITICAL),
    (1, 0.0, Health.CRITICAL),  # a backlog that is not uploading never drains
])
def test_upload_backlog_drain_time(backlog, rate, expected):
    assert health(upload_backlog_bytes=backlog, upload_rate_bytes_per_s=rate).overall == expected


def test_heartbeat_loss_after_15_minutes_is_critical():
    ok = rules.process_server_health(sample(), NOW - 14 * MIN, NOW)
    lost = rules.process_server_health(sample(), NOW - 15 * MIN, NOW)
    assert ok.overall == Health.HEALTHY
    assert lost.overall == Health.CRITICAL and "heartbeat_lost" in codes(lost)


def test_overall_is_the_worst_alert():
    report = health(cache_free_percent=28.0, upload_backlog_bytes=50 * 60 * 10**6, upload_rate_bytes_per_s=1e6)
    assert codes(report) == {"cache_warning", "upload_critical"} and report.overall == Health.CRITICAL


def test_headroom_is_the_scarcest_resource():
    s = sample(cpu_percent=50.0, memory_percent=60.0, cache_free_percent=80.0)
    assert rules.headroom_percent(s, machines=0, capacity_machines=200) == 40.0
    assert rules.headroom_percent(s, machines=180, capacity_machines=200) == pytest.approx(10.0)


def candidate(id_, **kw):
    return rules.Candidate(id_, rules.process_server_health(sample(**kw), NOW, NOW))


def test_assignment_skips_critical_and_low_headroom_servers_and_picks_most_headroom():
    critical = candidate("critical", cache_free_percent=24.0)  # 24 % headroom and critical
    busy = candidate("busy", cpu_percent=71.0)                 # 29 % headroom
    fine = candidate("fine", cpu_percent=60.0)                 # 40 % headroom
    best = candidate("best", cpu_percent=20.0)                 # 80 % headroom
    assert rules.choose_process_server([critical, busy, fine, best]) == "best"
    assert rules.choose_process_server([critical, busy, fine]) == "fine"
    assert rules.choose_process_server([critical, busy]) is None


def test_warning_server_with_headroom_still_takes_machines():
    warned = candidate("warned", cache_free_percent=29.0, cpu_percent=70.0)  # warning, 29 % headroom: no
    roomy_warning = rules.Candidate("roomy", rules.process_server_health(
        sample(cpu_percent=10.0, upload_backlog_bytes=31 * 60 * 10**6), NOW, NOW))  # warning, 90 % headroom
    assert roomy_warning.health.overall == Health.WARNING
    assert rules.choose_process_server([warned, roomy_warning]) == "roomy"


@pytest.mark.parametrize("minutes, expected", [(60, set()), (61, {"rpo_exceeded"}), (120, {"rpo_exceeded"}),
                                               (121, {"rpo_critical"})])
def test_rpo_alerts_against_threshold(minutes, expected):
    assert {a.code for a in rules.rpo_alerts(dt.timedelta(minutes=minutes), 60)} == expected


def test_rpo_is_age_of_newest_recovery_point():
    assert rules.rpo(NOW - 7 * MIN, NOW - 90 * MIN, NOW) == 7 * MIN
    assert rules.rpo(None, NOW - 90 * MIN, NOW) == 90 * MIN
