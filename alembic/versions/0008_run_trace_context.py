"""A run records the trace context its spans continue (OpenTelemetry, durable.tracing).

``trace_context`` holds the W3C ``traceparent`` (and ``tracestate``) of the start that
created the run, or of its parent run for a child workflow; NULL when tracing was off.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 13:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "durable_workflows",
        sa.Column("trace_context", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )


def downgrade() -> None:
    op.drop_column("durable_workflows", "trace_context")
