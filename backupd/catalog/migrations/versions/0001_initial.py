"""initial catalog: policies, archives, runs, leases

Revision ID: 0001
Revises:
Create Date: 2026-11-27 12:10:05.847362
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('archives',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('policy', sa.String(length=63), nullable=False),
    sa.Column('backend', sa.String(length=63), nullable=False),
    sa.Column('key', sa.String(length=1024), nullable=False),
    sa.Column('node', sa.String(length=253), nullable=False),
    sa.Column('namespace', sa.String(length=63), nullable=False),
    sa.Column('pod', sa.String(length=253), nullable=False),
    sa.Column('workload', sa.String(length=300), nullable=False),
    sa.Column('container', sa.String(length=63), nullable=False),
    sa.Column('image', sa.String(length=1024), nullable=False),
    sa.Column('checkpoint_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('committed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('tar_size', sa.BigInteger(), nullable=True),
    sa.Column('stored_size', sa.BigInteger(), nullable=True),
    sa.Column('tar_sha256', sa.String(length=64), nullable=True),
    sa.Column('stored_sha256', sa.String(length=64), nullable=True),
    sa.Column('compression', sa.String(length=16), nullable=False),
    sa.Column('encryption', sa.String(length=16), nullable=False),
    sa.Column('pinned', sa.Boolean(), nullable=False),
    sa.Column('node_path', sa.String(length=4096), nullable=True),
    sa.Column('node_tar_deleted', sa.Boolean(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_archives'))
    )
    with op.batch_alter_table('archives', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_archives_backend_key'), ['backend', 'key'], unique=True)
        batch_op.create_index(batch_op.f('ix_archives_policy_namespace_workload_container_checkpoint_time'),
                              ['policy', 'namespace', 'workload', 'container', 'checkpoint_time'], unique=False)
        batch_op.create_index(batch_op.f('ix_archives_state'), ['state'], unique=False)

    op.create_table('leases',
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('holder', sa.String(length=255), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_leases'))
    )
    op.create_table('policies',
    sa.Column('name', sa.String(length=63), nullable=False),
    sa.Column('spec', sa.Text(), nullable=False),
    sa.Column('generation', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_policies'))
    )
    op.create_table('runs',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('policy', sa.String(length=63), nullable=True),
    sa.Column('node', sa.String(length=253), nullable=False),
    sa.Column('namespace', sa.String(length=63), nullable=True),
    sa.Column('pod', sa.String(length=253), nullable=True),
    sa.Column('workload', sa.String(length=300), nullable=True),
    sa.Column('container', sa.String(length=63), nullable=True),
    sa.Column('archive_id', sa.String(length=32), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('error_kind', sa.String(length=64), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('bytes_in', sa.BigInteger(), nullable=False),
    sa.Column('bytes_out', sa.BigInteger(), nullable=False),
    sa.Column('duration_seconds', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_runs'))
    )
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_runs_namespace_workload_container_started_at'),
                              ['namespace', 'workload', 'container', 'started_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_runs_policy_kind_started_at'), ['policy', 'kind', 'started_at'],
                              unique=False)



def downgrade() -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_runs_policy_kind_started_at'))
        batch_op.drop_index(batch_op.f('ix_runs_namespace_workload_container_started_at'))

    op.drop_table('runs')
    op.drop_table('policies')
    op.drop_table('leases')
    with op.batch_alter_table('archives', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_archives_state'))
        batch_op.drop_index(batch_op.f('ix_archives_policy_namespace_workload_container_checkpoint_time'))
        batch_op.drop_index(batch_op.f('ix_archives_backend_key'))

    op.drop_table('archives')
