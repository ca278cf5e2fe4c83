"""A stand-in Center built on the official MCP Python SDK (PyPI `mcp`), for the interop test.

It serves the runbook's tools over streamable HTTP with canned answers, and fails some the SDK
way (a tool that raises `ToolError`: `isError: true` with "Error executing tool <name>: <message>"
as plain text; any other exception: the same without the message). It is stricter than
the SDK about one thing: every request inside a session must carry `MCP-Protocol-Version`
(the 2025-06-18 transport spec requires the client to send it); one without is answered 400.

Usage: python sdk_center.py PORT   (prints "listening" once it accepts connections)
"""

import json
import sys

import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

PORT = int(sys.argv[1])
OPS = [
    {"id": f"op-{i}", "action": "provision", "status": "queued", "subId": f"sub-{i}",
     "params": {"region": "sg", "trafficTotalBytes": 1 << 30, "ipType": "residential"}}
    for i in range(1, 4)
]

srv = MCPServer("sdk-center")


@srv.tool()
def list_node_operations(action: str = "", status: str = "", id: str = "", page: int = 1, pageSize: int = 100) -> str:
    items = [o for o in OPS if (not status or o["status"] == status) and (not id or o["id"] == id)]
    start = (page - 1) * pageSize
    return json.dumps({"data": {"items": items[start:start + pageSize], "page": page, "pageSize": pageSize, "total": len(items)}})


@srv.tool()
def update_node_operation(id: str, holder: str, status: str, result: dict | None = None, error: str | None = None) -> str:
    if status == "in_progress":
        raise ToolError(f"409 conflict: lease of {id} is held by another holder")
    raise ToolError(f"invalid status: {status}")


@srv.tool()
def list_nodes(name: str = "", page: int = 1, pageSize: int = 100) -> str:
    raise ToolError("503 service temporarily unavailable")


@srv.tool()
def get_cloud_instance(id: str) -> str:
    # An unexpected exception: the SDK hides its text ("Error executing tool get_cloud_instance").
    raise RuntimeError("the database caught fire")


class RequireVersionHeader:
    """400 for an in-session request without MCP-Protocol-Version."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            names = {k.lower() for k, _ in scope["headers"]}
            if b"mcp-session-id" in names and b"mcp-protocol-version" not in names:
                body = b'{"error": "MCP-Protocol-Version header required"}'
                await send({"type": "http.response.start", "status": 400,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


app = RequireVersionHeader(srv.streamable_http_app())
print("listening", flush=True)
uvicorn.run(app, host="127.0.0.1", port=PORT, log_level="warning")
