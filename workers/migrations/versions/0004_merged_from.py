"""merged_from: the lead a score or feedback was kept of before the CRM merged it into another

Revision ID: 0004_merged_from
Revises: 0003_scores_account_time
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_merged_from"
down_revision = "0003_scores_account_time"
branch_labels = None
depends_on = None

TABLES = ("scores", "feedback")


def upgrade() -> None:
    for table in TABLES:
        op.add_column(table, sa.Column("merged_from", sa.String(64), nullable=True))


def downgrade() -> None:
    for table in TABLES:
        # Rebuilt from reflection, a SQLite table would lose AUTOINCREMENT, which first-score reads rely on.
        with op.batch_alter_table(table, table_kwargs={"sqlite_autoincrement": table == "scores"}) as batch:
            batch.drop_column("merged_from")
