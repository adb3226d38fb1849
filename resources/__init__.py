"""MCP resources (``datamachine://…``): each mirrors a read-only tool twin (docs/architecture.md, Resources)."""
