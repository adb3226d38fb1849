"""Alembic environment: runs on the connection that storage.migrate hands over (already locked)."""

from alembic import context

from datamachine_mcp.storage.models import Base
from datamachine_mcp.storage.types import PK, UTCDateTime

config = context.config


def render_item(type_, obj, autogen_context):
    # Render our runtime-only TypeDecorators as plain SQLAlchemy types so the scripts stay stable.
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    if type_ == "type" and obj is PK:
        return "sa.BigInteger().with_variant(sa.Integer(), 'sqlite')"
    return False


def run_migrations_online() -> None:
    connection = config.attributes["connection"]
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        render_item=render_item,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations_online()
