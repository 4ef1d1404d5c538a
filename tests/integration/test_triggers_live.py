"""HTTP channels and MCP against a live server started like `make run` (embedded default),
with ONE worker process (WORKER_CONCURRENCY=1): sync requests and tool calls wait on the
web process's event loop, so they hold neither the worker nor a thread of their own.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.factories import make_flow
from tests.integration.conftest import PASSWORD, ROOT, free_port, stop

pytestmark = pytest.mark.integration


@dataclass
class Live:
    url: str
    port: int
    api: httpx.Client
    token: str  # an API key with the mcp scope
    plain_token: str  # one without
    log: Path

    def web_threads(self) -> int:
        """Threads of the web processes: the Procfile's ``flowplay.serve`` runs WEB_CONCURRENCY
        daphne processes (``flowplay.web --fd``) on this port's socket; their threads added up."""
        parents: dict[int, int] = {}
        serve = None
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                parents[int(pid)] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if b"flowplay.serve" in cmdline[:3] and str(self.port).encode() in cmdline:
                serve = int(pid)
        if serve is None:
            raise AssertionError("no flowplay.serve process found")
        threads = 0
        for pid, parent in parents.items():
            if parent == serve:
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                threads += int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))
        if not threads:
            raise AssertionError("no daphne process found")
        return threads


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    var = tmp_path_factory.mktemp("triggers")
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTEST", "DJANGO_SETTINGS"))
        and k not in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL")
    }
    env.update(
        FLOWPLAY_VAR_DIR=str(var),
        PORT=str(port),
        PYTHONUNBUFFERED="1",
        WORKER_CONCURRENCY="1",
        FLOWPLAY_MCP_TOOL_TIMEOUT_SECONDS="3",
        LOGIN_THROTTLE_RATE="1000/min",
    )
    log = var / "server.log"
    proc = subprocess.Popen(
        ["make", "run", f"PORT={port}"],
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"make run exited:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        email = f"ada-{secrets.token_hex(3)}@example.com"
        out = subprocess.run(
            [str(ROOT / ".venv/bin/python"), "manage.py", "createsuperuser", "--noinput"],
            cwd=ROOT,
            env={
                **env,
                "DJANGO_SUPERUSER_EMAIL": email,
                "DJANGO_SUPERUSER_USERNAME": email.split("@")[0],
                "DJANGO_SUPERUSER_PASSWORD": PASSWORD,
            },
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        api = httpx.Client(base_url=url, timeout=60)
        assert api.post("/api/auth/login", json={"email": email, "password": PASSWORD}).status_code == 200
        api.headers["X-CSRFToken"] = api.cookies["csrftoken"]
        token = api.post("/api/auth/api-keys", json={"name": "agent", "scopes": ["mcp"]}).json()["token"]
        plain = api.post("/api/auth/api-keys", json={"name": "ci"}).json()["token"]
        yield Live(url=url, port=port, api=api, token=token, plain_token=plain, log=log)
        api.close()
    finally:
        stop(proc)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def channel_with_route(live: Live, slug: str, route: dict[str, Any], **channel: Any) -> dict[str, Any]:
    r = live.api.post("/api/channels", json={"name": slug, "slug": slug, **channel})
    assert r.status_code == 201, r.text
    made = r.json()
    r = live.api.post(f"/api/channels/{made['id']}/routes", json=route)
    assert r.status_code == 201, r.text
    return made


def wait_state(live: Live, play_id: str, states: tuple[str, ...] = ("DONE", "FAIL"), timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        state = live.api.get(f"/api/plays/{play_id}").json()["state"]
        if state in states:
            return state
        assert time.monotonic() < deadline, f"play {play_id} still {state}"
        time.sleep(0.1)


# --- Channels -----------------------------------------------------------------------------


def test_a_github_signed_webhook_is_answered_with_the_flows_output(live: Live) -> None:
    made = make_flow(
        live.api,
        [
            {
                "ref": "reply",
                "appId": "var",
                "args": {
                    "values": {
                        "statusCode": 202,
                        "headers": {"X-Repo": "{{ $prev.args.body.repository }}"},
                        "body": {"ok": True, "delivery": '{{ $prev.args.headers["x-github-delivery"] }}'},
                    }
                },
            }
        ],
        name="GitHub push",
    )
    channel = channel_with_route(
        live,
        "github",
        {
            "method": "POST",
            "path": "/push",
            "flowIds": [made["id"]],
            "responseMode": "sync",
            "idempotencyKey": '{{ $prev.args.headers["x-github-delivery"] }}',
        },
        authMode="hmac",
        hmacFormat="github",
    )
    body = json.dumps({"repository": "acme/shop"}).encode()
    signature = hmac.new(channel["secret"].encode(), body, hashlib.sha256).hexdigest()
    headers = {
        "Content-Type": "application/json",
        "X-GitHub-Delivery": "d-1",
        "X-Hub-Signature-256": f"sha256={signature}",
    }
    r = httpx.post(f"{live.url}/hooks/github/push", content=body, headers=headers, timeout=30)
    assert r.status_code == 202 and r.headers["x-repo"] == "acme/shop", r.text
    assert r.json() == {"ok": True, "delivery": "d-1"}
    assert (
        httpx.post(
            f"{live.url}/hooks/github/push", content=body, headers={**headers, "X-Hub-Signature-256": "sha256=00"}
        ).status_code
        == 401
    )
    log = live.api.get(f"/api/channels/{channel['id']}/requests").json()["data"]
    assert [e["status"] for e in log] == [401, 202] and log[1]["playId"] == r.headers["x-flowplay-play-id"]


def test_sync_waits_hold_neither_the_worker_nor_a_thread(live: Live) -> None:
    slow = make_flow(
        live.api,
        [
            {"ref": "nap", "appId": "sleep", "args": {"ms": 3000}},
            {"ref": "done", "appId": "var", "args": {"values": {"n": "{{ $prev.args.body.n }}"}}},
        ],
        name="Slow",
    )
    quick = make_flow(live.api, [{"ref": "one", "appId": "var", "args": {"values": {"x": 1}}}], name="Quick")
    channel_with_route(
        live, "slow", {"path": "/run", "flowIds": [slow["id"]], "responseMode": "sync", "timeoutMs": 60_000}
    )
    before = live.web_threads()
    waiting = 30

    def call(n: int) -> tuple[int, Any, float]:
        started = time.monotonic()
        r = httpx.post(f"{live.url}/hooks/slow/run", json={"n": n}, timeout=90)
        return r.status_code, r.json(), time.monotonic() - started

    with ThreadPoolExecutor(waiting) as pool:
        futures = [pool.submit(call, n) for n in range(waiting)]
        deadline = time.monotonic() + 60
        while live.api.get("/api/plays", params={"trigger": "channel", "flowId": slow["id"]}).json()["total"] < waiting:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        during = live.web_threads()
        # Meanwhile the one worker serves other plays.
        started = time.monotonic()
        quick_ids = [
            live.api.post(f"/api/flows/{quick['id']}/run", json={"args": {}}).json()["playId"] for _ in range(5)
        ]
        for play_id in quick_ids:
            assert wait_state(live, play_id) == "DONE"
        quick_seconds = time.monotonic() - started
        still_waiting = sum(not f.done() for f in futures)
        results = [f.result() for f in futures]
    assert all(status == 200 for status, _, _ in results), results
    assert sorted(body["n"] for _, body, _ in results) == list(range(waiting))
    print(
        f"\nweb threads: {before} before, {during} with {waiting} sync requests waiting; "
        f"5 other plays done in {quick_seconds:.2f} s while {still_waiting} requests still waited; "
        f"sync latency {min(r[2] for r in results):.2f}-{max(r[2] for r in results):.2f} s"
    )
    assert still_waiting > 0, "the sync requests ended before the other plays: the test proves nothing"
    assert during - before < waiting // 2, f"threads grew from {before} to {during}"


def test_sync_past_the_timeout_answers_202_and_the_play_goes_on(live: Live) -> None:
    slow = make_flow(live.api, [{"ref": "nap", "appId": "sleep", "args": {"ms": 2500}}], name="Slower")
    channel_with_route(
        live, "slower", {"path": "/run", "flowIds": [slow["id"]], "responseMode": "sync", "timeoutMs": 500}
    )
    r = httpx.post(f"{live.url}/hooks/slower/run", timeout=30)
    assert r.status_code == 202 and r.json()["status"] == "running", r.text
    assert wait_state(live, r.json()["playId"]) == "DONE"


# --- MCP ----------------------------------------------------------------------------------


def mcp(live: Live, token: str, body: Any) -> Any:
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    async def go() -> Any:
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=60)
        async with Client(streamable_http_client(f"{live.url}/mcp", http_client=http)) as client:
            return await body(client)

    return asyncio.run(go())


SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def test_mcp_lists_and_calls_tools(live: Live) -> None:
    make_flow(
        live.api,
        [
            {
                "ref": "report",
                "appId": "template",
                "args": {"template": "Sunny in {{ city }}", "data": {"city": "{{ $prev.args.city }}"}},
            }
        ],
        tool={"name": "weather", "description": "Today's weather", "inputSchema": SCHEMA},
        name="Weather",
    )
    make_flow(
        live.api,
        [{"ref": "parse", "appId": "json-parse", "args": {"input": "{{ $prev.args.city }}"}}],
        tool={"name": "broken", "inputSchema": SCHEMA},
        name="Broken",
    )
    make_flow(
        live.api,
        [{"ref": "nap", "appId": "sleep", "args": {"ms": 8000}}],
        tool={"name": "long", "inputSchema": SCHEMA},
        name="Long",
    )

    async def body(client: Any) -> Any:
        tools = await client.list_tools()
        ok = await client.call_tool("weather", {"city": "Oslo"})
        failed = await client.call_tool("broken", {"city": "{not json"})
        long = await client.call_tool("long", {"city": "x"})
        return tools, ok, failed, long

    tools, ok, failed, long = mcp(live, live.token, body)
    assert {t.name for t in tools.tools} >= {"weather", "broken", "long"}
    assert not ok.is_error and ok.structured_content == {"result": "Sunny in Oslo"}
    assert failed.is_error and failed.structured_content["error"] == "STEP_FAILED"
    assert not long.is_error and long.structured_content["status"] == "running"
    play = live.api.get(f"/api/plays/{long.structured_content['playId']}").json()
    assert play["trigger"] == {"kind": "mcp", "tool": "long"}


def test_mcp_refuses_a_key_without_the_scope_and_no_key(live: Live) -> None:
    for token in (live.plain_token, "fp_00000000_not-a-key"):
        with pytest.raises(Exception):  # noqa: B017 - the SDK wraps the HTTP error in an ExceptionGroup
            mcp(live, token, lambda client: client.list_tools())
    r = httpx.post(
        f"{live.url}/mcp",
        json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        headers={"Authorization": f"Bearer {live.plain_token}"},
    )
    assert r.status_code == 403 and r.json()["error"] == "FORBIDDEN"
    assert httpx.post(f"{live.url}/mcp", json={}).status_code == 401
