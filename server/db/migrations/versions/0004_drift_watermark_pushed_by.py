"""drift_reports.window_received_at (drift evaluation resumes where it stopped) and model_versions.pushed_by

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("drift_reports", schema=None) as batch_op:
        batch_op.add_column(sa.Column("window_received_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pushed_by", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.drop_column("pushed_by")
    with op.batch_alter_table("drift_reports", schema=None) as batch_op:
        batch_op.drop_column("window_received_at")
