"""image dedupe key

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Batch mode: SQLite can only add a constraint by rebuilding the table.
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("dedupe_key", sa.String(length=128), nullable=True))
        batch.create_unique_constraint("uq_images_client_id_dedupe_key", ["client_id", "dedupe_key"])


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.drop_constraint("uq_images_client_id_dedupe_key", type_="unique")
        batch.drop_column("dedupe_key")
