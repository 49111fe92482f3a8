"""agent releases (the agent as a signed bundle) and their rollouts

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("desired_agent", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("agent_update", sa.JSON(), nullable=True))
    op.create_table(
        "agent_releases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("python", sa.String(length=8), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("signed", sa.LargeBinary(), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("version"),
        sa.UniqueConstraint("digest"),
    )
    op.create_table(
        "agent_rollouts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("release_id", sa.Integer(), nullable=False),
        sa.Column("target", sa.JSON(), nullable=False),
        sa.Column("waves", sa.JSON(), nullable=False),
        sa.Column("deadline_s", sa.Float(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("wave_started_at", sa.Float(), nullable=True),
        sa.Column("reason", sa.String(length=1000), nullable=True),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["release_id"], ["agent_releases.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    with op.batch_alter_table("agent_rollouts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_agent_rollouts_release_id"), ["release_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_agent_rollouts_state"), ["state"], unique=False)
    op.create_table(
        "agent_rollout_devices",
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=63), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=1000), nullable=True),
        sa.ForeignKeyConstraint(["rollout_id"], ["agent_rollouts.id"]),
        sa.PrimaryKeyConstraint("rollout_id", "device_id"),
    )


def downgrade() -> None:
    op.drop_table("agent_rollout_devices")
    with op.batch_alter_table("agent_rollouts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_agent_rollouts_state"))
        batch_op.drop_index(batch_op.f("ix_agent_rollouts_release_id"))
    op.drop_table("agent_rollouts")
    op.drop_table("agent_releases")
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_column("agent_update")
        batch_op.drop_column("desired_agent")
