"""worker backlog

Revision ID: 7c4e1a9b2d53
Revises: 3b9d2c71e0a4
Create Date: 2026-12-03 21:20:00.000000
"""

import sqlalchemy as sa
from alembic import op


revision = '7c4e1a9b2d53'
down_revision = '3b9d2c71e0a4'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Builds a worker holds beyond its slots (worker.backlog); rows from before: none.
    with op.batch_alter_table('workers') as batch:
        batch.add_column(sa.Column('backlog', sa.Integer(), nullable=False,
                                   server_default='0'))


def downgrade() -> None:
    with op.batch_alter_table('workers') as batch:
        batch.drop_column('backlog')
