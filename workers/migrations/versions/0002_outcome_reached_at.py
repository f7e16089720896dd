"""outcomes.reached_at: when the lead reached the outcome, apart from when leadscore recorded it

Revision ID: 0002_outcome_reached_at
Revises: 0001_store
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_outcome_reached_at"
down_revision = "0001_store"
branch_labels = None
depends_on = None

# Workers before this revision kept a batch's scores, then its outcomes: a HubSpot lifecycle stage
# seen by webhook was scored, at or before the outcome was recorded, in the very batch that saw it.
# That score already shows it, so the outcome is dated at it (`train --from-store` learns from the
# score before). Not so a converted Salesforce Lead (read-only, never scored again) or a HubSpot deal's
# `won` (its contacts are not rescored): their last score came before, so like every other row they
# keep the time they were recorded; `outcomes sync` moves HubSpot's to the CRM's date.
SCORE_THAT_SAW_IT = """
    SELECT MAX(s.scored_at) FROM scores s
    WHERE s.crm = outcomes.crm AND s.account_id = outcomes.account_id AND s.lead_id = outcomes.lead_id
      AND s.scored_at <= outcomes.recorded_at
"""


def upgrade() -> None:
    with op.batch_alter_table("outcomes") as batch:
        batch.add_column(sa.Column("reached_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE outcomes SET reached_at = recorded_at")
    op.execute(
        f"UPDATE outcomes SET reached_at = COALESCE(({SCORE_THAT_SAW_IT}), reached_at) "
        "WHERE source = 'webhook' AND crm = 'hubspot' AND kind <> 'won'"
    )
    with op.batch_alter_table("outcomes") as batch:
        batch.alter_column(
            "reached_at",
            existing_type=sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.now(),
        )


def downgrade() -> None:
    with op.batch_alter_table("outcomes") as batch:
        batch.drop_column("reached_at")
