"""initial schema

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "alerts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("device_id", sa.String(length=63), nullable=True),
        sa.Column("manifest_sha256", sa.String(length=64), nullable=True),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("raised_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cleared_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_alerts_device_id"), ["device_id"], unique=False)

    op.create_table(
        "artifacts",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("location", sa.String(length=512), nullable=False),
        sa.PrimaryKeyConstraint("sha256"),
    )
    op.create_table(
        "devices",
        sa.Column("id", sa.String(length=63), nullable=False),
        sa.Column("profile", sa.String(length=64), nullable=False),
        sa.Column("groups", sa.JSON(), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("credentials_ref", sa.String(length=256), nullable=False),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("state_session", sa.BigInteger(), nullable=False),
        sa.Column("state_seq", sa.BigInteger(), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=True),
        sa.Column("agent_version", sa.String(length=32), nullable=True),
        sa.Column("fingerprint", sa.JSON(), nullable=True),
        sa.Column("running_manifest", sa.String(length=64), nullable=True),
        sa.Column("running_artifact", sa.String(length=64), nullable=True),
        sa.Column("install_step", sa.String(length=16), nullable=True),
        sa.Column("install_error", sa.String(length=1000), nullable=True),
        sa.Column("desired_generation", sa.BigInteger(), nullable=False),
        sa.Column("desired_manifest", sa.String(length=64), nullable=True),
        sa.Column("desired_artifact", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "drift_reports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("device_id", sa.String(length=63), nullable=True),
        sa.Column("manifest_sha256", sa.String(length=64), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.Column("drifted", sa.Boolean(), nullable=False),
        sa.Column("worst", sa.String(length=64), nullable=True),
        sa.Column("report", sa.JSON(), nullable=False),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("drift_reports", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_drift_reports_device_id"), ["device_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_drift_reports_manifest_sha256"), ["manifest_sha256"], unique=False)

    op.create_table(
        "feature_stats",
        sa.Column("device_id", sa.String(length=63), nullable=False),
        sa.Column("session", sa.BigInteger(), nullable=False),
        sa.Column("window_seq", sa.BigInteger(), nullable=False),
        sa.Column("manifest_sha256", sa.String(length=64), nullable=False),
        sa.Column("end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "session", "window_seq"),
    )
    with op.batch_alter_table("feature_stats", schema=None) as batch_op:
        batch_op.create_index("ix_stats_manifest_end", ["manifest_sha256", "end"], unique=False)

    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("manifest_sha256", sa.String(length=64), nullable=False),
        sa.Column("signed_manifest", sa.LargeBinary(), nullable=False),
        sa.Column("stage", sa.String(length=16), nullable=False),
        sa.Column("author", sa.String(length=256), nullable=True),
        sa.Column("lineage", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("manifest_sha256"),
        sa.UniqueConstraint("name", "version"),
    )
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_model_versions_name"), ["name"], unique=False)

    op.create_table(
        "telemetry",
        sa.Column("device_id", sa.String(length=63), nullable=False),
        sa.Column("session", sa.BigInteger(), nullable=False),
        sa.Column("window_seq", sa.BigInteger(), nullable=False),
        sa.Column("start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("manifest_sha256", sa.String(length=64), nullable=True),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("p50_ms", sa.Float(), nullable=True),
        sa.Column("p95_ms", sa.Float(), nullable=True),
        sa.Column("p99_ms", sa.Float(), nullable=True),
        sa.Column("dropped_windows", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "session", "window_seq"),
    )
    with op.batch_alter_table("telemetry", schema=None) as batch_op:
        batch_op.create_index("ix_telemetry_device_end", ["device_id", "end"], unique=False)

    op.create_table(
        "version_artifacts",
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("target", sa.String(length=16), nullable=False),
        sa.Column("precision", sa.String(length=8), nullable=False),
        sa.Column("runtime", sa.String(length=32), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["sha256"],
            ["artifacts.sha256"],
        ),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["model_versions.id"],
        ),
        sa.PrimaryKeyConstraint("version_id", "name"),
    )


def downgrade() -> None:
    op.drop_table("version_artifacts")
    with op.batch_alter_table("telemetry", schema=None) as batch_op:
        batch_op.drop_index("ix_telemetry_device_end")

    op.drop_table("telemetry")
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_versions_name"))

    op.drop_table("model_versions")
    with op.batch_alter_table("feature_stats", schema=None) as batch_op:
        batch_op.drop_index("ix_stats_manifest_end")

    op.drop_table("feature_stats")
    with op.batch_alter_table("drift_reports", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_drift_reports_manifest_sha256"))
        batch_op.drop_index(batch_op.f("ix_drift_reports_device_id"))

    op.drop_table("drift_reports")
    op.drop_table("devices")
    op.drop_table("artifacts")
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_alerts_device_id"))

    op.drop_table("alerts")
