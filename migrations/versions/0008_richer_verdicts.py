"""richer verdicts: who made an image (images.generator), every frame of an animation (images.frames), and what the model may not judge well (images.quality)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06

The generator an image's provenance evidence names (worker.attribution):
``{"name", "tool", "model", "signal", "raw"}``, or null; and the quality hints
(worker.quality): ``{"hints", "short_side", "input_side", "jpeg_quality",
"min_jpeg_quality"}``; and an animation's frames (``{"count", "scored":
[{"index", "score"}]}``). Images stored before keep null until scored
again; their provenance is stored, so ``worker.attribution.attribute`` can
name them from it at any time.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    with op.batch_alter_table('images') as batch:
        batch.add_column(sa.Column('generator', _JSON, nullable=True))
        batch.add_column(sa.Column('quality', _JSON, nullable=True))
        batch.add_column(sa.Column('frames', _JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('images') as batch:
        batch.drop_column('frames')
        batch.drop_column('quality')
        batch.drop_column('generator')
