"""schedules

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21 13:54:59.390996
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "durable_schedules",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("workflow", sa.Text(), nullable=False),
        sa.Column("args", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("kwargs", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("cron", sa.Text(), nullable=True),
        sa.Column("every", sa.Interval(), nullable=True),
        sa.Column("timezone", sa.Text(), server_default=sa.text("'UTC'"), nullable=False),
        sa.Column("catchup", sa.Text(), server_default=sa.text("'skip'"), nullable=False),
        sa.Column("overlap", sa.Text(), server_default=sa.text("'skip'"), nullable=False),
        sa.Column("paused", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("origin", sa.Text(), server_default=sa.text("'api'"), nullable=False),
        sa.Column("next_fire_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_fire_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_run_id", sa.Text(), nullable=True),
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
        sa.CheckConstraint(
            "(cron IS NULL) <> (every IS NULL)", name=op.f("ck_durable_schedules_cron_or_every")
        ),
        sa.CheckConstraint(
            "catchup IN ('skip', 'once', 'all')", name=op.f("ck_durable_schedules_catchup")
        ),
        sa.CheckConstraint(
            "overlap IN ('skip', 'allow')", name=op.f("ck_durable_schedules_overlap")
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_durable_schedules")),
    )
    op.create_index(
        "ix_durable_schedules_due",
        "durable_schedules",
        ["next_fire_at"],
        unique=False,
        postgresql_where=sa.text("NOT paused"),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_durable_schedules_due",
        table_name="durable_schedules",
        postgresql_where=sa.text("NOT paused"),
    )
    op.drop_table("durable_schedules")
