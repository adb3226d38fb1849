"""A bare MCPServer with one echo tool: the baseline the benchmarks compare against.

``python bench/_echo_server.py`` serves it over stdio; ``... http PORT`` over the SDK's streamable HTTP app.
"""

import sys

from mcp.server.mcpserver import MCPServer

server = MCPServer("echo")


@server.tool()
def echo(text: str) -> str:
    """Return the text."""
    return text


if __name__ == "__main__":
    if sys.argv[1:2] == ["http"]:
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run("stdio")
