"""Delayed and debounced starts: a run may wait for its start time.

``start_at`` is set while a run created by ``durable.start(..., start_at=, countdown=,
debounce=)`` waits for its start timer (purpose ``start``, position 0): no activation runs
it until the timer fires and clears the column. NULL for every other run.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04 12:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "durable_workflows", sa.Column("start_at", sa.DateTime(timezone=True), nullable=True)
    )


def downgrade() -> None:
    op.drop_column("durable_workflows", "start_at")
