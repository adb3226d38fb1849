"""Alembic migration scripts (storage.md §14)."""

# The newest revision; tests assert that it is Alembic's head, so startup can check the schema
# without importing Alembic (which costs most of a second).
HEAD_REVISION = "0004_processed_last_seen"
