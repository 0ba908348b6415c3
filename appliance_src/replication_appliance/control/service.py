"""What the control API does, apart from HTTP: registration, heartbeats, policies, operator
actions, health and status. Every function works inside the caller's session and writes its
audit entry in the same transaction, so a change and its record land together or not at all."""
from __future__ import annotations

import datetime as dt
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, joinedload, selectinload

from ..common.errors import ApplianceError
from ..common.tls import (
    ROLE_AGENT,
    ROLE_PROCESS_SERVER,
    CertificateAuthority,
    ClientIdentity,
    cert_fingerprint,
    cert_to_pem,
)
from ..db.models import (
    AuditEntry,
    Disk,
    Job,
    Machine,
    Operator,
    Policy,
    ProcessServer,
    Registration,
    utcnow,
)
from ..health import rules
from ..health.state_machine import (
    Action,
    Desired,
    State,
    TransitionError,
    apply_action,
    effective_state,
)
from . import schemas as s

HEARTBEAT_INTERVAL_S = 30
Live = Callable[[str], "AgentView | None"] | None
MACHINE_HEARTBEAT_TIMEOUT = dt.timedelta(minutes=5)
RPO_STATES = {State.CONTINUOUS, State.RESYNC, State.PAUSED, State.STALLED, State.DISCONNECTED}


class ControlError(ApplianceError):
    status_code = 400


class NotFoundError(ControlError):
    status_code = 404


class ForbiddenError(ControlError):
    status_code = 403


class ConflictError(ControlError):
    status_code = 409


class InvalidError(ControlError):
    status_code = 422


def audit(session: Session, actor: str, action: str, target_type: str = "", target_id: str = "",
          details: dict[str, Any] | None = None, remote: str = "") -> None:
    session.add(AuditEntry(actor=actor, action=action, target_type=target_type, target_id=str(target_id),
                           details=json.dumps(details or {}, sort_keys=True, default=str), remote_address=remote))


