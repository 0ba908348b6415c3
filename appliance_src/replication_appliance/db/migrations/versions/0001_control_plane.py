"""Control plane: operators, policies, process servers, machines, disks, registrations,
jobs with steps, audit log.

Revision ID: 0001_control_plane
Revises:
"""
from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from alembic import op

revision = "0001_control_plane"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('audit_log',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(), nullable=False),
    sa.Column('actor', sa.String(length=128), nullable=False),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('target_type', sa.String(length=32), nullable=False),
    sa.Column('target_id', sa.String(length=64), nullable=False),
    sa.Column('details', sa.Text(), nullable=False),
    sa.Column('remote_address', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_log'))
    )
    op.create_index(op.f('ix_audit_log_at'), 'audit_log', ['at'], unique=False)
    op.create_table('jobs',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('target', sa.String(length=255), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('progress_percent', sa.Integer(), nullable=False),
    sa.Column('params', sa.Text(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_by', sa.String(length=128), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=True),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs'))
    )
    op.create_table('operators',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('username', sa.String(length=64), nullable=False),
    sa.Column('password_hash', sa.String(length=255), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_operators')),
    sa.UniqueConstraint('username', name=op.f('uq_operators_username'))
    )
    op.create_table('policies',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('rpo_threshold_minutes', sa.Integer(), nullable=False),
    sa.Column('retention_hours', sa.Integer(), nullable=False),
    sa.Column('crash_consistent_minutes', sa.Integer(), nullable=False),
    sa.Column('app_consistent_minutes', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_policies')),
    sa.UniqueConstraint('name', name=op.f('uq_policies_name'))
    )
    op.create_table('process_servers',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('address', sa.String(length=255), nullable=False),
    sa.Column('builtin', sa.Boolean(), nullable=False),
    sa.Column('cert_fingerprint', sa.String(length=64), nullable=True),
    sa.Column('capacity_machines', sa.Integer(), nullable=False),
    sa.Column('registered_at', sa.DateTime(), nullable=False),
    sa.Column('last_heartbeat_at', sa.DateTime(), nullable=True),
    sa.Column('cpu_percent', sa.Float(), nullable=False),
    sa.Column('memory_percent', sa.Float(), nullable=False),
    sa.Column('cache_free_percent', sa.Float(), nullable=False),
    sa.Column('upload_backlog_bytes', sa.BigInteger(), nullable=False),
    sa.Column('upload_rate_bytes_per_s', sa.Float(), nullable=False),
    sa.Column('cpu_warning_since', sa.DateTime(), nullable=True),
    sa.Column('cpu_critical_since', sa.DateTime(), nullable=True),
    sa.Column('memory_warning_since', sa.DateTime(), nullable=True),
    sa.Column('memory_critical_since', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_process_servers')),
    sa.UniqueConstraint('name', name=op.f('uq_process_servers_name'))
    )
    op.create_table('registrations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('subject_id', sa.String(length=36), nullable=False),
    sa.Column('remote_address', sa.String(length=64), nullable=False),
    sa.Column('cert_serial', sa.String(length=64), nullable=False),
    sa.Column('cert_fingerprint', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_registrations'))
    )
    op.create_index(op.f('ix_registrations_subject_id'), 'registrations', ['subject_id'], unique=False)
    op.create_table('job_steps',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.String(length=36), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=True),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_steps_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job_steps')),
    sa.UniqueConstraint('job_id', 'position', name='uq_job_steps_position')
    )
    op.create_table('machines',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('host_id', sa.String(length=128), nullable=False),
    sa.Column('hostname', sa.String(length=255), nullable=False),
    sa.Column('os_family', sa.String(length=16), nullable=False),
    sa.Column('os_name', sa.String(length=255), nullable=False),
    sa.Column('agent_version', sa.String(length=32), nullable=False),
    sa.Column('addresses', sa.Text(), nullable=False),
    sa.Column('cert_fingerprint', sa.String(length=64), nullable=True),
    sa.Column('process_server_id', sa.String(length=36), nullable=True),
    sa.Column('policy_id', sa.Integer(), nullable=False),
    sa.Column('desired_state', sa.String(length=16), nullable=False),
    sa.Column('replication_state', sa.String(length=16), nullable=False),
    sa.Column('initial_sync_percent', sa.Float(), nullable=True),
    sa.Column('state_changed_at', sa.DateTime(), nullable=False),
    sa.Column('last_heartbeat_at', sa.DateTime(), nullable=True),
    sa.Column('last_recovery_point_at', sa.DateTime(), nullable=True),
    sa.Column('registered_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['policy_id'], ['policies.id'], name=op.f('fk_machines_policy_id_policies')),
    sa.ForeignKeyConstraint(['process_server_id'], ['process_servers.id'], name=op.f('fk_machines_process_server_id_process_servers')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_machines')),
    sa.UniqueConstraint('host_id', name=op.f('uq_machines_host_id'))
    )
    op.create_table('disks',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('machine_id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('total_bytes', sa.BigInteger(), nullable=False),
    sa.Column('replicated_bytes', sa.BigInteger(), nullable=False),
    sa.Column('backlog_bytes', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['machine_id'], ['machines.id'], name=op.f('fk_disks_machine_id_machines'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_disks')),
    sa.UniqueConstraint('machine_id', 'name', name='uq_disks_machine_name')
    )
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    op.bulk_insert(sa.table("policies", sa.column("name", sa.String), sa.column("rpo_threshold_minutes", sa.Integer),
                            sa.column("retention_hours", sa.Integer), sa.column("crash_consistent_minutes", sa.Integer),
                            sa.column("app_consistent_minutes", sa.Integer), sa.column("created_at", sa.DateTime),
                            sa.column("updated_at", sa.DateTime)),
                   [{"name": "default", "rpo_threshold_minutes": 60, "retention_hours": 24, "crash_consistent_minutes": 5,
                     "app_consistent_minutes": 240, "created_at": now, "updated_at": now}])


def downgrade() -> None:
    op.drop_table('disks')
    op.drop_table('machines')
    op.drop_table('job_steps')
    op.drop_index(op.f('ix_registrations_subject_id'), table_name='registrations')
    op.drop_table('registrations')
    op.drop_table('process_servers')
    op.drop_table('policies')
    op.drop_table('operators')
    op.drop_table('jobs')
    op.drop_index(op.f('ix_audit_log_at'), table_name='audit_log')
    op.drop_table('audit_log')
