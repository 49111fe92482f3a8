"""bundle-signing keys: a key set with rotation state, and each device's confirmation

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("keyset_serial", sa.BigInteger(), nullable=False, server_default="0"))
    op.create_table(
        "keyset_statements",
        sa.Column("serial", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("statement", sa.LargeBinary(), nullable=False),
        sa.Column("phase", sa.String(length=16), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("serial"),
    )


def downgrade() -> None:
    op.drop_table("keyset_statements")
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_column("keyset_serial")
