"""tenant boundaries: grants, lanes and quotas, key rotation, per-URL endpoint state

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05

Existing clients keep the buckets they already used: each gets a whole-bucket
grant for every bucket its images were in, so in-flight work and running
integrations go on, and nothing else is reachable until an operator grants it
(``synthguard clients list`` shows the grants; ``clients revoke`` narrows them).
Webhook secrets are encrypted by ``synthguard clients encrypt-secrets``, not
here: a migration has no business reading the encryption key.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    with op.batch_alter_table('api_clients') as batch:
        batch.add_column(sa.Column('api_key_previous_hash', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('api_key_previous_until', sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('all_buckets', sa.Boolean(), server_default='false', nullable=False))
        batch.add_column(sa.Column('lanes', _JSON, nullable=True))
        batch.add_column(sa.Column('max_pending_realtime', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('max_pending_bulk', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('images_per_minute', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('callback_hosts', _JSON, nullable=True))
        batch.create_unique_constraint('uq_api_clients_api_key_previous_hash', ['api_key_previous_hash'])
    op.create_table(
        'client_grants',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('client_id', sa.Uuid(), nullable=False),
        sa.Column('bucket', sa.String(length=63), nullable=False),
        sa.Column('prefix', sa.String(length=1024), server_default='', nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ['client_id'], ['api_clients.id'], name='fk_client_grants_client_id_api_clients', ondelete='CASCADE'
        ),
        sa.PrimaryKeyConstraint('id', name='pk_client_grants'),
        sa.UniqueConstraint('client_id', 'bucket', 'prefix', name='uq_client_grants_client_id_bucket_prefix'),
    )
    op.create_index('ix_client_grants_client_id', 'client_grants', ['client_id'], unique=False)
    op.create_table(
        'webhook_endpoints',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('client_id', sa.Uuid(), nullable=False),
        sa.Column('url', sa.Text(), nullable=False),
        sa.Column('disabled_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('disabled_reason', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ['client_id'], ['api_clients.id'], name='fk_webhook_endpoints_client_id_api_clients', ondelete='CASCADE'
        ),
        sa.PrimaryKeyConstraint('id', name='pk_webhook_endpoints'),
        sa.UniqueConstraint('client_id', 'url', name='uq_webhook_endpoints_client_id_url'),
    )
    op.create_index('ix_webhook_endpoints_client_id', 'webhook_endpoints', ['client_id'], unique=False)
    _grant_buckets_already_used()


def _grant_buckets_already_used() -> None:
    conn = op.get_bind()
    rows = conn.execute(
        sa.text('SELECT DISTINCT client_id, bucket FROM images WHERE client_id IS NOT NULL AND bucket IS NOT NULL')
    ).all()
    if not rows:
        return
    grants = sa.table(
        'client_grants',
        sa.column('id', sa.Uuid()),
        sa.column('client_id', sa.Uuid()),
        sa.column('bucket', sa.String()),
        sa.column('prefix', sa.String()),
        sa.column('created_at', sa.DateTime(timezone=True)),
    )
    now = datetime.now(UTC)
    op.bulk_insert(
        grants,
        [
            {
                'id': uuid.uuid4(),
                'client_id': uuid.UUID(str(client_id)),
                'bucket': bucket,
                'prefix': '',
                'created_at': now,
            }
            for client_id, bucket in rows
            # A name S3 would not accept never becomes a grant; such images fail at claim.
            if len(bucket) <= 63
        ],
    )


def downgrade() -> None:
    op.drop_index('ix_webhook_endpoints_client_id', table_name='webhook_endpoints')
    op.drop_table('webhook_endpoints')
    op.drop_index('ix_client_grants_client_id', table_name='client_grants')
    op.drop_table('client_grants')
    with op.batch_alter_table('api_clients') as batch:
        batch.drop_constraint('uq_api_clients_api_key_previous_hash', type_='unique')
        batch.drop_column('callback_hosts')
        batch.drop_column('images_per_minute')
        batch.drop_column('max_pending_bulk')
        batch.drop_column('max_pending_realtime')
        batch.drop_column('lanes')
        batch.drop_column('all_buckets')
        batch.drop_column('api_key_previous_until')
        batch.drop_column('api_key_previous_hash')
