"""Steps carry their own history: who ran the current attempt, and whether unclaimed.

A remote step's ``step scheduled``, ``step started`` (of its current attempt) and ``step
completed`` / ``step failed`` events are now derived from its row when a run's history is
read (``durable.store.history``), instead of being written as three history rows per step.
A downgrade writes those events out as rows first.
The row needs two facts the history rows held: the worker that ran the current attempt and
whether it ran unclaimed. Runs recorded before this revision keep their history rows; a
derived event is not added where a written one stands for it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 10:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("durable_steps", sa.Column("worker", sa.Text(), nullable=True))
    op.add_column("durable_steps", sa.Column("unclaimed", sa.Boolean(), nullable=True))


# The events the step rows stand for (``durable.store.history`` as of this revision), written
# out as history rows before the columns go, so a downgrade loses no history.
_DERIVED = """
    INSERT INTO durable_history (workflow_id, seq, event, detail, at)
    SELECT workflow_id, seq, event, detail, at FROM (
    SELECT d.workflow_id, d.seq, 'step scheduled' AS event,
           jsonb_build_object('name', d.name) AS detail,
           d.created_at AS at, d.created_at AS sort_at, 3 AS rank
      FROM durable_steps d
     WHERE d.kind = 'task' AND NOT EXISTS (
    SELECT 1 FROM durable_history x
     WHERE x.workflow_id = d.workflow_id AND x.seq = d.seq
       AND (x.event = 'step copied' OR (x.event = 'step scheduled')))
    UNION ALL
    SELECT d.workflow_id, d.seq, 'step started',
           jsonb_build_object('attempt', d.attempts, 'worker', d.worker)
           || CASE WHEN d.unclaimed THEN '{"unclaimed": true}'::jsonb
                   ELSE '{}'::jsonb END,
           d.started_at, greatest(d.started_at, d.created_at), 1
      FROM durable_steps d
     WHERE d.kind = 'task' AND d.worker IS NOT NULL AND d.attempts > 0
       AND d.started_at IS NOT NULL AND NOT EXISTS (
    SELECT 1 FROM durable_history x
     WHERE x.workflow_id = d.workflow_id AND x.seq = d.seq
       AND (x.event = 'step copied' OR (x.event = 'step started'
            AND x.detail ->> 'attempt' = CAST(d.attempts AS text))))
    UNION ALL
    SELECT d.workflow_id, d.seq, 'step ' || d.status,
           jsonb_build_object('attempt', d.attempts, 'error', d.error),
           d.completed_at, d.completed_at, 2
      FROM durable_steps d
     WHERE d.kind = 'task' AND d.worker IS NOT NULL
       AND d.status IN ('completed', 'failed') AND d.completed_at IS NOT NULL
       AND NOT EXISTS (
    SELECT 1 FROM durable_history x
     WHERE x.workflow_id = d.workflow_id AND x.seq = d.seq
       AND (x.event = 'step copied' OR (x.event = 'step ' || d.status
            AND x.detail ->> 'attempt' = CAST(d.attempts AS text))))
    ) AS e
"""


def downgrade() -> None:
    op.execute(_DERIVED)
    op.drop_column("durable_steps", "unclaimed")
    op.drop_column("durable_steps", "worker")
