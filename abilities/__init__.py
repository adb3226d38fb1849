"""Abilities: every operation, declared once and served as an MCP tool (docs/architecture.md, The ability registry)."""
