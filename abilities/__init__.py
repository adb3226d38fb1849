"""Abilities: every operation, declared once and served as an MCP tool (ARCHITECTURE decision 1)."""
