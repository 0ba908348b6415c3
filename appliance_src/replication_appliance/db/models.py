"""The configuration database (SQLAlchemy 2). Every table change comes with an Alembic
migration in db/migrations/versions; a test checks models and migrations agree.

Times are naive UTC (`utcnow()`), the lowest common denominator of MySQL and SQLite.
Other components define their tables on the same `Base` in their own package and add a
migration of their own (see docs/configuration-server.md, "Extending the database")."""
from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def new_id() -> str:
    return str(uuid.uuid4())


# Named constraints, so migrations can address them on MySQL and SQLite alike.
NAMING = {"ix": "ix_%(table_name)s_%(column_0_name)s", "uq": "uq_%(table_name)s_%(column_0_name)s",
          "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s", "pk": "pk_%(table_name)s"}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Operator(Base):
    __tablename__ = "operators"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Policy(Base):
    __tablename__ = "policies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    rpo_threshold_minutes: Mapped[int] = mapped_column(Integer, default=60)
    retention_hours: Mapped[int] = mapped_column(Integer, default=24)
    crash_consistent_minutes: Mapped[int] = mapped_column(Integer, default=5)
    app_consistent_minutes: Mapped[int] = mapped_column(Integer, default=240)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class ProcessServer(Base):
    __tablename__ = "process_servers"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    address: Mapped[str] = mapped_column(String(255))  # host:port agents send data to
    builtin: Mapped[bool] = mapped_column(Boolean, default=False)
    cert_fingerprint: Mapped[str | None] = mapped_column(String(64))
    capacity_machines: Mapped[int] = mapped_column(Integer, default=200)
    registered_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    cpu_percent: Mapped[float] = mapped_column(Float, default=0.0)
    memory_percent: Mapped[float] = mapped_column(Float, default=0.0)
    cache_free_percent: Mapped[float] = mapped_column(Float, default=100.0)
    upload_backlog_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    upload_rate_bytes_per_s: Mapped[float] = mapped_column(Float, default=0.0)
    # When a load figure last crossed a threshold and stayed above it: warnings need 15 min.
    cpu_warning_since: Mapped[dt.datetime | None] = mapped_column(DateTime)
    cpu_critical_since: Mapped[dt.datetime | None] = mapped_column(DateTime)
    memory_warning_since: Mapped[dt.datetime | None] = mapped_column(DateTime)
    memory_critical_since: Mapped[dt.datetime | None] = mapped_column(DateTime)
    machines: Mapped[list[Machine]] = relationship(back_populates="process_server")


class Machine(Base):
    __tablename__ = "machines"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    host_id: Mapped[str] = mapped_column(String(128), unique=True)  # BIOS UUID / machine-id: stable identity
    hostname: Mapped[str] = mapped_column(String(255))
    os_family: Mapped[str] = mapped_column(String(16))
    os_name: Mapped[str] = mapped_column(String(255), default="")
    agent_version: Mapped[str] = mapped_column(String(32), default="")
    addresses: Mapped[str] = mapped_column(Text, default="[]")  # JSON list
    cert_fingerprint: Mapped[str | None] = mapped_column(String(64))
    process_server_id: Mapped[str | None] = mapped_column(ForeignKey("process_servers.id"))
    policy_id: Mapped[int] = mapped_column(ForeignKey("policies.id"))
    desired_state: Mapped[str] = mapped_column(String(16), default="stop")
    replication_state: Mapped[str] = mapped_column(String(16), default="not_enabled")
    initial_sync_percent: Mapped[float | None] = mapped_column(Float)
    state_changed_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    last_recovery_point_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    registered_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    process_server: Mapped[ProcessServer | None] = relationship(back_populates="machines")
    policy: Mapped[Policy] = relationship()
    disks: Mapped[list[Disk]] = relationship(back_populates="machine", cascade="all, delete-orphan",
                                               order_by="Disk.index")


class Disk(Base):
    __tablename__ = "disks"
    __table_args__ = (UniqueConstraint("machine_id", "name", name="uq_disks_machine_name"),
                      UniqueConstraint("machine_id", "index", name="uq_disks_machine_index"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    machine_id: Mapped[str] = mapped_column(ForeignKey("machines.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(255))
    # Registration order, 0 first: the agent's disk number on the data port and `--disk N`.
    # Stable across re-registration (a kept disk keeps its number, new disks come after).
    index: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    total_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    replicated_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    backlog_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    machine: Mapped[Machine] = relationship(back_populates="disks")


class Registration(Base):
    """Every certificate the appliance issued, to whom and from where."""
    __tablename__ = "registrations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # agent | process-server
    subject_id: Mapped[str] = mapped_column(String(36), index=True)
    remote_address: Mapped[str] = mapped_column(String(64))
    cert_serial: Mapped[str] = mapped_column(String(64))
    cert_fingerprint: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Job(Base):
    """A long-running operation (push install, upgrade) with ordered steps and progress."""
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16), default="queued")  # queued|running|succeeded|failed|cancelled
    progress_percent: Mapped[int] = mapped_column(Integer, default=0)
    params: Mapped[str] = mapped_column(Text, default="{}")  # JSON, never secrets
    error: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    steps: Mapped[list[JobStep]] = relationship(back_populates="job", cascade="all, delete-orphan",
                                                  order_by="JobStep.position")


class JobStep(Base):
    __tablename__ = "job_steps"
    __table_args__ = (UniqueConstraint("job_id", "position", name="uq_job_steps_position"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending|running|succeeded|failed|skipped
    message: Mapped[str] = mapped_column(Text, default="")
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    job: Mapped[Job] = relationship(back_populates="steps")


class AuditEntry(Base):
    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))  # operator:<name>, agent:<id>, process-server:<id>, cli, system
    action: Mapped[str] = mapped_column(String(64))
    target_type: Mapped[str] = mapped_column(String(32), default="")
    target_id: Mapped[str] = mapped_column(String(64), default="")
    details: Mapped[str] = mapped_column(Text, default="{}")  # JSON, never secrets
    remote_address: Mapped[str] = mapped_column(String(64), default="")
