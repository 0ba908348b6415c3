"""Disks get an explicit index (registration order, 0 first): existing disks are numbered
by id within their machine, the order they were registered in.

Revision ID: 0002_disk_index
Revises: 0001_control_plane
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_disk_index"
down_revision = "0001_control_plane"
branch_labels = None
depends_on = None

disks = sa.table("disks", sa.column("id", sa.Integer()), sa.column("machine_id", sa.String(36)),
                 sa.column("index", sa.Integer()))


def upgrade() -> None:
    op.add_column("disks", sa.Column("index", sa.Integer(), nullable=True))
    conn = op.get_bind()
    next_index: dict[str, int] = {}
    for disk_id, machine_id in conn.execute(sa.select(disks.c.id, disks.c.machine_id).order_by(disks.c.id)).all():
        index = next_index.get(machine_id, 0)
        next_index[machine_id] = index + 1
        conn.execute(disks.update().where(disks.c.id == disk_id).values(index=index))
    with op.batch_alter_table("disks") as batch:  # SQLite cannot alter a column in place
        batch.alter_column("index", existing_type=sa.Integer(), nullable=False)
        batch.create_unique_constraint("uq_disks_machine_index", ["machine_id", "index"])


def downgrade() -> None:
    with op.batch_alter_table("disks") as batch:
        batch.drop_constraint("uq_disks_machine_index", type_="unique")
        batch.drop_column("index")
