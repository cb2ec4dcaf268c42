"""Corral for agents over the Model Context Protocol (docs/mcp.md): `corral mcp`, an MCP server whose tools
create and drive sandboxes through a Corral server's API, for any MCP client."""
