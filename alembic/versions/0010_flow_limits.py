"""Concurrency limits: a step's limit, key and priority, and the table of named limits.

A step under a ``durable.Limit`` is written ``queued`` with the limit's name, the key its key
function gave and its priority, and waits there until a slot of its key is free.
``durable_limits`` holds each limit's declared concurrency and the override that ``durable
limits set`` writes.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 13:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("durable_steps", sa.Column("limit_name", sa.Text(), nullable=True))
    op.add_column("durable_steps", sa.Column("limit_key", sa.Text(), nullable=True))
    op.add_column(
        "durable_steps",
        sa.Column("priority", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.create_index(
        "ix_durable_steps_limit",
        "durable_steps",
        ["limit_name", "limit_key", "status"],
        postgresql_where=sa.text("limit_name IS NOT NULL"),
    )
    op.create_index(
        "ix_durable_steps_queued",
        "durable_steps",
        ["limit_name", "limit_key", sa.text("priority DESC"), "created_at"],
        postgresql_where=sa.text("status = 'queued'"),
    )
    op.create_table(
        "durable_limits",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("concurrency", sa.Integer(), nullable=True),
        sa.Column("concurrency_override", sa.Integer(), nullable=True),
        sa.Column("rate_interval", sa.Float(), nullable=True),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "concurrency IS NULL OR concurrency > 0", name=op.f("ck_durable_limits_concurrency")
        ),
        sa.CheckConstraint(
            "concurrency_override IS NULL OR concurrency_override >= 0",
            name=op.f("ck_durable_limits_override"),
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_durable_limits")),
    )


def downgrade() -> None:
    op.drop_table("durable_limits")
    op.drop_index("ix_durable_steps_queued", table_name="durable_steps")
    op.drop_index("ix_durable_steps_limit", table_name="durable_steps")
    op.drop_column("durable_steps", "priority")
    op.drop_column("durable_steps", "limit_key")
    op.drop_column("durable_steps", "limit_name")
