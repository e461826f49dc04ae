"""webhook delivery state

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('api_clients', sa.Column('webhook_secret_previous', sa.String(length=200), nullable=True))
    op.add_column('api_clients', sa.Column('webhook_secret_previous_until', sa.DateTime(timezone=True), nullable=True))
    op.add_column('api_clients', sa.Column('webhook_disabled_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('api_clients', sa.Column('webhook_disabled_reason', sa.Text(), nullable=True))
    op.add_column('scans', sa.Column('webhook_events', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True))
    op.add_column('webhook_deliveries', sa.Column('sending_until', sa.DateTime(timezone=True), nullable=True))
    op.add_column('webhook_deliveries', sa.Column('attempt_log', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True))


def downgrade() -> None:
    # Batch mode: older SQLite cannot drop columns in place.
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.drop_column("attempt_log")
        batch.drop_column("sending_until")
    with op.batch_alter_table("scans") as batch:
        batch.drop_column("webhook_events")
    with op.batch_alter_table("api_clients") as batch:
        batch.drop_column("webhook_disabled_reason")
        batch.drop_column("webhook_disabled_at")
        batch.drop_column("webhook_secret_previous_until")
        batch.drop_column("webhook_secret_previous")
