"""Runs that advance without touching an indexed column: ``advances``, and room for HOT.

A step's settle that schedules the run's next steps (or ends it) while the run is at rest
used to bump ``wake_seq`` and ``run_seq`` together and touch ``woken_at``: all three are in
the index of runs owed an activation (``ix_durable_workflows_owed``), so PostgreSQL wrote a
new entry in every index of the table at every step. Such a settle now leaves them alone and
counts in ``advances`` instead, which no index names: the update can be HOT (the new row
version on the same page, no index entry). ``wake_seq + advances`` is the run's version.

``fillfactor = 85`` leaves room on each page of ``durable_workflows`` for those new row
versions (it applies to pages written from now on).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04 13:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "durable_workflows",
        sa.Column("advances", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
    )
    op.execute("ALTER TABLE durable_workflows SET (fillfactor = 85)")


def downgrade() -> None:
    op.execute("ALTER TABLE durable_workflows RESET (fillfactor)")
    op.drop_column("durable_workflows", "advances")
