"""MCP wiring, transports and the command line."""
