"""Alembic migration scripts (docs/storage.md, Migrations)."""

# The newest revision; tests assert that it is Alembic's head, so startup can check the schema
# without importing Alembic (which costs most of a second).
HEAD_REVISION = "0006_processed_step_seen"
