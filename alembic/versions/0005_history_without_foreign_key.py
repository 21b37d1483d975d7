"""The history table without its foreign key to the runs.

Every row of ``durable_history`` is written by a statement that also writes the run, one of
its steps, timers or signals (tables that keep their foreign keys), so the key added nothing
but its check: one trigger query per history row, three per step. The statements that
delete runs (purge, and a retry's restarted children) now delete their history with them.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21 22:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

FOREIGN_KEY = "fk_durable_history_workflow_id_durable_workflows"


def upgrade() -> None:
    op.drop_constraint(FOREIGN_KEY, "durable_history", type_="foreignkey")


def downgrade() -> None:
    op.execute(
        "DELETE FROM durable_history h"
        " WHERE NOT EXISTS (SELECT 1 FROM durable_workflows w WHERE w.id = h.workflow_id)"
    )
    op.create_foreign_key(
        FOREIGN_KEY,
        "durable_history",
        "durable_workflows",
        ["workflow_id"],
        ["id"],
        ondelete="CASCADE",
    )
