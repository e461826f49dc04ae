"""bank versions: the changes to a bank in the order they commit

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06

Workers read a bank's changes since they last looked. Until now they read
rows by ``updated_at``, 60 seconds back to catch late commits; a bank that
had gained more than 5,000 rows within a minute (an import) was then loaded
whole at every refresh, and a transaction that committed more than a minute
after stamping its rows could be passed over. Now each transaction that
changes a bank increments the bank's row in ``bank_versions`` (held until it
commits, so versions follow commit order) and stamps its rows with that
version; workers read the rows above the version they saw. Rows changed
before keep a null version: a worker reads them when it loads the bank.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BY_VERSION = 'ix_hash_bank_client_id_version'
BY_UPDATED_AT = 'ix_hash_bank_client_id_updated_at'


def upgrade() -> None:
    op.create_table(
        'bank_versions',
        sa.Column('bank', sa.Uuid(), nullable=False),
        sa.Column('version', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('bank', name=op.f('pk_bank_versions')),
    )
    with op.batch_alter_table('hash_bank') as batch:
        batch.add_column(sa.Column('version', sa.BigInteger(), nullable=True))
    _swap_index(BY_UPDATED_AT, BY_VERSION, ['client_id', 'version'])


def downgrade() -> None:
    _swap_index(BY_VERSION, BY_UPDATED_AT, ['client_id', 'updated_at'])
    with op.batch_alter_table('hash_bank') as batch:
        batch.drop_column('version')
    op.drop_table('bank_versions')


def _swap_index(old: str, new: str, columns: list[str]) -> None:
    if op.get_bind().dialect.name == 'postgresql':
        # A bank may be millions of rows: build without holding off reviews and imports meanwhile.
        with op.get_context().autocommit_block():
            op.create_index(new, 'hash_bank', columns, postgresql_concurrently=True)
            op.drop_index(old, table_name='hash_bank', postgresql_concurrently=True)
    else:
        op.create_index(new, 'hash_bank', columns)
        op.drop_index(old, table_name='hash_bank')
