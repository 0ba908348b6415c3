"""The replication state machine: reported transitions and operator actions."""
from __future__ import annotations

import datetime as dt

import pytest
from replication_appliance.health.state_machine import (
    NEXT,
    Action,
    Desired,
    Report,
    State,
    TransitionError,
    accept_report,
    apply_action,
    effective_state,
    settle_desired,
)

NOW = dt.datetime(2026, 1, 1, 12, 0, 0)


def test_happy_path_from_enable_to_continuous():
    state, pct = State.NOT_ENABLED, None
    for report in [Report(State.INITIATING), Report(State.INITIAL_SYNC, 0), Report(State.INITIAL_SYNC, 55.5),
                   Report(State.INITIAL_SYNC, 100), Report(State.CONTINUOUS)]:
        stored = accept_report(state, pct, report)
        state, pct = stored.state, stored.initial_sync_percent
    assert state == State.CONTINUOUS and pct is None


@pytest.mark.parametrize("current, reported", [
    (State.NOT_ENABLED, State.CONTINUOUS), (State.INITIATING, State.CONTINUOUS),
    (State.CONTINUOUS, State.INITIATING), (State.RESYNC, State.INITIAL_SYNC),
])
def test_skipping_steps_is_refused_with_the_allowed_states(current, reported):
    with pytest.raises(TransitionError, match="allowed are"):
        accept_report(current, None, Report(reported, 10 if reported == State.INITIAL_SYNC else None))


def test_disconnected_is_never_reported_but_any_state_may_follow_it():
    with pytest.raises(TransitionError, match="cannot be reported"):
        accept_report(State.CONTINUOUS, None, Report(State.DISCONNECTED))
    for reported in NEXT[State.DISCONNECTED]:
        accept_report(State.DISCONNECTED, None, Report(reported, 5 if reported == State.INITIAL_SYNC else None))


def test_initial_sync_percent_rules():
    with pytest.raises(TransitionError, match="needs initial_sync_percent"):
        accept_report(State.INITIATING, None, Report(State.INITIAL_SYNC))
    with pytest.raises(TransitionError, match="cannot go back"):
        accept_report(State.INITIAL_SYNC, 50, Report(State.INITIAL_SYNC, 49))
    with pytest.raises(TransitionError, match="100 %"):
        accept_report(State.INITIAL_SYNC, 99.9, Report(State.CONTINUOUS))
    with pytest.raises(TransitionError, match="only reported in state initial_sync"):
        accept_report(State.CONTINUOUS, None, Report(State.CONTINUOUS, 100))


def test_pausing_keeps_the_initial_sync_progress():
    assert accept_report(State.INITIAL_SYNC, 42, Report(State.PAUSED)).initial_sync_percent == 42
    assert accept_report(State.PAUSED, 42, Report(State.INITIAL_SYNC, 42)).initial_sync_percent == 42


@pytest.mark.parametrize("desired, action, result", [
    (Desired.STOP, Action.ENABLE, Desired.REPLICATE),
    (Desired.REPLICATE, Action.PAUSE, Desired.PAUSE),
    (Desired.PAUSE, Action.RESUME, Desired.REPLICATE),
    (Desired.REPLICATE, Action.RESYNC, Desired.RESYNC),
    (Desired.PAUSE, Action.RESYNC, Desired.RESYNC),
    (Desired.PAUSE, Action.DISABLE, Desired.STOP),
])
def test_operator_actions(desired, action, result):
    assert apply_action(desired, action) == result


@pytest.mark.parametrize("desired, action", [
    (Desired.REPLICATE, Action.ENABLE), (Desired.STOP, Action.DISABLE), (Desired.STOP, Action.PAUSE),
    (Desired.REPLICATE, Action.RESUME), (Desired.STOP, Action.RESYNC),
])
def test_meaningless_actions_are_refused(desired, action):
    with pytest.raises(TransitionError, match=f"cannot {action.value}"):
        apply_action(desired, action)


def test_resync_request_settles_once_the_agent_resyncs():
    assert settle_desired(Desired.RESYNC, State.CONTINUOUS) == Desired.RESYNC
    assert settle_desired(Desired.RESYNC, State.RESYNC) == Desired.REPLICATE
    assert settle_desired(Desired.PAUSE, State.RESYNC) == Desired.PAUSE


def test_effective_state_turns_silent_machines_disconnected():
    timeout = dt.timedelta(minutes=5)
    assert effective_state(State.CONTINUOUS, NOW - dt.timedelta(minutes=4), NOW, timeout) == State.CONTINUOUS
    assert effective_state(State.CONTINUOUS, NOW - dt.timedelta(minutes=6), NOW, timeout) == State.DISCONNECTED
    assert effective_state(State.NOT_ENABLED, None, NOW, timeout) == State.NOT_ENABLED
