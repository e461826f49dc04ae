"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('api_clients',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('api_key_hash', sa.String(length=64), nullable=False),
    sa.Column('api_key_prefix', sa.String(length=16), nullable=False),
    sa.Column('webhook_url', sa.Text(), nullable=True),
    sa.Column('webhook_secret', sa.String(length=200), nullable=True),
    sa.Column('default_threshold', sa.Float(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('disabled_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_clients')),
    sa.UniqueConstraint('api_key_hash', name=op.f('uq_api_clients_api_key_hash'))
    )
    op.create_table('scans',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('client_id', sa.Uuid(), nullable=True),
    sa.Column('origin', sa.String(length=32), nullable=False),
    sa.Column('source', sa.Text(), nullable=True),
    sa.Column('priority', sa.String(length=16), nullable=False),
    sa.Column('threshold', sa.Float(), nullable=True),
    sa.Column('callback_url', sa.Text(), nullable=True),
    sa.Column('metadata', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('idempotency_key', sa.String(length=200), nullable=True),
    sa.Column('request_hash', sa.String(length=64), nullable=True),
    sa.Column('image_count', sa.Integer(), nullable=False),
    sa.Column('pending_count', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("priority IN ('realtime', 'bulk')", name=op.f('ck_scans_priority')),
    sa.ForeignKeyConstraint(['client_id'], ['api_clients.id'], name=op.f('fk_scans_client_id_api_clients')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_scans')),
    sa.UniqueConstraint('client_id', 'idempotency_key', name='uq_scans_client_id_idempotency_key')
    )
    op.create_index(op.f('ix_scans_client_id'), 'scans', ['client_id'], unique=False)
    op.create_table('images',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('scan_id', sa.Uuid(), nullable=False),
    sa.Column('client_id', sa.Uuid(), nullable=True),
    sa.Column('bucket', sa.String(length=255), nullable=True),
    sa.Column('key', sa.Text(), nullable=False),
    sa.Column('version_id', sa.String(length=1024), nullable=True),
    sa.Column('etag', sa.String(length=200), nullable=True),
    sa.Column('sha256', sa.String(length=64), nullable=True),
    sa.Column('size_bytes', sa.BigInteger(), nullable=True),
    sa.Column('format', sa.String(length=16), nullable=True),
    sa.Column('width', sa.Integer(), nullable=True),
    sa.Column('height', sa.Integer(), nullable=True),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('score', sa.Float(), nullable=True),
    sa.Column('flagged', sa.Boolean(), nullable=True),
    sa.Column('threshold', sa.Float(), nullable=False),
    sa.Column('model_name', sa.String(length=200), nullable=True),
    sa.Column('model_version', sa.String(length=100), nullable=True),
    sa.Column('provenance', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('error_code', sa.String(length=64), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("state IN ('queued', 'processing', 'done', 'failed')", name=op.f('ck_images_state')),
    sa.ForeignKeyConstraint(['client_id'], ['api_clients.id'], name=op.f('fk_images_client_id_api_clients')),
    sa.ForeignKeyConstraint(['scan_id'], ['scans.id'], name=op.f('fk_images_scan_id_scans')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_images'))
    )
    op.create_index('ix_images_bucket_key', 'images', ['bucket', 'key'], unique=False)
    op.create_index(op.f('ix_images_client_id'), 'images', ['client_id'], unique=False)
    op.create_index(op.f('ix_images_scan_id'), 'images', ['scan_id'], unique=False)
    op.create_index(op.f('ix_images_sha256'), 'images', ['sha256'], unique=False)
    op.create_index('ix_images_state_updated_at', 'images', ['state', 'updated_at'], unique=False)
    op.create_table('webhook_deliveries',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('client_id', sa.Uuid(), nullable=True),
    sa.Column('scan_id', sa.Uuid(), nullable=True),
    sa.Column('image_id', sa.Uuid(), nullable=True),
    sa.Column('event_type', sa.String(length=64), nullable=False),
    sa.Column('url', sa.Text(), nullable=False),
    sa.Column('payload', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_status', sa.Integer(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['client_id'], ['api_clients.id'], name=op.f('fk_webhook_deliveries_client_id_api_clients')),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_webhook_deliveries_image_id_images')),
    sa.ForeignKeyConstraint(['scan_id'], ['scans.id'], name=op.f('fk_webhook_deliveries_scan_id_scans')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_deliveries')),
    sa.UniqueConstraint('image_id', 'event_type', name='uq_webhook_deliveries_image_id_event_type')
    )
    op.create_index(op.f('ix_webhook_deliveries_client_id'), 'webhook_deliveries', ['client_id'], unique=False)
    op.create_index(op.f('ix_webhook_deliveries_scan_id'), 'webhook_deliveries', ['scan_id'], unique=False)
    op.create_index('ix_webhook_deliveries_state_next_attempt_at', 'webhook_deliveries', ['state', 'next_attempt_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_webhook_deliveries_state_next_attempt_at', table_name='webhook_deliveries')
    op.drop_index(op.f('ix_webhook_deliveries_scan_id'), table_name='webhook_deliveries')
    op.drop_index(op.f('ix_webhook_deliveries_client_id'), table_name='webhook_deliveries')
    op.drop_table('webhook_deliveries')
    op.drop_index('ix_images_state_updated_at', table_name='images')
    op.drop_index(op.f('ix_images_sha256'), table_name='images')
    op.drop_index(op.f('ix_images_scan_id'), table_name='images')
    op.drop_index(op.f('ix_images_client_id'), table_name='images')
    op.drop_index('ix_images_bucket_key', table_name='images')
    op.drop_table('images')
    op.drop_index(op.f('ix_scans_client_id'), table_name='scans')
    op.drop_table('scans')
    op.drop_table('api_clients')
