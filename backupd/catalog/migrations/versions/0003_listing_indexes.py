"""listing and report indexes: archives by (checkpoint_time, id), runs by (started_at, id); the
retention index covering what the report sums; runs by what the report's latest runs group by

``backupd list --limit``, ``/api/v1/archives`` and ``/api/v1/runs`` read pages in these orders
with a keyset cursor; with the indexes a page costs the same at the millionth archive as at the
first (before them, every page sorted the whole table). The report's aggregates read the two
others without touching the tables on PostgreSQL (index-only scans; SQLite has no INCLUDE).

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


_GROUP_COLUMNS = ['policy', 'namespace', 'workload', 'replica', 'container', 'checkpoint_time']
_GROUP_INDEX = 'ix_archives_' + '_'.join(_GROUP_COLUMNS)
_RUN_COLUMNS = ['policy', 'kind', 'outcome', 'namespace', 'workload', 'container', 'pod', 'started_at']
_RUN_INDEX = 'ix_runs_' + '_'.join(_RUN_COLUMNS)


def upgrade() -> None:
    with op.batch_alter_table('archives', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_archives_checkpoint_time_id'), ['checkpoint_time', 'id'], unique=False)
        batch_op.drop_index(batch_op.f(_GROUP_INDEX))
        batch_op.create_index(batch_op.f(_GROUP_INDEX), _GROUP_COLUMNS, unique=False,
                              postgresql_include=['state', 'pinned', 'stored_size', 'id'])
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_runs_started_at_id'), ['started_at', 'id'], unique=False)
        batch_op.create_index(batch_op.f(_RUN_INDEX), _RUN_COLUMNS, unique=False)


def downgrade() -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f(_RUN_INDEX))
        batch_op.drop_index(batch_op.f('ix_runs_started_at_id'))
    with op.batch_alter_table('archives', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f(_GROUP_INDEX))
        batch_op.create_index(batch_op.f(_GROUP_INDEX), _GROUP_COLUMNS, unique=False)
        batch_op.drop_index(batch_op.f('ix_archives_checkpoint_time_id'))
