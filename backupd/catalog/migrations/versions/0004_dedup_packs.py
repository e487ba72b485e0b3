"""packs, chunks, archive_packs: the deduplicated format's packs, the chunk -> pack map and
the packs each deduplicated archive uses (issue 15, docs/dedup-format.md "Phase 2")

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 10:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'packs',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('backend', sa.String(length=63), nullable=False),
        sa.Column('pack_id', sa.String(length=64), nullable=False),
        sa.Column('key', sa.String(length=1024), nullable=False),
        sa.Column('stored_size', sa.BigInteger(), nullable=False),
        sa.Column('raw_size', sa.BigInteger(), nullable=False),
        sa.Column('chunk_count', sa.Integer(), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('marked_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_packs')),
    )
    with op.batch_alter_table('packs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_packs_backend_pack_id'), ['backend', 'pack_id'], unique=True)
        batch_op.create_index(batch_op.f('ix_packs_backend_state'), ['backend', 'state'], unique=False)
    op.create_table(
        'chunks',
        sa.Column('chunk_id', sa.LargeBinary(length=32), nullable=False),
        sa.Column('pack', sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(['pack'], ['packs.id'], name=op.f('fk_chunks_pack_packs'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('chunk_id', 'pack', name=op.f('pk_chunks')),
    )
    with op.batch_alter_table('chunks', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_chunks_pack'), ['pack'], unique=False)
    op.create_table(
        'archive_packs',
        sa.Column('archive_id', sa.String(length=32), nullable=False),
        sa.Column('pack', sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(['archive_id'], ['archives.id'], name=op.f('fk_archive_packs_archive_id_archives'),
                                ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['pack'], ['packs.id'], name=op.f('fk_archive_packs_pack_packs'),
                                ondelete='RESTRICT'),
        sa.PrimaryKeyConstraint('archive_id', 'pack', name=op.f('pk_archive_packs')),
    )
    with op.batch_alter_table('archive_packs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_archive_packs_pack'), ['pack'], unique=False)


def downgrade() -> None:
    op.drop_table('archive_packs')
    op.drop_table('chunks')
    op.drop_table('packs')
