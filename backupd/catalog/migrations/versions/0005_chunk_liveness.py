"""chunks.seq, archive_packs.used: which chunks of a pack each deduplicated archive uses, so
that garbage collection can repack mostly-dead packs (docs/dedup-format.md, "Repacking")

``chunks.seq`` is a chunk's position in its pack's index; ``archive_packs.used`` a bitmap over
those positions of the chunks the archive's recipe uses (:mod:`backupd.catalog.liveness`).
Rows from before this revision keep NULL in both: unknown, every chunk of the pack counts as
live, so those packs are never repacked -- only removed whole once no archive uses them.

Revision ID: 0005
Revises: 0004
Create Date: 2027-01-10 09:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('chunks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('seq', sa.Integer(), nullable=True))
    with op.batch_alter_table('archive_packs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('used', sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('archive_packs', schema=None) as batch_op:
        batch_op.drop_column('used')
    with op.batch_alter_table('chunks', schema=None) as batch_op:
        batch_op.drop_column('seq')
