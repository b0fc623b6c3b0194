"""api token revocations

Revision ID: 3b9d2c71e0a4
Revises: ea799ba5ba70
Create Date: 2026-12-02 04:25:00.000000
"""

import sqlalchemy as sa
from alembic import op

import vela.db.models


revision = '3b9d2c71e0a4'
down_revision = 'ea799ba5ba70'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('api_token_revocations',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('subject', sa.String(length=250), nullable=False),
    sa.Column('revoked_before', vela.db.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('expires_at', vela.db.models.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('subject')
    )


def downgrade() -> None:
    op.drop_table('api_token_revocations')
