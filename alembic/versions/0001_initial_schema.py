"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-21 13:32:41.466245
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "durable_workflows",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("args", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("kwargs", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("result", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("wake_seq", sa.BigInteger(), server_default=sa.text("1"), nullable=False),
        sa.Column("run_seq", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "woken_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("lease_owner", sa.Text(), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_durable_workflows")),
    )
    op.create_index(
        "ix_durable_workflows_lease_owner",
        "durable_workflows",
        ["lease_owner"],
        unique=False,
        postgresql_where=sa.text("lease_owner IS NOT NULL"),
    )
    op.create_index("ix_durable_workflows_name", "durable_workflows", ["name"], unique=False)
    op.create_index(
        "ix_durable_workflows_owed",
        "durable_workflows",
        ["woken_at"],
        unique=False,
        postgresql_where=sa.text("status = 'running' AND wake_seq > run_seq"),
    )
    op.create_index(
        "ix_durable_workflows_status_created_at",
        "durable_workflows",
        ["status", "created_at"],
        unique=False,
    )
    op.create_table(
        "durable_history",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("workflow_id", sa.Text(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=True),
        sa.Column("event", sa.Text(), nullable=False),
        sa.Column("detail", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column(
            "at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["workflow_id"],
            ["durable_workflows.id"],
            name=op.f("fk_durable_history_workflow_id_durable_workflows"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_durable_history")),
    )
    op.create_index(
        "ix_durable_history_workflow_id_id", "durable_history", ["workflow_id", "id"], unique=False
    )
    op.create_table(
        "durable_steps",
        sa.Column("workflow_id", sa.Text(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("args", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("kwargs", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("options", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("result", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("lease_owner", sa.Text(), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("dispatch_count", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["workflow_id"],
            ["durable_workflows.id"],
            name=op.f("fk_durable_steps_workflow_id_durable_workflows"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("workflow_id", "seq", name=op.f("pk_durable_steps")),
    )
    op.create_index(
        "ix_durable_steps_scheduled",
        "durable_steps",
        ["dispatched_at"],
        unique=False,
        postgresql_where=sa.text("status = 'scheduled'"),
    )
    op.create_index(
        "ix_durable_steps_started_lease",
        "durable_steps",
        ["lease_expires_at"],
        unique=False,
        postgresql_where=sa.text("status = 'started'"),
    )
    op.create_table(
        "durable_timers",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("workflow_id", sa.Text(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("purpose", sa.Text(), nullable=False),
        sa.Column("fire_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("fired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["workflow_id"],
            ["durable_workflows.id"],
            name=op.f("fk_durable_timers_workflow_id_durable_workflows"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_durable_timers")),
    )
    op.create_index(
        "ix_durable_timers_pending",
        "durable_timers",
        ["fire_at"],
        unique=False,
        postgresql_where=sa.text("fired_at IS NULL"),
    )
    op.create_index(
        "ix_durable_timers_workflow_id_seq", "durable_timers", ["workflow_id", "seq"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_durable_timers_workflow_id_seq", table_name="durable_timers")
    op.drop_index(
        "ix_durable_timers_pending",
        table_name="durable_timers",
        postgresql_where=sa.text("fired_at IS NULL"),
    )
    op.drop_table("durable_timers")
    op.drop_index(
        "ix_durable_steps_started_lease",
        table_name="durable_steps",
        postgresql_where=sa.text("status = 'started'"),
    )
    op.drop_index(
        "ix_durable_steps_scheduled",
        table_name="durable_steps",
        postgresql_where=sa.text("status = 'scheduled'"),
    )
    op.drop_table("durable_steps")
    op.drop_index("ix_durable_history_workflow_id_id", table_name="durable_history")
    op.drop_table("durable_history")
    op.drop_index("ix_durable_workflows_status_created_at", table_name="durable_workflows")
    op.drop_index(
        "ix_durable_workflows_owed",
        table_name="durable_workflows",
        postgresql_where=sa.text("status = 'running' AND wake_seq > run_seq"),
    )
    op.drop_index("ix_durable_workflows_name", table_name="durable_workflows")
    op.drop_index(
        "ix_durable_workflows_lease_owner",
        table_name="durable_workflows",
        postgresql_where=sa.text("lease_owner IS NOT NULL"),
    )
    op.drop_table("durable_workflows")
