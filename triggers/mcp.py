"""``/mcp``: flows as tools for AI agents, over MCP's Streamable HTTP transport.

The official ``mcp`` SDK's low-level ``Server`` answers ``tools/list`` and ``tools/call``;
its ``StreamableHTTPSessionManager`` runs stateless with JSON responses, so any web
process of a fleet can take any request (no session to stick to). It is mounted in
``flowplay/asgi.py`` beside Django; Daphne sends no ASGI lifespan events, so the manager
is started on the first request, once per event loop.

Every request needs an API key (``Authorization: Bearer <token>``) with the ``mcp`` scope
(``may_use_mcp``). A tool is a flow of the key's company with a ``tool`` field, enabled
and not deleted. Calling it runs the flow with the arguments as ``$prev.args`` (checked
against the tool's ``inputSchema``), waits up to ``MCP_TOOL_TIMEOUT_SECONDS`` for the play
(``triggers.waiting``: on the event loop, no thread or worker held) and returns the last
step's output, or the play id when the play outlasts the wait. A failed play is a tool
error (``isError``) carrying the play's error code.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import jsonschema
import mcp_types as types
from django.conf import settings
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

from flows.models import Flow
from plays.models import IdempotencyConflict, Play, State, TriggerKind
from tenancy.audit import record
from tenancy.models import ApiKey

from .waiting import db, error_body, last_output, wait_for_end

log = logging.getLogger(__name__)

MCP_PATH = "/mcp"
SCOPE = "mcp"
CALLER = "flowplay.api_key"


def may_use_mcp(key: ApiKey) -> bool:
    """Whether an API key may use the MCP endpoint: its scopes name ``mcp``.

    A key without scopes does not: MCP starts plays on the key owner's behalf from an AI
    agent, which is given a key made for it. (The one place to change when API-key scopes
    are enforced project-wide.)
    """
    return SCOPE in (key.scopes or [])


# --- Tools --------------------------------------------------------------------------------


@db
def _tool_flows(company_id: str) -> list[Flow]:
    return list(
        Flow.objects.alive().for_company(company_id).filter(enabled=True, tool__isnull=False).order_by("name", "id")
    )


def _caller(ctx: Any) -> ApiKey:
    request = getattr(ctx, "request", None)
    key = request.scope.get(CALLER) if request is not None else None
    if key is None:  # mcp_app always sets it; a request without it never got here
        raise PermissionError("no API key")
    return key


async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
    key = _caller(ctx)
    tools = []
    for flow in await _tool_flows(key.user.company_id):
        tool = flow.tool or {}
        if not tool.get("name"):
            continue
        tools.append(
            types.Tool(
                name=tool["name"],
                description=tool.get("description") or flow.name,
                input_schema=tool.get("inputSchema") or {"type": "object", "properties": {}},
            )
        )
    return types.ListToolsResult(tools=tools)


def _error(code: str, message: str, play_id: str | None = None) -> types.CallToolResult:
    data: dict[str, Any] = {"error": code, "message": message}
    if play_id:
        data["playId"] = play_id
    return types.CallToolResult(
        content=[types.TextContent(text=json.dumps(data))], structured_content=data, is_error=True
    )


@db
def _start(key: ApiKey, name: str, arguments: dict[str, Any]) -> tuple[Play | None, types.CallToolResult | None]:
    flow = next((f for f in Flow.objects.alive().for_company(key.user.company_id).filter(tool__name=name)), None)
    if flow is None or not flow.tool:
        return None, _error("TOOL_NOT_FOUND", f"No tool {name!r}")
    if not flow.enabled:
        return None, _error("FLOW_DISABLED", f"Flow {flow.permanent_id} is disabled")
    schema = flow.tool.get("inputSchema") or {"type": "object"}
    problems = sorted(jsonschema.Draft202012Validator(schema).iter_errors(arguments), key=lambda e: list(e.path))
    if problems:
        where = "/".join(str(p) for p in problems[0].path) or "arguments"
        return None, _error("VALIDATION_ERROR", f"{where}: {problems[0].message}")
    try:
        play, _ = Play.trigger(
            flow,
            arguments,
            user=key.user,
            source={"kind": TriggerKind.MCP, "tool": name},
            on_created=lambda play: record(key.user, "play.triggered", play, flowId=flow.id, via="mcp", tool=name),
        )
    except IdempotencyConflict:  # no key is passed; kept for completeness
        return None, _error("IDEMPOTENCY_KEY_REUSED", "Idempotency key reused")
    return play, None


@db
def _outcome(play_id: str) -> tuple[Play, Any]:
    play = Play.objects.get(pk=play_id)
    return play, last_output(play) if play.state == State.DONE else None


async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
    key = _caller(ctx)
    arguments = params.arguments or {}
    play, refused = await _start(key, params.name, arguments)
    if refused is not None:
        return refused
    assert play is not None
    state = await wait_for_end(play, float(settings.FLOWPLAY["MCP_TOOL_TIMEOUT_SECONDS"]))
    play, out = await _outcome(play.pk)
    if state == State.DONE:
        structured = out if isinstance(out, dict) else {"result": out}
        return types.CallToolResult(content=[types.TextContent(text=json.dumps(out))], structured_content=structured)
    if state == State.FAIL:
        error = play.error or {}
        return _error(error.get("code", "PLAY_FAILED"), error.get("message", "The play failed"), play.pk)
    data = {"playId": play.pk, "state": play.state}
    if play.state not in (State.SKIP, State.FILTERED):
        data["status"] = "running"
    return types.CallToolResult(content=[types.TextContent(text=json.dumps(data))], structured_content=data)


server = Server(
    "flowplay",
    version="1.0",
    instructions="Each tool runs a flowplay flow and returns its last step's output.",
    on_list_tools=list_tools,
    on_call_tool=call_tool,
)


# --- The ASGI app -------------------------------------------------------------------------


class _Running:
    """The session manager of one event loop, started on the first request."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.manager: StreamableHTTPSessionManager | None = None
        self.ready: asyncio.Event | None = None
        self.task: asyncio.Task | None = None

    async def get(self) -> StreamableHTTPSessionManager:
        loop = asyncio.get_running_loop()
        if self.loop is not loop or self.task is None or self.task.done():
            self.loop, self.ready = loop, asyncio.Event()
            self.manager = StreamableHTTPSessionManager(app=server, stateless=True, json_response=True)
            self.task = loop.create_task(self._run(self.manager, self.ready))
        assert self.ready is not None and self.manager is not None
        await self.ready.wait()
        return self.manager

    @staticmethod
    async def _run(manager: StreamableHTTPSessionManager, ready: asyncio.Event) -> None:
        async with manager.run():
            ready.set()
            await asyncio.Event().wait()


running = _Running()


@db
def _lookup(token: str) -> ApiKey | None:
    return ApiKey.lookup(token)


async def _refuse(send: Any, status: int, code: str, message: str) -> None:
    payload = json.dumps(error_body(code, message, status)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def mcp_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """ASGI: authenticate the API key, then hand the request to the SDK's transport."""
    authorization = dict(scope.get("headers", [])).get(b"authorization", b"").decode("latin-1")
    scheme, _, token = authorization.partition(" ")
    key = await _lookup(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
    if key is None:
        await _refuse(send, 401, "UNAUTHORIZED", "An API key is needed: Authorization: Bearer <token>")
        return
    if not may_use_mcp(key):
        await _refuse(send, 403, "FORBIDDEN", "This API key has no mcp scope")
        return
    manager = await running.get()
    await manager.handle_request({**scope, CALLER: key}, receive, send)
