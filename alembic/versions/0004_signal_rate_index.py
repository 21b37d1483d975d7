"""Index signals by run and time, for the per-run signal limits.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21 14:30:00
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_durable_signals_workflow_id_sent_at",
        "durable_signals",
        ["workflow_id", "sent_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_durable_signals_workflow_id_sent_at", table_name="durable_signals")
