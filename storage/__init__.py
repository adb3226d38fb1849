"""Persistence: SQLAlchemy models of the ten tables, sessions, migrations, secrets and settings."""
