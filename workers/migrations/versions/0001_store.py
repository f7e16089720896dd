"""scores, outcomes and feedback

Revision ID: 0001_store
Revises:
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0001_store"
down_revision = None
branch_labels = None
depends_on = None


def _lead_columns() -> list[sa.Column]:
    return [
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("crm", sa.String(16), nullable=False),
        sa.Column("account_id", sa.String(64), nullable=False),
        sa.Column("lead_id", sa.String(64), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "scores",
        *_lead_columns(),
        sa.Column("score", sa.Integer, nullable=False),
        sa.Column("tier", sa.String(8), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("scorer", sa.String(32), nullable=False),
        sa.Column("model_version", sa.String(64)),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("fallback", sa.Boolean, nullable=False),
        sa.Column("holdout", sa.Boolean, nullable=False),
        sa.Column("features", sa.JSON, nullable=False),
        sa.Column("details", sa.JSON, nullable=False),
        sa.Column("scored_at", sa.DateTime(timezone=True), nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_scores_lead", "scores", ["crm", "account_id", "lead_id", "id"])
    op.create_table(
        "outcomes",
        *_lead_columns(),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("crm", "account_id", "lead_id", "kind", name="uq_outcome_per_lead_kind"),
    )
    op.create_table(
        "feedback",
        *_lead_columns(),
        sa.Column("value", sa.String(16), nullable=False),
        sa.Column("score", sa.Integer),
        sa.Column("tier", sa.String(8)),
        sa.Column("fingerprint", sa.String(64)),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_feedback_lead", "feedback", ["crm", "account_id", "lead_id", "id"])


def downgrade() -> None:
    op.drop_table("feedback")
    op.drop_table("outcomes")
    op.drop_index("ix_scores_lead", "scores")
    op.drop_table("scores")
