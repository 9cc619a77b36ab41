"""Webhook outbox, the submitting token, publication time and lost-worker restarts of an audit

Revision ID: 20261129_reliability_0002
Revises: 0001
Create Date: 2026-11-29 21:30:00

* ``audits.token_id``: the API token that submitted the audit signs its webhook (NULL for
  portal submissions). Existing audits get their owner's newest live token, the one the
  previous code signed with, so webhooks still owed keep their signature.
* ``audits.published_at``: when the run message last went to the broker (NULL: publish at
  the next sweep); existing rows take their creation time.
* ``audits.recoveries``: how many times the audit was restarted after its worker died.
* ``webhook_outbox``: one completion webhook owed per finished audit, with its retry state.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261129_reliability_0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NEWEST_LIVE_TOKEN = """
UPDATE audits SET token_id = (
    SELECT t.id FROM api_tokens t
    WHERE t.user_id = audits.owner_id AND t.revoked_at IS NULL
    ORDER BY t.created_at DESC, t.id DESC LIMIT 1
)
"""


def timestamp(name: str, *, nullable: bool) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    with op.batch_alter_table("audits") as batch:  # SQLite: rebuilds the table to add the foreign key
        batch.add_column(sa.Column("token_id", sa.Integer(), nullable=True))
        batch.add_column(timestamp("published_at", nullable=True))
        batch.add_column(sa.Column("recoveries", sa.Integer(), nullable=False, server_default="0"))
        batch.create_foreign_key(
            op.f("fk_audits_token_id_api_tokens"), "api_tokens", ["token_id"], ["id"], ondelete="SET NULL"
        )
    op.execute(NEWEST_LIVE_TOKEN)
    op.execute("UPDATE audits SET published_at = created_at")
    with op.batch_alter_table("audits") as batch:
        batch.alter_column("recoveries", server_default=None)
    op.create_table(
        "webhook_outbox",
        sa.Column("audit_id", sa.String(length=36), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        timestamp("next_attempt_at", nullable=False),
        timestamp("lease_until", nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        timestamp("created_at", nullable=False),
        timestamp("finished_at", nullable=True),
        sa.CheckConstraint("state IN ('pending', 'delivered', 'failed')", name=op.f("ck_webhook_outbox_state")),
        sa.ForeignKeyConstraint(
            ["audit_id"], ["audits.id"], name=op.f("fk_webhook_outbox_audit_id_audits"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("audit_id", name=op.f("pk_webhook_outbox")),
    )
    op.create_index("ix_webhook_outbox_state_next_attempt_at", "webhook_outbox", ["state", "next_attempt_at"])


def downgrade() -> None:
    op.drop_table("webhook_outbox")
    with op.batch_alter_table("audits") as batch:
        batch.drop_constraint(op.f("fk_audits_token_id_api_tokens"), type_="foreignkey")
        batch.drop_column("recoveries")
        batch.drop_column("published_at")
        batch.drop_column("token_id")
