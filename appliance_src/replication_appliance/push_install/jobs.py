"""Push-install jobs in the configuration database: one Job, one JobStep per step, progress in
percent. The API (GET /api/v1/jobs/{id}) and `appliance push-install --wait` read them back.
Params hold the target and the credential's name, never a secret."""
from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import asdict

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload, sessionmaker

from ..db.models import Job, JobStep, Machine, utcnow
from .plan import STEPS, Target

FINAL_STEP_STATES = ("succeeded", "failed", "skipped")


def create_job(sessions: sessionmaker[Session], kind: str, target: Target, credential: str, version: str,
               actor: str) -> str:
    with sessions.begin() as session:
        job = Job(kind=kind, target=target.label, status="queued", created_by=actor,
                  params=json.dumps({**asdict(target), "credential": credential, "version": version}, sort_keys=True))
        job.steps = [JobStep(position=i, name=name) for i, name in enumerate(STEPS)]
        session.add(job)
        session.flush()
        return job.id


class JobRecorder:
    """A ProgressSink writing each step's state to the job, in its own short transaction."""

    def __init__(self, sessions: sessionmaker[Session], job_id: str,
                 echo: Callable[[str, str, str, str], None] | None = None) -> None:
        self.sessions, self.job_id, self.echo = sessions, job_id, echo

    def _job(self, session: Session) -> Job:
        return session.scalars(select(Job).where(Job.id == self.job_id).options(selectinload(Job.steps))).one()

    def start(self) -> None:
        with self.sessions.begin() as session:
            job = self._job(session)
            job.status, job.started_at = "running", utcnow()

    def step(self, name: str, status: str, message: str = "") -> None:
        with self.sessions.begin() as session:
            job = self._job(session)
            row = next(s for s in job.steps if s.name == name)
            row.status, row.message = status, message[:4000]
            now = utcnow()
            if status == "running":
                row.started_at = now
            else:
                row.finished_at = now
            done = sum(1 for s in job.steps if s.status in FINAL_STEP_STATES)
            job.progress_percent = int(100 * done / len(job.steps))
            target = job.target
        if self.echo is not None:
            self.echo(target, name, status, message)

    def finish(self, error: str | None, machine_id: str | None = None) -> None:
        with self.sessions.begin() as session:
            job = self._job(session)
            if machine_id:
                job.params = json.dumps({**json.loads(job.params), "machine_id": machine_id}, sort_keys=True)
            job.status = "failed" if error else "succeeded"
            job.error, job.finished_at = error, utcnow()
            if not error:
                job.progress_percent = 100


def heartbeat_probe(sessions: sessionmaker[Session]):
    """The agent version of a heartbeat from `machine_id` at or after `since` (epoch seconds), else None."""

    def probe(machine_id: str, since: float) -> str | None:
        threshold = dt.datetime.fromtimestamp(since, dt.UTC).replace(tzinfo=None, microsecond=0)
        with sessions() as session:
            machine = session.get(Machine, machine_id)
            if machine is None or machine.last_heartbeat_at is None or machine.last_heartbeat_at < threshold:
                return None
            return machine.agent_version or "unknown"

    return probe


def record_agent_version(sessions: sessionmaker[Session], machine_id: str, version: str) -> None:
    """After a confirmed install or upgrade: the version now running on the machine."""
    with sessions.begin() as session:
        machine = session.get(Machine, machine_id)
        if machine is not None:
            machine.agent_version = version


def last_push_params(sessions: sessionmaker[Session]) -> dict[str, dict]:
    """Per target label, the params of its latest successful push install or upgrade (for upgrades)."""
    with sessions() as session:
        jobs = session.scalars(select(Job).where(Job.kind.in_(("push-install", "agent-upgrade")),
                                                 Job.status == "succeeded").order_by(Job.finished_at))
        return {job.target: json.loads(job.params) for job in jobs}
