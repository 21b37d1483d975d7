"""Searchable attributes on runs: a JSONB column and its GIN index.

``start(..., attributes={...})`` and ``ctx.set_attributes(...)`` store JSON scalars under
string keys on the run; ``durable list --attr key=value`` finds runs by them. Equality on
one or more keys is one containment (``attributes @> '{"customer": 42}'``), which the GIN
index (``jsonb_path_ops``: smaller and faster than the default operator class for ``@>``)
serves. Runs recorded before this revision have no attributes (``{}``).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 12:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "durable_workflows",
        sa.Column(
            "attributes",
            postgresql.JSONB(),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
    )
    op.create_index(
        "ix_durable_workflows_attributes",
        "durable_workflows",
        ["attributes"],
        postgresql_using="gin",
        postgresql_ops={"attributes": "jsonb_path_ops"},
    )


def downgrade() -> None:
    op.drop_index("ix_durable_workflows_attributes", table_name="durable_workflows")
    op.drop_column("durable_workflows", "attributes")
