"""Retention of processed items walks each flow step's last_seen_at: one index on (flow_step_id,
source_type, last_seen_at) replaces the one on last_seen_at alone.

Revision ID: 0006_processed_step_seen
Revises: 0005_wait_kind_unlisted
"""

from alembic import op

revision = "0006_processed_step_seen"
down_revision = "0005_wait_kind_unlisted"
branch_labels = None
depends_on = None

TABLE = "datamachine_processed_items"


def upgrade() -> None:
    op.drop_index("ix_processed_last_seen", table_name=TABLE)
    op.create_index("ix_processed_step_seen", TABLE, ["flow_step_id", "source_type", "last_seen_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_processed_step_seen", table_name=TABLE)
    op.create_index("ix_processed_last_seen", TABLE, ["last_seen_at"], unique=False)
