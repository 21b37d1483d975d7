"""Paused runs: a running run an operator (or an exhausted retry policy) has held.

A paused run keeps ``status = 'running'``; while ``paused`` is true nothing moves it: no
activation acquires it, no step of it is claimed, its timers do not fire and the sweeps
leave it alone. ``durable unpause`` clears the flag and dispatches what came due.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 13:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "durable_workflows",
        sa.Column("paused", sa.Boolean(), server_default=sa.text("false"), nullable=False),
    )
    op.create_index(
        "ix_durable_workflows_paused",
        "durable_workflows",
        ["name"],
        postgresql_where=sa.text("paused"),
    )


def downgrade() -> None:
    op.drop_index("ix_durable_workflows_paused", table_name="durable_workflows")
    op.drop_column("durable_workflows", "paused")
