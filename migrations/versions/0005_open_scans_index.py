"""open scans by client and lane: the index behind every intake's pending count

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05

Intake sums ``pending_count`` over a client's open scans on one lane (its cap,
and which realtime images overflow). Only open scans are indexed, so the sum
stays cheap however many finished scans a client has. On PostgreSQL the index
is built CONCURRENTLY, so intake keeps writing scans while it builds.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = 'ix_scans_open_client_id_priority'
OPEN = sa.text('completed_at IS NULL')


def upgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        with op.get_context().autocommit_block():
            op.create_index(
                NAME, 'scans', ['client_id', 'priority'], postgresql_where=OPEN, postgresql_concurrently=True
            )
    else:
        op.create_index(NAME, 'scans', ['client_id', 'priority'], sqlite_where=OPEN)


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        with op.get_context().autocommit_block():
            op.drop_index(NAME, table_name='scans', postgresql_concurrently=True)
    else:
        op.drop_index(NAME, table_name='scans')
