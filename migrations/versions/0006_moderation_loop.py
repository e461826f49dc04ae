"""the moderation loop: cached results, PDQ hashes, reviews and a bank of known images

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06

Adds to ``images`` the columns of the result cache (``cached_from``), the
perceptual hash (``pdq``, ``pdq_quality``, ``pdq_forms``) and the bank match (``known_match``,
``flagged_by``), and the tables ``image_reviews`` and ``hash_bank``. The index
on ``images.sha256`` becomes ``(client_id, sha256)``: the cache looks up one
client's bytes, never another's. On PostgreSQL the index is built
CONCURRENTLY, so intake and workers keep writing images while it builds.
Existing images keep null in the new columns: they were scored before hashing.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')
CACHE_INDEX = 'ix_images_client_id_sha256'


def upgrade() -> None:
    with op.batch_alter_table('images') as batch:
        batch.add_column(sa.Column('flagged_by', _JSON, nullable=True))
        batch.add_column(sa.Column('cached_from', sa.Uuid(), nullable=True))
        batch.add_column(sa.Column('pdq', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('pdq_quality', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('pdq_forms', sa.LargeBinary(length=256), nullable=True))
        batch.add_column(sa.Column('known_match', _JSON, nullable=True))
        batch.create_foreign_key('fk_images_cached_from_images', 'images', ['cached_from'], ['id'])
    op.create_table(
        'image_reviews',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('image_id', sa.Uuid(), nullable=False),
        sa.Column('client_id', sa.Uuid(), nullable=True),
        sa.Column('verdict', sa.String(length=8), nullable=False),
        sa.Column('note', sa.Text(), nullable=True),
        sa.Column('reviewer', sa.String(length=200), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("verdict IN ('ai', 'human')", name='ck_image_reviews_verdict'),
        sa.ForeignKeyConstraint(
            ['client_id'], ['api_clients.id'], name='fk_image_reviews_client_id_api_clients', ondelete='CASCADE'
        ),
        sa.ForeignKeyConstraint(
            ['image_id'], ['images.id'], name='fk_image_reviews_image_id_images', ondelete='CASCADE'
        ),
        sa.PrimaryKeyConstraint('id', name='pk_image_reviews'),
    )
    op.create_index('ix_image_reviews_image_id_created_at', 'image_reviews', ['image_id', 'created_at'])
    op.create_index('ix_image_reviews_client_id_created_at', 'image_reviews', ['client_id', 'created_at'])
    op.create_table(
        'hash_bank',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('client_id', sa.Uuid(), nullable=True),
        sa.Column('hash', sa.String(length=64), nullable=False),
        sa.Column('quality', sa.Integer(), nullable=True),
        sa.Column('image_id', sa.Uuid(), nullable=True),
        sa.Column('source', sa.String(length=16), nullable=False),
        sa.Column('label', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('removed_at', sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("source IN ('review', 'import')", name='ck_hash_bank_source'),
        sa.ForeignKeyConstraint(
            ['client_id'], ['api_clients.id'], name='fk_hash_bank_client_id_api_clients', ondelete='CASCADE'
        ),
        sa.ForeignKeyConstraint(['image_id'], ['images.id'], name='fk_hash_bank_image_id_images', ondelete='SET NULL'),
        sa.PrimaryKeyConstraint('id', name='pk_hash_bank'),
        sa.UniqueConstraint('client_id', 'hash', name='uq_hash_bank_client_id_hash'),
    )
    op.create_index('ix_hash_bank_client_id_updated_at', 'hash_bank', ['client_id', 'updated_at'])
    if op.get_bind().dialect.name == 'postgresql':
        with op.get_context().autocommit_block():
            op.create_index(CACHE_INDEX, 'images', ['client_id', 'sha256'], postgresql_concurrently=True)
            op.drop_index('ix_images_sha256', table_name='images', postgresql_concurrently=True)
    else:
        op.create_index(CACHE_INDEX, 'images', ['client_id', 'sha256'])
        op.drop_index('ix_images_sha256', table_name='images')


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        with op.get_context().autocommit_block():
            op.create_index('ix_images_sha256', 'images', ['sha256'], postgresql_concurrently=True)
            op.drop_index(CACHE_INDEX, table_name='images', postgresql_concurrently=True)
    else:
        op.create_index('ix_images_sha256', 'images', ['sha256'])
        op.drop_index(CACHE_INDEX, table_name='images')
    op.drop_index('ix_hash_bank_client_id_updated_at', table_name='hash_bank')
    op.drop_table('hash_bank')
    op.drop_index('ix_image_reviews_client_id_created_at', table_name='image_reviews')
    op.drop_index('ix_image_reviews_image_id_created_at', table_name='image_reviews')
    op.drop_table('image_reviews')
    with op.batch_alter_table('images') as batch:
        batch.drop_constraint('fk_images_cached_from_images', type_='foreignkey')
        batch.drop_column('known_match')
        batch.drop_column('pdq_forms')
        batch.drop_column('pdq_quality')
        batch.drop_column('pdq')
        batch.drop_column('cached_from')
        batch.drop_column('flagged_by')
