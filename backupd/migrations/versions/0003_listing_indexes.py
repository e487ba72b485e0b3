"""listing indexes: archives by (checkpoint_time, id), runs by (started_at, id)

``backupd list --limit``, ``/api/v1/archives`` and ``/api/v1/runs`` read pages in these orders
with a keyset cursor; with the indexes a page costs the same at the millionth archive as at the
first (before them, every page sorted the whole table).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 10:30:00.000000
"""

from __future__ import annotations

from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('archives', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_archives_checkpoint_time_id'), ['checkpoint_time', 'id'], unique=False)
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_runs_started_at_id'), ['started_at', 'id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_runs_started_at_id'))
    with op.batch_alter_table('archives', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_archives_checkpoint_time_id'))