def passphrase_matches(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


# --- process servers ------------------------------------------------------------------------
def load_sample(ps: ProcessServer) -> rules.LoadSample | None:
    if ps.last_heartbeat_at is None:
        return None
    return rules.LoadSample(ps.last_heartbeat_at, ps.cpu_percent, ps.memory_percent, ps.cache_free_percent,
                            ps.upload_backlog_bytes, ps.upload_rate_bytes_per_s, ps.cpu_warning_since,
                            ps.cpu_critical_since, ps.memory_warning_since, ps.memory_critical_since)


def ps_health(ps: ProcessServer, machines: int, now: dt.datetime) -> rules.HealthReport:
    # A server that never reported is judged from its registration time, so a fresh one is not critical.
    return rules.process_server_health(load_sample(ps), ps.last_heartbeat_at or ps.registered_at, now,
                                       machines, ps.capacity_machines)


def machine_counts(session: Session) -> dict[str, int]:
    rows = session.execute(select(Machine.process_server_id, func.count()).group_by(Machine.process_server_id))
    return {ps_id: n for ps_id, n in rows if ps_id is not None}


def choose_process_server(session: Session, now: dt.datetime) -> ProcessServer | None:
    servers = session.scalars(select(ProcessServer)).all()
    counts = machine_counts(session)
    chosen = rules.choose_process_server([rules.Candidate(ps.id, ps_health(ps, counts.get(ps.id, 0), now)) for ps in servers])
    return next((ps for ps in servers if ps.id == chosen), None)


def record_process_server_load(session: Session, ps_id: str, load: s.ProcessServerLoad, now: dt.datetime) -> ProcessServer:
    """A process server's figures (its heartbeat). Backlog figures left out keep their last value."""
    ps = session.get(ProcessServer, ps_id)
    if ps is None:
        raise NotFoundError(f"process server {ps_id} is not registered")
    ps.cpu_warning_since = rules.track_since(ps.cpu_warning_since, load.cpu_percent, rules.LOAD_WARNING_PERCENT, now)
    ps.cpu_critical_since = rules.track_since(ps.cpu_critical_since, load.cpu_percent, rules.LOAD_CRITICAL_PERCENT, now)
    ps.memory_warning_since = rules.track_since(ps.memory_warning_since, load.memory_percent, rules.LOAD_WARNING_PERCENT, now)
    ps.memory_critical_since = rules.track_since(ps.memory_critical_since, load.memory_percent, rules.LOAD_CRITICAL_PERCENT, now)
    ps.cpu_percent, ps.memory_percent, ps.cache_free_percent = load.cpu_percent, load.memory_percent, load.cache_free_percent
    if load.upload_backlog_bytes is not None:
        ps.upload_backlog_bytes = load.upload_backlog_bytes
    if load.upload_rate_bytes_per_s is not None:
        ps.upload_rate_bytes_per_s = load.upload_rate_bytes_per_s
    ps.last_heartbeat_at = now
    return ps


def ps_out(ps: ProcessServer | None) -> s.ProcessServerOut | None:
    return None if ps is None else s.ProcessServerOut(id=ps.id, name=ps.name, address=ps.address)


def ps_health_out(ps: ProcessServer, machines: int, now: dt.datetime) -> s.ProcessServerHealthOut:
    h = ps_health(ps, machines, now)
    return s.ProcessServerHealthOut(id=ps.id, name=ps.name, address=ps.address, builtin=ps.builtin, health=h.overall.label,
                                    throttled=h.throttled, headroom_percent=round(h.headroom_percent, 1), machines=machines,
                                    alerts=[alert_out(a) for a in h.alerts], last_heartbeat_at=ps.last_heartbeat_at)


def alert_out(a: rules.Alert) -> s.AlertOut:
    return s.AlertOut(code=a.code, severity=a.severity.label, message=a.message)


def register_process_server(session: Session, ca: CertificateAuthority, req: s.ProcessServerRegistration,
                            remote: str, caller: ClientIdentity | None = None) -> s.ProcessServerRegistered:
    """A new name registers a new process server. An existing one is re-registered (new address,
    new certificate) only over mutual TLS with its current certificate: the passphrase alone
    would let anyone who has it redirect the machines of that process server to itself."""
    ps = session.scalars(select(ProcessServer).where(ProcessServer.name == req.name)).one_or_none()
    created = ps is None
    if ps is None:
        ps = ProcessServer(name=req.name, address=req.address, builtin=False, capacity_machines=req.capacity_machines)
        session.add(ps)
        session.flush()
    elif ps.builtin:
        raise ConflictError(f"process server name {req.name!r} is the appliance's built-in process server, which is "
                            "not registered through the API: register this process server under another name")
    elif caller is None:
        raise ConflictError(f"a process server named {req.name!r} is already registered (id {ps.id}): re-register it "
                            "with its current client certificate (mutual TLS), or register this one under another name")
    elif (caller.role, caller.subject_id, caller.fingerprint) != (ROLE_PROCESS_SERVER, ps.id, ps.cert_fingerprint):
        raise ForbiddenError(f"this client certificate is not the current one of process server {req.name!r} "
                             f"(id {ps.id}): re-register it with its current certificate, or register under another name")
    else:
        ps.address, ps.capacity_machines = req.address, req.capacity_machines
    cert = ca.sign_client_csr(req.csr, ROLE_PROCESS_SERVER, ps.id)
    ps.cert_fingerprint = cert_fingerprint(cert)
    session.add(Registration(kind=ROLE_PROCESS_SERVER, subject_id=ps.id, remote_address=remote,
                             cert_serial=format(cert.serial_number, "x"), cert_fingerprint=ps.cert_fingerprint))
    audit(session, f"{ROLE_PROCESS_SERVER}:{ps.id}",
          "process_server.registered" if created else "process_server.reregistered", "process_server", ps.id,
          {"name": ps.name, "address": ps.address}, remote)
    return s.ProcessServerRegistered(process_server_id=ps.id, certificate=cert_to_pem(cert).decode(),
                                     ca_certificate=cert_to_pem(ca.cert).decode())


def authorised_process_server(session: Session, ps_id: str, fingerprint: str) -> ProcessServer:
    ps = session.get(ProcessServer, ps_id)
    if ps is None or ps.cert_fingerprint != fingerprint:
        raise ForbiddenError("this certificate is not the current one of a registered process server: register again")
    return ps


def assigned_machines(session: Session, ps_id: str) -> list[s.AssignedMachine]:
    machines = session.scalars(select(Machine).where(Machine.process_server_id == ps_id).order_by(Machine.hostname))
    return [s.AssignedMachine(id=m.id, hostname=m.hostname, cert_fingerprint=m.cert_fingerprint,
                              desired_state=Desired(m.desired_state)) for m in machines]


# --- agents ---------------------------------------------------------------------------------
def default_policy(session: Session) -> Policy:
    policy = session.scalars(select(Policy).order_by(Policy.id).limit(1)).first()
    if policy is None:
        raise ConflictError("no replication policy exists: create one first (POST /api/v1/policies)")
    return policy


def register_agent(session: Session, ca: CertificateAuthority, req: s.AgentRegistration, remote: str,
                   now: dt.datetime) -> s.AgentRegistered:
    """Idempotent per host_id: the same machine keeps its id, policy, desired state, process
    server and replica; a new certificate replaces the old one (which stops working)."""
    names = [d.name for d in req.disks]
    if len(set(names)) != len(names):
        raise InvalidError(f"disk names must be unique, got {', '.join(names)}")
    machine = session.scalars(select(Machine).where(Machine.host_id == req.host_id)
                              .options(selectinload(Machine.disks))).one_or_none()
    created = machine is None
    if machine is None:
        machine = Machine(host_id=req.host_id, policy=default_policy(session), desired_state=Desired.STOP.value,
                          replication_state=State.NOT_ENABLED.value, state_changed_at=now, registered_at=now)
        machine.process_server = choose_process_server(session, now)
        session.add(machine)
    state_before = State(machine.replication_state)
    if not created:
        # An agent registers again when it lost its state (or was reinstalled): what the old one
        # reported no longer holds, the new one replicates from the start (the replica and its
        # recovery points stay), so its reports are judged from the start as well.
        restart = State.NOT_ENABLED if machine.desired_state == Desired.STOP.value else State.INITIATING
        machine.replication_state, machine.initial_sync_percent = restart.value, None
        if restart != state_before:
            machine.state_changed_at = now
    machine.hostname, machine.os_family, machine.os_name = req.hostname, req.os_family, req.os_name
    machine.agent_version, machine.addresses = req.agent_version, json.dumps(req.addresses)
    _register_disks(session, machine, req.disks)
    cert = ca.sign_client_csr(req.csr, ROLE_AGENT, machine.id)
    machine.cert_fingerprint = cert_fingerprint(cert)
    session.add(Registration(kind=ROLE_AGENT, subject_id=machine.id, remote_address=remote,
                             cert_serial=format(cert.serial_number, "x"), cert_fingerprint=machine.cert_fingerprint))
    audit(session, f"{ROLE_AGENT}:{machine.id}", "agent.registered" if created else "agent.reregistered", "machine",
          machine.id, {"hostname": machine.hostname, "disks": names, "process_server_id": machine.process_server_id,
                       "replication_state": {"from": state_before.value, "to": machine.replication_state}}, remote)
    return s.AgentRegistered(machine_id=machine.id, certificate=cert_to_pem(cert).decode(),
                             ca_certificate=cert_to_pem(ca.cert).decode(), process_server=ps_out(machine.process_server),
                             heartbeat_interval_s=HEARTBEAT_INTERVAL_S,
                             disks=[s.DiskIndex(name=d.name, index=d.index) for d in machine.disks])


def _register_disks(session: Session, machine: Machine, disks: list[s.DiskIn]) -> None:
    """A kept disk keeps its index (its replica is `disk<index>`), new disks are numbered after
    the kept ones. Dropping a disk that a kept one comes after would leave a hole in the
    numbering the data port uses, so it is refused (nothing written)."""
    registered = {d.name: d for d in machine.disks}
    wanted = {d.name for d in disks}
    kept = sorted(registered[n].index for n in wanted & set(registered))
    if kept != list(range(len(kept))):
        dropped = sorted((d for n, d in registered.items() if n not in wanted), key=lambda d: d.index)
        raise ConflictError(f"re-registration drops {', '.join(f'{d.name} (disk {d.index})' for d in dropped)} but keeps "
                            f"disks numbered after it: disk numbers name the replica disks and cannot change; "
                            f"register every disk up to disk {kept[-1]}, or only the last disks may be dropped")
    for name in set(registered) - wanted:
        machine.disks.remove(registered[name])
    session.flush()  # deleted first: a new disk may take the index of a dropped last disk
    next_index = len(kept)
    for disk in disks:
        if disk.name in registered:
            registered[disk.name].size_bytes = disk.size_bytes
        else:
            machine.disks.append(Disk(name=disk.name, index=next_index, size_bytes=disk.size_bytes,
                                      total_bytes=disk.size_bytes))
            next_index += 1
    session.flush()
    machine.disks.sort(key=lambda d: d.index)  # new rows are appended in request order; keep the relationship's


def load_machine(session: Session, machine_id: str) -> Machine:
    machine = session.scalars(select(Machine).where(Machine.id == machine_id).options(
        selectinload(Machine.disks), joinedload(Machine.policy), joinedload(Machine.process_server))).one_or_none()
    if machine is None:
        raise NotFoundError(f"machine {machine_id} is not registered")
    return machine


def check_agent_identity(machine_id: str, role: str, subject_id: str) -> None:
    """A client certificate acts only for its own machine (its newest one: see heartbeats)."""
    if role != ROLE_AGENT:
        raise ForbiddenError(f"a {role} certificate cannot act for a machine")
    if subject_id != machine_id:
        raise ForbiddenError(f"this certificate belongs to machine {subject_id}, not {machine_id}")


def policy_out(p: Policy) -> s.PolicyOut:
    return s.PolicyOut(id=p.id, name=p.name, rpo_threshold_minutes=p.rpo_threshold_minutes, retention_hours=p.retention_hours,
                       crash_consistent_minutes=p.crash_consistent_minutes, app_consistent_minutes=p.app_consistent_minutes)


# --- operators ------------------------------------------------------------------------------
def create_operator(session: Session, username: str, password_hash: str) -> None:
    session.add(Operator(username=username, password_hash=password_hash))
    audit(session, "cli", "operator.created", "operator", username)


@dataclass(frozen=True)
class AgentView:
    """The agent-owned figures of a machine, from its row or from the heartbeat store's memory."""
    state: State
    percent: float | None
    state_changed_at: dt.datetime
    last_heartbeat_at: dt.datetime | None
    disks: dict[str, tuple[int, int, int]]  # name -> total, replicated, backlog

    @classmethod
    def of(cls, m: Machine) -> AgentView:
        return cls(State(m.replication_state), m.initial_sync_percent, m.state_changed_at, m.last_heartbeat_at,
                   {d.name: (d.total_bytes, d.replicated_bytes, d.backlog_bytes) for d in m.disks})


def machine_alerts(m: Machine, agent: AgentView, now: dt.datetime) -> tuple[State, float | None, list[rules.Alert]]:
    state = effective_state(agent.state, agent.last_heartbeat_at, now, MACHINE_HEARTBEAT_TIMEOUT)
    alerts: list[rules.Alert] = []
    if state == State.DISCONNECTED:
        alerts.append(rules.Alert("disconnected", rules.Health.CRITICAL, "no heartbeat from the agent for over 5 min"))
    if state == State.STALLED:
        alerts.append(rules.Alert("stalled", rules.Health.CRITICAL, "replication is stalled"))
    rpo_minutes = None
    if state in RPO_STATES and m.desired_state != Desired.STOP.value:
        current = rules.rpo(m.last_recovery_point_at, agent.state_changed_at, now)
        rpo_minutes = round(current.total_seconds() / 60, 1)
        alerts += rules.rpo_alerts(current, m.policy.rpo_threshold_minutes)
    return state, rpo_minutes, alerts


def machine_out(m: Machine, now: dt.datetime, live: Live = None) -> s.MachineOut:
    """`live(machine_id)`: newer agent figures than the row's (the heartbeat store), if any."""
    agent = (live(m.id) if live else None) or AgentView.of(m)
    state, rpo_minutes, alerts = machine_alerts(m, agent, now)
    return s.MachineOut(
        id=m.id, host_id=m.host_id, hostname=m.hostname, os_family=m.os_family, os_name=m.os_name,
        agent_version=m.agent_version, addresses=json.loads(m.addresses), process_server_id=m.process_server_id,
        policy_id=m.policy_id, desired_state=Desired(m.desired_state), replication_state=state,
        initial_sync_percent=agent.percent, last_heartbeat_at=agent.last_heartbeat_at,
        last_recovery_point_at=m.last_recovery_point_at, rpo_minutes=rpo_minutes,
        health=max((a.severity for a in alerts), default=rules.Health.HEALTHY).label,
        alerts=[alert_out(a) for a in alerts],
        disks=[s.DiskOut(index=d.index, name=d.name, size_bytes=d.size_bytes, total_bytes=t, replicated_bytes=r, backlog_bytes=b)
               for d in m.disks for t, r, b in [agent.disks.get(d.name, (d.total_bytes, d.replicated_bytes, d.backlog_bytes))]])


def list_machines(session: Session, now: dt.datetime, live: Live = None) -> list[s.MachineOut]:
    machines = session.scalars(select(Machine).options(selectinload(Machine.disks), joinedload(Machine.policy))
                               .order_by(Machine.hostname, Machine.id)).all()
    return [machine_out(m, now, live) for m in machines]


def machine_action(session: Session, machine_id: str, action: Action, actor: str, remote: str) -> Machine:
    machine = load_machine(session, machine_id)
    before = Desired(machine.desired_state)
    try:
        after = apply_action(before, action)
    except TransitionError as exc:
        raise ConflictError(str(exc)) from None
    machine.desired_state = after.value
    if after == Desired.REPLICATE and machine.process_server is None:
        machine.process_server = choose_process_server(session, utcnow())
    session.flush()
    audit(session, actor, f"machine.{action.value}", "machine", machine.id,
          {"desired_before": before.value, "desired_after": after.value}, remote)
    return machine


def switch_process_server(session: Session, machine_id: str, ps_id: str, actor: str, remote: str,
                          now: dt.datetime) -> Machine:
    machine = load_machine(session, machine_id)
    ps = session.get(ProcessServer, ps_id)
    if ps is None:
        raise NotFoundError(f"process server {ps_id} is not registered")
    if ps.id == machine.process_server_id:
        raise ConflictError(f"machine {machine_id} already uses process server {ps.name}")
    health = ps_health(ps, machine_counts(session).get(ps.id, 0), now)
    if health.overall == rules.Health.CRITICAL:
        raise ConflictError(f"process server {ps.name} is critical ({'; '.join(a.message for a in health.alerts)}): choose another")
    before = machine.process_server_id
    machine.process_server = ps
    session.flush()
    audit(session, actor, "machine.process_server_switched", "machine", machine.id, {"from": before, "to": ps.id}, remote)
    return machine


def get_policy(session: Session, policy_id: int) -> Policy:
    policy = session.get(Policy, policy_id)
    if policy is None:
        raise NotFoundError(f"policy {policy_id} does not exist")
    return policy


def _unique_policy_name(session: Session, name: str, except_id: int | None = None) -> None:
    other = session.scalars(select(Policy).where(Policy.name == name)).one_or_none()
    if other is not None and other.id != except_id:
        raise ConflictError(f"a policy named {name!r} already exists (id {other.id})")


def create_policy(session: Session, req: s.PolicyIn, actor: str, remote: str) -> Policy:
    _unique_policy_name(session, req.name)
    policy = Policy(**req.model_dump())
    session.add(policy)
    session.flush()
    audit(session, actor, "policy.created", "policy", str(policy.id), req.model_dump(), remote)
    return policy


def update_policy(session: Session, policy_id: int, req: s.PolicyPatch, actor: str, remote: str) -> Policy:
    policy = get_policy(session, policy_id)
    changes = req.model_dump(exclude_none=True)
    if "name" in changes:
        _unique_policy_name(session, changes["name"], policy.id)
    for key, value in changes.items():
        setattr(policy, key, value)
    audit(session, actor, "policy.updated", "policy", str(policy.id), changes, remote)
    return policy


def delete_policy(session: Session, policy_id: int, actor: str, remote: str) -> None:
    policy = get_policy(session, policy_id)
    users = session.scalar(select(func.count()).select_from(Machine).where(Machine.policy_id == policy_id))
    if users:
        raise ConflictError(f"policy {policy.name!r} is used by {users} machine(s): assign them another policy first")
    session.delete(policy)
    audit(session, actor, "policy.deleted", "policy", str(policy_id), {"name": policy.name}, remote)


def assign_policy(session: Session, machine_id: str, policy_id: int, actor: str, remote: str) -> Machine:
    machine = load_machine(session, machine_id)
    policy = get_policy(session, policy_id)
    before = machine.policy_id
    machine.policy = policy
    session.flush()
    audit(session, actor, "machine.policy_assigned", "machine", machine.id, {"from": before, "to": policy.id}, remote)
    return machine


def remove_process_server(session: Session, ps_id: str, actor: str, remote: str) -> None:
    """Forget a scale-out process server (retired, or one that lost its certificate: its name
    is free to register again). Its certificate stops working at once."""
    ps = session.get(ProcessServer, ps_id)
    if ps is None:
        raise NotFoundError(f"process server {ps_id} is not registered")
    if ps.builtin:
        raise ConflictError("the built-in process server is part of this appliance and cannot be removed")
    serving = machine_counts(session).get(ps.id, 0)
    if serving:
        raise ConflictError(f"process server {ps.name!r} serves {serving} machine(s): switch them to another process "
                            f"server first (PUT /api/v1/machines/<id>/process-server)")
    session.delete(ps)
    audit(session, actor, "process_server.removed", "process_server", ps.id, {"name": ps.name, "address": ps.address},
          remote)


def list_process_servers(session: Session, now: dt.datetime) -> list[s.ProcessServerHealthOut]:
    counts = machine_counts(session)
    servers = session.scalars(select(ProcessServer).order_by(ProcessServer.name)).all()
    return [ps_health_out(ps, counts.get(ps.id, 0), now) for ps in servers]


def audit_entries(session: Session, limit: int, before_id: int | None) -> list[s.AuditOut]:
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if before_id is not None:
        query = query.where(AuditEntry.id < before_id)
    return [s.AuditOut(id=e.id, at=e.at, actor=e.actor, action=e.action, target_type=e.target_type,
                       target_id=e.target_id, details=json.loads(e.details), remote_address=e.remote_address)
            for e in session.scalars(query)]


def job_out(job: Job) -> s.JobOut:
    return s.JobOut(id=job.id, kind=job.kind, target=job.target, status=job.status, progress_percent=job.progress_percent,
                    error=job.error, created_by=job.created_by, created_at=job.created_at, started_at=job.started_at,
                    finished_at=job.finished_at,
                    steps=[s.JobStepOut(position=st.position, name=st.name, status=st.status, message=st.message,
                                        started_at=st.started_at, finished_at=st.finished_at) for st in job.steps])


def list_jobs(session: Session, limit: int) -> list[s.JobOut]:
    jobs = session.scalars(select(Job).options(selectinload(Job.steps)).order_by(Job.created_at.desc()).limit(limit))
    return [job_out(j) for j in jobs]


def get_job(session: Session, job_id: str) -> s.JobOut:
    job = session.scalars(select(Job).where(Job.id == job_id).options(selectinload(Job.steps))).one_or_none()
    if job is None:
        raise NotFoundError(f"job {job_id} does not exist")
    return job_out(job)


@dataclass(frozen=True)
class StatusSummary:
    process_servers: list[s.ProcessServerHealthOut]
    machines: list[s.MachineOut]

    @property
    def overall(self) -> str:
        levels = [rules.Health[h.health.upper()] for h in self.process_servers] + \
                 [rules.Health[m.health.upper()] for m in self.machines]
        return rules.worst(*levels).label


def status(session: Session, now: dt.datetime, live: Live = None) -> StatusSummary:
    return StatusSummary(list_process_servers(session, now), list_machines(session, now, live))


