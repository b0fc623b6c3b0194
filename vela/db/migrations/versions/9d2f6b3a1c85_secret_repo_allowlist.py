"""secret repo allowlist

Revision ID: 9d2f6b3a1c85
Revises: 7c4e1a9b2d53
Create Date: 2026-12-05 10:00:00.000000
"""

import sqlalchemy as sa
from alembic import op


revision = '9d2f6b3a1c85'
down_revision = '7c4e1a9b2d53'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The repos a shared secret is given to; secrets from before: none (deny by default).
    with op.batch_alter_table('secrets') as batch:
        batch.add_column(sa.Column('repo_allowlist', sa.JSON(), nullable=False,
                                   server_default='[]'))


def downgrade() -> None:
    with op.batch_alter_table('secrets') as batch:
        batch.drop_column('repo_allowlist')
