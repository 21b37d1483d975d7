"""signals events cancellation children

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21 13:49:15.517472
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "durable_events",
        sa.Column("workflow_id", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("value", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["workflow_id"],
            ["durable_workflows.id"],
            name=op.f("fk_durable_events_workflow_id_durable_workflows"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("workflow_id", "key", name=op.f("pk_durable_events")),
    )
    op.create_table(
        "durable_signals",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("workflow_id", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column(
            "sent_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("consumed_seq", sa.Integer(), nullable=True),
        sa.Column("consumed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["workflow_id"],
            ["durable_workflows.id"],
            name=op.f("fk_durable_signals_workflow_id_durable_workflows"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_durable_signals")),
    )
    op.create_index(
        "ix_durable_signals_unconsumed",
        "durable_signals",
        ["workflow_id", "name", "id"],
        unique=False,
        postgresql_where=sa.text("consumed_seq IS NULL"),
    )
    op.add_column(
        "durable_steps", sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column("durable_workflows", sa.Column("parent_id", sa.Text(), nullable=True))
    op.add_column("durable_workflows", sa.Column("parent_seq", sa.Integer(), nullable=True))
    op.add_column(
        "durable_workflows",
        sa.Column(
            "cancel_requested", sa.Boolean(), server_default=sa.text("false"), nullable=False
        ),
    )
    op.add_column("durable_workflows", sa.Column("cancelled_at_seq", sa.Integer(), nullable=True))
    op.add_column(
        "durable_workflows",
        sa.Column("patches", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )
    op.add_column(
        "durable_workflows", sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_index(
        "ix_durable_workflows_parent_id",
        "durable_workflows",
        ["parent_id"],
        unique=False,
        postgresql_where=sa.text("parent_id IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_durable_workflows_parent_id",
        table_name="durable_workflows",
        postgresql_where=sa.text("parent_id IS NOT NULL"),
    )
    op.drop_column("durable_workflows", "deadline_at")
    op.drop_column("durable_workflows", "patches")
    op.drop_column("durable_workflows", "cancelled_at_seq")
    op.drop_column("durable_workflows", "cancel_requested")
    op.drop_column("durable_workflows", "parent_seq")
    op.drop_column("durable_workflows", "parent_id")
    op.drop_column("durable_steps", "deadline_at")
    op.drop_index(
        "ix_durable_signals_unconsumed",
        table_name="durable_signals",
        postgresql_where=sa.text("consumed_seq IS NULL"),
    )
    op.drop_table("durable_signals")
    op.drop_table("durable_events")
