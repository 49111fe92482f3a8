"""alerts as rows with a state machine: acknowledgement and clearing columns, the hysteresis of each condition
(alert_conditions), webhook deliveries (alert_deliveries); drift evaluation remembers which windows it took
(feature_stats.scored) and which were too small to decide (drift_pending, drift_reports.insufficient)

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("severity", sa.String(length=16), nullable=False, server_default="warning"))
        batch_op.add_column(sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("acknowledged_by", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("ack_note", sa.String(length=1000), nullable=True))
        batch_op.add_column(sa.Column("cleared_by", sa.String(length=64), nullable=True))
    with op.batch_alter_table("feature_stats", schema=None) as batch_op:
        batch_op.add_column(sa.Column("scored", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.create_index("ix_feature_stats_scored", ["scored"], unique=False)
    with op.batch_alter_table("drift_reports", schema=None) as batch_op:
        batch_op.add_column(sa.Column("session", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("window_seq", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("insufficient", sa.Boolean(), nullable=False, server_default=sa.false()))
    # windows the time watermark of earlier versions had already passed count as scored
    op.execute("UPDATE feature_stats SET scored = TRUE WHERE received_at <= "
               "(SELECT max(window_received_at) FROM drift_reports WHERE scope = 'device')")
    op.create_table(
        "alert_conditions",
        sa.Column("device_id", sa.String(length=63), nullable=False),
        sa.Column("manifest_sha256", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("streak", sa.Integer(), nullable=False),
        sa.Column("alert_id", sa.BigInteger(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "manifest_sha256", "kind"),
    )
    op.create_table(
        "drift_pending",
        sa.Column("device_id", sa.String(length=63), nullable=False),
        sa.Column("manifest_sha256", sa.String(length=64), nullable=False),
        sa.Column("windows", sa.JSON(), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "manifest_sha256"),
    )
    op.create_table(
        "alert_deliveries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("alert_id", sa.Integer(), nullable=False),
        sa.Column("event", sa.String(length=16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("error", sa.String(length=1000), nullable=True),
        sa.Column("next_try_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["alert_id"], ["alerts.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_alert_deliveries_alert_id", "alert_deliveries", ["alert_id"])
    op.create_index("ix_alert_deliveries_status_due", "alert_deliveries", ["status", "due_at"])


def downgrade() -> None:
    op.drop_index("ix_alert_deliveries_status_due", table_name="alert_deliveries")
    op.drop_index("ix_alert_deliveries_alert_id", table_name="alert_deliveries")
    op.drop_table("alert_deliveries")
    op.drop_table("drift_pending")
    op.drop_table("alert_conditions")
    with op.batch_alter_table("drift_reports", schema=None) as batch_op:
        batch_op.drop_column("insufficient")
        batch_op.drop_column("window_seq")
        batch_op.drop_column("session")
    with op.batch_alter_table("feature_stats", schema=None) as batch_op:
        batch_op.drop_index("ix_feature_stats_scored")
        batch_op.drop_column("scored")
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.drop_column("cleared_by")
        batch_op.drop_column("ack_note")
        batch_op.drop_column("acknowledged_by")
        batch_op.drop_column("acknowledged_at")
        batch_op.drop_column("severity")
