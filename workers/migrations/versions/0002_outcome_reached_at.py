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


def upgrade() -> None:
    with op.batch_alter_table("outcomes") as batch:
        batch.add_column(sa.Column("reached_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE outcomes SET reached_at = recorded_at")  # the best that earlier rows know
    with op.batch_alter_table("outcomes") as batch:
        batch.alter_column("reached_at", existing_type=sa.DateTime(timezone=True), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("outcomes") as batch:
        batch.drop_column("reached_at")
