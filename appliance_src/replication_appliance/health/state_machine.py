"""The replication state machine: what an agent may report next, and what operator actions do.

States follow the peer vocabulary (domain-facts.md, AWS MGN/DRS): an agent reports
initiating, initial_sync (with percent), continuous, paused, resync or stalled;
`disconnected` is never reported, the server derives it from a lost heartbeat; `not_enabled`
is a machine that is registered but not replicating. The desired state the server answers
with is one of replicate, pause, stop, resync.
"""
from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass


class State(str, enum.Enum):
    NOT_ENABLED = "not_enabled"
    INITIATING = "initiating"
    INITIAL_SYNC = "initial_sync"
    CONTINUOUS = "continuous"
    PAUSED = "paused"
    RESYNC = "resync"
    STALLED = "stalled"
    DISCONNECTED = "disconnected"


class Desired(str, enum.Enum):
    REPLICATE = "replicate"
    PAUSE = "pause"
    STOP = "stop"
    RESYNC = "resync"


class Action(str, enum.Enum):
    ENABLE = "enable"
    DISABLE = "disable"
    PAUSE = "pause"
    RESUME = "resume"
    RESYNC = "resync"


REPORTABLE = frozenset(State) - {State.DISCONNECTED}
_ACTIVE = {State.INITIAL_SYNC, State.CONTINUOUS, State.RESYNC}

# Which reported state may follow which. Staying in a state is always allowed; a machine
# that was disconnected may come back in any state (it resyncs after a connectivity failure).
NEXT: dict[State, frozenset[State]] = {
    State.NOT_ENABLED: frozenset({State.INITIATING}),
    State.INITIATING: frozenset({State.INITIAL_SYNC, State.PAUSED, State.STALLED, State.NOT_ENABLED}),
    State.INITIAL_SYNC: frozenset({State.CONTINUOUS, State.PAUSED, State.STALLED, State.RESYNC, State.NOT_ENABLED}),
    State.CONTINUOUS: frozenset({State.RESYNC, State.PAUSED, State.STALLED, State.NOT_ENABLED}),
    State.RESYNC: frozenset({State.CONTINUOUS, State.PAUSED, State.STALLED, State.NOT_ENABLED}),
    State.PAUSED: frozenset({State.INITIATING, State.INITIAL_SYNC, State.CONTINUOUS, State.RESYNC, State.NOT_ENABLED}),
    State.STALLED: frozenset({State.INITIAL_SYNC, State.CONTINUOUS, State.RESYNC, State.PAUSED, State.NOT_ENABLED}),
    State.DISCONNECTED: REPORTABLE,
}


class TransitionError(ValueError):
    """A report or action that the state machine does not allow; the message says why."""


@dataclass(frozen=True)
class Report:
    state: State
    initial_sync_percent: float | None = None


def accept_report(current: State, current_percent: float | None, report: Report) -> Report:
    """Validate an agent's reported state against the current one; returns what to store."""
    if report.state not in REPORTABLE:
        raise TransitionError(f"state {report.state.value!r} cannot be reported by an agent")
    if report.state != current and report.state not in NEXT[current]:
        allowed = sorted(s.value for s in NEXT[current] | {current})
        raise TransitionError(f"cannot go from {current.value} to {report.state.value}: allowed are {', '.join(allowed)}")
    if report.state == State.INITIAL_SYNC:
        if report.initial_sync_percent is None:
            raise TransitionError("initial_sync needs initial_sync_percent (0-100)")
        if current == State.INITIAL_SYNC and current_percent is not None and report.initial_sync_percent < current_percent:
            raise TransitionError(f"initial sync cannot go back from {current_percent:g} % to {report.initial_sync_percent:g} %")
        return report
    if report.state == State.CONTINUOUS and current == State.INITIAL_SYNC and (current_percent or 0) < 100:
        raise TransitionError(f"continuous replication needs initial sync at 100 % first (it is at {current_percent or 0:g} %)")
    if report.initial_sync_percent is not None:
        raise TransitionError(f"initial_sync_percent is only reported in state initial_sync, not {report.state.value}")
    return Report(report.state, current_percent if report.state == State.PAUSED else None)


def apply_action(desired: Desired, action: Action) -> Desired:
    """The desired state after an operator action (refused when it makes no sense)."""
    rules: dict[Action, tuple[set[Desired], Desired]] = {
        Action.ENABLE: ({Desired.STOP}, Desired.REPLICATE),
        Action.DISABLE: ({Desired.REPLICATE, Desired.PAUSE, Desired.RESYNC}, Desired.STOP),
        Action.PAUSE: ({Desired.REPLICATE, Desired.RESYNC}, Desired.PAUSE),
        Action.RESUME: ({Desired.PAUSE}, Desired.REPLICATE),
        Action.RESYNC: ({Desired.REPLICATE, Desired.PAUSE}, Desired.RESYNC),
    }
    allowed_from, result = rules[action]
    if desired not in allowed_from:
        raise TransitionError(f"cannot {action.value} a machine whose desired state is {desired.value}: "
                              f"{action.value} applies when it is {' or '.join(sorted(d.value for d in allowed_from))}")
    return result


def settle_desired(desired: Desired, reported: State) -> Desired:
    """A resync request is done once the agent reports it is resyncing."""
    return Desired.REPLICATE if desired == Desired.RESYNC and reported == State.RESYNC else desired


def effective_state(reported: State, last_heartbeat_at: dt.datetime | None, now: dt.datetime,
                    heartbeat_timeout: dt.timedelta) -> State:
    """What the operator sees: a replicating machine whose heartbeats stopped is disconnected."""
    if reported == State.NOT_ENABLED:
        return reported
    if last_heartbeat_at is None or now - last_heartbeat_at > heartbeat_timeout:
        return State.DISCONNECTED
    return reported


def is_replicating(state: State) -> bool:
    return state in _ACTIVE
