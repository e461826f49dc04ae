"""crops of reviewed images in the bank

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06

A review ``ai`` also banks the PDQ hashes of crops of its image (worker.cropbank):
``image_reviews`` gains ``crops`` (pending, banked, or why not) and ``crops_at``,
with a partial index that the sweeper reads for crops a lost message left
pending, and ``hash_bank.source`` admits ``review_crop``, with an index on
``hash_bank.image_id``, by which a review ``human`` removes an image's crops. Existing reviews keep
null: only their image's own hash is banked, as before.

0006 named its two check constraints twice over (``ck_hash_bank_ck_hash_bank_source``:
the naming convention applied to a name that already followed it); they get
the names the models give them here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PENDING = sa.text("crops = 'pending'")
BY_IMAGE = 'ix_hash_bank_image_id'


def upgrade() -> None:
    with op.batch_alter_table('image_reviews') as batch:
        batch.add_column(sa.Column('crops', sa.String(length=32), nullable=True))
        batch.add_column(sa.Column('crops_at', sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        'ix_image_reviews_crops_pending', 'image_reviews', ['crops_at'], postgresql_where=PENDING, sqlite_where=PENDING
    )
    with op.batch_alter_table('hash_bank') as batch:
        batch.drop_constraint(op.f('ck_hash_bank_ck_hash_bank_source'), type_='check')
        batch.create_check_constraint(op.f('ck_hash_bank_source'), "source IN ('review', 'review_crop', 'import')")
    with op.batch_alter_table('image_reviews') as batch:
        batch.drop_constraint(op.f('ck_image_reviews_ck_image_reviews_verdict'), type_='check')
        batch.create_check_constraint(op.f('ck_image_reviews_verdict'), "verdict IN ('ai', 'human')")
    if op.get_bind().dialect.name == 'postgresql':
        # A bank may be millions of rows: build without holding off reviews and imports meanwhile.
        with op.get_context().autocommit_block():
            op.create_index(BY_IMAGE, 'hash_bank', ['image_id'], postgresql_concurrently=True)
    else:
        op.create_index(BY_IMAGE, 'hash_bank', ['image_id'])


def downgrade() -> None:
    # Crop hashes go with the kind of row that held them.
    op.execute("DELETE FROM hash_bank WHERE source = 'review_crop'")
    with op.batch_alter_table('image_reviews') as batch:
        batch.drop_constraint(op.f('ck_image_reviews_verdict'), type_='check')
        batch.create_check_constraint(op.f('ck_image_reviews_ck_image_reviews_verdict'), "verdict IN ('ai', 'human')")
    with op.batch_alter_table('hash_bank') as batch:
        batch.drop_constraint(op.f('ck_hash_bank_source'), type_='check')
        batch.create_check_constraint(op.f('ck_hash_bank_ck_hash_bank_source'), "source IN ('review', 'import')")
    op.drop_index(BY_IMAGE, table_name='hash_bank')
    op.drop_index('ix_image_reviews_crops_pending', table_name='image_reviews')
    with op.batch_alter_table('image_reviews') as batch:
        batch.drop_column('crops_at')
        batch.drop_column('crops')
