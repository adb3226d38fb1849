"""processed_items.last_seen_at: when a fetch last saw the item in its source; retention expires by it.

Every existing row starts "seen now": when an item was last offered is unknown, and forgetting a
still-listed item would publish it again, so each row gets a full retention window after the upgrade.
The index on (status, processed_timestamp), kept for retention, is replaced by one on last_seen_at.

Revision ID: 0004_processed_last_seen
Revises: 0003_pg_change_notify
"""

import sqlalchemy as sa
from alembic import op

from datamachine_mcp.storage.timeutil import utcnow
from datamachine_mcp.storage.types import UTCDateTime

revision = "0004_processed_last_seen"
down_revision = "0003_pg_change_notify"
branch_labels = None
depends_on = None

TABLE = "datamachine_processed_items"


def upgrade() -> None:
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True))
    op.execute(
        sa.text(f"UPDATE {TABLE} SET last_seen_at = :now").bindparams(
            sa.bindparam("now", utcnow(), type_=UTCDateTime())
        )
    )
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.alter_column("last_seen_at", existing_type=sa.DateTime(timezone=True), nullable=False)
        batch_op.drop_index("ix_processed_timestamp")
        batch_op.create_index("ix_processed_last_seen", ["last_seen_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.drop_index("ix_processed_last_seen")
        batch_op.create_index("ix_processed_timestamp", ["status", "processed_timestamp"], unique=False)
        batch_op.drop_column("last_seen_at")
