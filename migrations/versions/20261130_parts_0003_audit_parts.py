"""Positive controls of one audit run as separate tasks: ``audit_parts``

Revision ID: 20261130_parts_0003
Revises: 20261129_reliability_0002
Create Date: 2026-11-30 04:00:00

* ``audit_parts``: one row per positive control of a split audit -- who claimed it,
  its heartbeat, and how it ended (``worker/parts.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261130_parts_0003"
down_revision: str | None = "20261129_reliability_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def timestamp(name: str) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=True)


def upgrade() -> None:
    op.create_table(
        "audit_parts",
        sa.Column("audit_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(length=255), nullable=True),
        timestamp("heartbeat_at"),
        timestamp("started_at"),
        timestamp("finished_at"),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.CheckConstraint("status IN ('queued', 'running', 'done', 'failed', 'cancelled', 'taken')",
                           name=op.f("ck_audit_parts_status")),
        sa.ForeignKeyConstraint(["audit_id"], ["audits.id"], name=op.f("fk_audit_parts_audit_id_audits"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("audit_id", "name", name=op.f("pk_audit_parts")),
    )


def downgrade() -> None:
    op.drop_table("audit_parts")
