"""Limited runs: a workflow's runs under a concurrency limit, queued for a slot of their key.

``limit_name``, ``limit_key`` and ``priority`` are set on a run of a workflow declared with
``@durable.workflow(..., limit=Limit(...))``; ``queued`` is true while it waits for a slot of
its key (running no code, at rest). A queued run's queue is served by
``ix_durable_workflows_queued`` in admission order; ``ix_durable_workflows_limit`` counts the
slots a key's running runs hold.

``durable_limits.rate_interval_override`` is the operators' override of a declared rate
(``durable limits set NAME --rate R/period``), in seconds between two starts of a key.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04 13:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("durable_workflows", sa.Column("limit_name", sa.Text(), nullable=True))
    op.add_column("durable_workflows", sa.Column("limit_key", sa.Text(), nullable=True))
    op.add_column(
        "durable_workflows",
        sa.Column("priority", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.add_column(
        "durable_workflows",
        sa.Column("queued", sa.Boolean(), server_default=sa.text("false"), nullable=False),
    )
    op.add_column("durable_limits", sa.Column("rate_interval_override", sa.Float(), nullable=True))
    op.create_check_constraint(
        op.f("ck_durable_limits_rate_override"),
        "durable_limits",
        "rate_interval_override IS NULL OR rate_interval_override > 0",
    )
    op.create_index(
        "ix_durable_workflows_limit",
        "durable_workflows",
        ["limit_name", "limit_key"],
        postgresql_where=sa.text("limit_name IS NOT NULL AND status = 'running'"),
    )
    op.create_index(
        "ix_durable_workflows_queued",
        "durable_workflows",
        ["limit_name", "limit_key", sa.text("priority DESC"), "created_at"],
        postgresql_where=sa.text("queued"),
    )


def downgrade() -> None:
    op.drop_index("ix_durable_workflows_queued", table_name="durable_workflows")
    op.drop_index("ix_durable_workflows_limit", table_name="durable_workflows")
    op.drop_constraint(op.f("ck_durable_limits_rate_override"), "durable_limits", type_="check")
    op.drop_column("durable_limits", "rate_interval_override")
    op.drop_column("durable_workflows", "queued")
    op.drop_column("durable_workflows", "priority")
    op.drop_column("durable_workflows", "limit_key")
    op.drop_column("durable_workflows", "limit_name")
