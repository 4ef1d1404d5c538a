"""MCP: flows as tools. The ``tool`` field of a flow, the API-key scope rule, and the MCP
endpoint driven by the SDK's own client over the ASGI app (in the test's thread and
transaction; tests/integration/test_triggers_live.py does the same against a live server).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx2
import pytest
from asgiref.sync import async_to_sync, sync_to_async
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from rest_framework.test import APIClient

from plays.models import Play
from tenancy.models import ApiKey, User
from triggers import mcp as mcp_module
from triggers import waiting
from triggers.mcp import may_use_mcp, mcp_app

from .factories import make_flow

SCHEMA = {"type": "object", "properties": {"orderId": {"type": "string"}}, "required": ["orderId"]}


def tool_flow(
    api: APIClient, name: str = "lookup_order", layers: list[dict[str, Any]] | None = None, **fields: Any
) -> dict[str, Any]:
    layers = layers or [{"ref": "answer", "appId": "var", "args": {"values": {"order": "{{ $prev.args.orderId }}"}}}]
    return make_flow(
        api,
        layers,
        name=fields.pop("name", name),
        tool={"name": name, "description": "Look an order up", "inputSchema": SCHEMA},
        **fields,
    )


# --- The tool field -----------------------------------------------------------------------


def test_a_flow_carries_its_tool_and_null_removes_it(api: APIClient) -> None:
    flow = tool_flow(api)
    assert flow["tool"] == {"name": "lookup_order", "description": "Look an order up", "inputSchema": SCHEMA}
    r = api.patch(f"/api/flows/{flow['id']}", {"tool": None}, format="json")
    assert r.status_code == 200 and r.json()["tool"] is None


@pytest.mark.parametrize(
    "tool, field",
    [
        ({"name": "has space"}, "tool.name"),
        ({"name": "ok", "inputSchema": {"type": "array"}}, "tool.inputSchema"),
        ({"name": "ok", "inputSchema": {"type": "object", "properties": {"a": {"type": "nope"}}}}, "tool.inputSchema"),
        ({"description": "no name"}, "tool.name"),
    ],
)
def test_a_bad_tool_is_400_at_save(api: APIClient, tool: dict[str, Any], field: str) -> None:
    r = api.post("/api/flows", {"name": "x", "layers": [], "tool": tool}, format="json")
    assert r.status_code == 400 and field in r.json()["details"], r.content


def test_a_tool_name_is_unique_in_a_company(api: APIClient, charlie_api: APIClient) -> None:
    tool_flow(api)
    r = api.post("/api/flows", {"name": "y", "layers": [], "tool": {"name": "lookup_order"}}, format="json")
    assert r.status_code == 400 and "tool.name" in r.json()["details"]
    tool_flow(charlie_api)  # another company may use the name


def test_only_keys_with_the_mcp_scope_may_use_mcp(alice: User) -> None:
    assert may_use_mcp(ApiKey.issue(alice, "agent", ["mcp"])[0])
    assert not may_use_mcp(ApiKey.issue(alice, "ci")[0])
    assert not may_use_mcp(ApiKey.issue(alice, "ci", ["read"])[0])


# --- The endpoint, in process -------------------------------------------------------------


@pytest.fixture
def mcp_call(monkeypatch: Any, drain: Any) -> Any:
    """Run ``body(client)`` with an SDK client connected to /mcp with ``token``."""
    from tests.test_channels import NoHub

    monkeypatch.setattr(waiting, "THREAD_SENSITIVE", True)
    monkeypatch.setattr(waiting, "hub", NoHub())
    monkeypatch.setattr(waiting, "FIRST_POLL_SECONDS", 0.01)
    monkeypatch.setattr(mcp_module, "running", mcp_module._Running())

    def call(token: str, body: Any) -> Any:
        async def go() -> Any:
            async def worker() -> None:
                while True:
                    await sync_to_async(drain)()
                    await asyncio.sleep(0.01)

            task = asyncio.create_task(worker())
            try:
                http = httpx2.AsyncClient(
                    transport=httpx2.ASGITransport(app=mcp_app),
                    base_url="http://testserver",
                    headers={"Authorization": f"Bearer {token}"},
                )
                async with Client(streamable_http_client("http://testserver/mcp", http_client=http)) as client:
                    return await body(client)
            finally:
                task.cancel()
                mcp_module.running.task.cancel() if mcp_module.running.task else None

        return async_to_sync(go)()

    return call


def test_tools_are_listed_and_called(api: APIClient, alice: User, charlie_api: APIClient, mcp_call: Any) -> None:
    tool_flow(api)
    tool_flow(charlie_api, name="not_alices")
    make_flow(api, [], name="not a tool")
    _, token = ApiKey.issue(alice, "agent", ["mcp"])

    async def body(client: Client) -> Any:
        tools = await client.list_tools()
        called = await client.call_tool("lookup_order", {"orderId": "A-1"})
        bad = await client.call_tool("lookup_order", {"orderId": 5})
        return tools, called, bad

    tools, called, bad = mcp_call(token, body)
    assert [(t.name, t.input_schema) for t in tools.tools] == [("lookup_order", SCHEMA)]
    assert not called.is_error and called.structured_content == {"order": "A-1"}
    assert bad.is_error and bad.structured_content["error"] == "VALIDATION_ERROR"
    play = Play.objects.get()
    assert play.trigger_source == {"kind": "mcp", "tool": "lookup_order"} and play.triggered_by == alice


def test_a_failing_flow_is_a_tool_error_with_the_plays_code(api: APIClient, alice: User, mcp_call: Any) -> None:
    tool_flow(api, layers=[{"ref": "boom", "appId": "json-parse", "args": {"input": "{{ $prev.args.orderId }}"}}])
    _, token = ApiKey.issue(alice, "agent", ["mcp"])
    result = mcp_call(token, lambda client: client.call_tool("lookup_order", {"orderId": "{nope"}))
    assert result.is_error and result.structured_content["error"] == "STEP_FAILED"
    assert result.structured_content["playId"] == Play.objects.get().pk


def test_a_play_that_outlasts_the_call_returns_its_id(
    api: APIClient, alice: User, mcp_call: Any, settings: Any
) -> None:
    settings.FLOWPLAY = {**settings.FLOWPLAY, "MCP_TOOL_TIMEOUT_SECONDS": 0.3}
    tool_flow(api, layers=[{"ref": "nap", "appId": "sleep", "args": {"ms": 60_000}}])
    _, token = ApiKey.issue(alice, "agent", ["mcp"])
    result = mcp_call(token, lambda client: client.call_tool("lookup_order", {"orderId": "1"}))
    assert not result.is_error and result.structured_content == {
        "playId": Play.objects.get().pk,
        "state": "DEFERRED",
        "status": "running",
    }


def test_a_key_without_the_scope_or_no_key_is_refused(alice: User, monkeypatch: Any) -> None:
    monkeypatch.setattr(waiting, "THREAD_SENSITIVE", True)
    _, plain = ApiKey.issue(alice, "ci")

    async def post(headers: dict[str, str]) -> httpx2.Response:
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=mcp_app), base_url="http://t") as http:
            return await http.post("/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, headers=headers)

    nobody = async_to_sync(post)({})
    assert nobody.status_code == 401 and nobody.json()["error"] == "UNAUTHORIZED"
    assert nobody.headers["www-authenticate"] == "Bearer"
    scoped_out = async_to_sync(post)({"Authorization": f"Bearer {plain}"})
    assert scoped_out.status_code == 403 and scoped_out.json()["error"] == "FORBIDDEN"
    assert async_to_sync(post)({"Authorization": "Bearer fp_00000000_nope"}).status_code == 401
