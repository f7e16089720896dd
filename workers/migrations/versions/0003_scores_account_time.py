"""scores by account and time: `outcomes sync` asks for each account's first score

Revision ID: 0003_scores_account_time
Revises: 0002_outcome_reached_at
Create Date: 2026-11-22
"""

from alembic import op

revision = "0003_scores_account_time"
down_revision = "0002_outcome_reached_at"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_scores_account_time", "scores", ["crm", "account_id", "scored_at"])


def downgrade() -> None:
    op.drop_index("ix_scores_account_time", table_name="scores")
