"""archives.replica: retention groups per replica (StatefulSet pod, DaemonSet node)

Existing rows are backfilled as ``backupd.model.recorded_replica`` derives them (kept here as
SQL, frozen, since a migration must not change when the code does): a StatefulSet's archives
belong to their pod, a DaemonSet's to their node, every other kind's to the workload ('').

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03 09:20:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

_OLD_COLUMNS = ['policy', 'namespace', 'workload', 'container', 'checkpoint_time']
_NEW_COLUMNS = ['policy', 'namespace', 'workload', 'replica', 'container', 'checkpoint_time']
_OLD_INDEX = 'ix_archives_' + '_'.join(_OLD_COLUMNS)
_NEW_INDEX = 'ix_archives_' + '_'.join(_NEW_COLUMNS)


def upgrade() -> None:
    with op.batch_alter_table('archives', schema=None) as batch_op:
        batch_op.add_column(sa.Column('replica', sa.String(length=253), server_default='', nullable=False))

    archives = sa.table('archives', sa.column('workload', sa.String), sa.column('pod', sa.String),
                        sa.column('node', sa.String), sa.column('replica', sa.String))
    op.execute(archives.update().where(archives.c.workload.startswith('statefulset/')).values(replica=archives.c.pod))
    op.execute(archives.update().where(archives.c.workload.startswith('daemonset/')).values(replica=archives.c.node))

    with op.batch_alter_table('archives', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f(_OLD_INDEX))
        batch_op.create_index(batch_op.f(_NEW_INDEX), _NEW_COLUMNS, unique=False)


def downgrade() -> None:
    with op.batch_alter_table('archives', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f(_NEW_INDEX))
        batch_op.create_index(batch_op.f(_OLD_INDEX), _OLD_COLUMNS, unique=False)
        batch_op.drop_column('replica')
