"""MCP resources (``datamachine://…``): each mirrors a read-only tool twin (ARCHITECTURE decision 8)."""
