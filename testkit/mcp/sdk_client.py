"""The official MCP Python SDK's client (PyPI `mcp`) against a Center (center-sim in the tests).

Usage: PN_CENTER_TOKEN=… python sdk_client.py CENTER_URL
Initializes a session over streamable HTTP, lists the tools, calls `list_node_operations` the
runbook's way, closes the session (DELETE). Prints one JSON object on stdout:
{"protocolVersion", "tools": {name: inputSchema}, "queued": [ids], "error": null | text}.
Never prints the token.
"""

import asyncio
import json
import os
import sys

from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client


async def main(url: str) -> dict:
    out = {"protocolVersion": None, "tools": {}, "queued": [], "error": None}
    headers = {"Authorization": f"Bearer {os.environ['PN_CENTER_TOKEN']}"}
    async with create_mcp_http_client(headers=headers) as http:
        async with streamable_http_client(f"{url}/mcp", http_client=http) as streams:
            read, write = streams[0], streams[1]
            async with ClientSession(read, write) as session:
                init = await session.initialize()
                out["protocolVersion"] = init.protocol_version
                tools = await session.list_tools()
                out["tools"] = {t.name: t.input_schema for t in tools.tools}
                res = await session.call_tool("list_node_operations", {"action": "provision", "status": "queued"})
                text = "".join(c.text for c in res.content if getattr(c, "type", "") == "text")
                if res.is_error:
                    out["error"] = text
                else:
                    out["queued"] = [o["id"] for o in json.loads(text)["data"]["items"]]
    return out


if __name__ == "__main__":
    try:
        print(json.dumps(asyncio.run(main(sys.argv[1].rstrip("/")))))
    except Exception as e:  # the test reads the failure from stdout
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        sys.exit(1)
