"""A small mixed workload against a running flowplay, for the dashboard screenshot.

    python docs/observability/demo.py http://127.0.0.1:8000 alice@acme.test 'password' 240

Runs for the given seconds: plays that succeed, fail, sleep and wait for approval, a
deferred play, one flow on a queue no worker consumes, and a WebSocket client listening,
so that every panel of the dashboard has something to show.
"""

from __future__ import annotations

import asyncio
import random
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

import httpx
import websockets


def main(url: str, email: str, password: str, seconds: float) -> None:
    client = httpx.Client(base_url=url, timeout=30)
    r = client.post("/api/auth/login", json={"email": email, "password": password})
    r.raise_for_status()
    client.headers["X-CSRFToken"] = client.cookies["csrftoken"]
    key = client.post("/api/auth/api-keys", json={"name": "demo"}).json()["token"]

    def flow(name: str, layers: list, **fields: object) -> str:
        r = client.post("/api/flows", json={"name": name, "layers": layers, **fields})
        r.raise_for_status()
        return r.json()["id"]

    tag = random.randint(1000, 9999)
    orders = flow(
        "Orders",
        [
            {"ref": "a", "appId": "var", "args": {"values": {"n": "{{ $prev.args.n }}"}}},
            {"ref": "b", "appId": "template", "args": {"template": "order {{ n }}", "data": {"n": "{{ $prev.a.n }}"}}},
        ],
        permanentId=f"orders-{tag}",
    )
    imports = flow(
        "Imports",
        [
            {"ref": "parse", "appId": "json-parse", "args": {"input": "{{ $prev.args.doc }}"}},
        ],
        permanentId=f"imports-{tag}",
    )
    naps = flow(
        "Naps",
        [
            {"ref": "nap", "appId": "sleep", "args": {"ms": "{{ $prev.args.ms }}"}},
        ],
        permanentId=f"naps-{tag}",
    )
    review = flow(
        "Review",
        [
            {"ref": "ok", "appId": "var", "args": {"values": {}}, "needsApproval": True},
        ],
        permanentId=f"review-{tag}",
    )
    reports = flow(
        "Reports",
        [{"ref": "a", "appId": "var", "args": {"values": {}}}],
        permanentId=f"reports-{tag}",
        execution={"queue": "reports"},
    )

    stop = threading.Event()

    def listen() -> None:
        async def run() -> None:
            ws_url = url.replace("http", "ws", 1) + f"/api/ws?token={key}"
            async with websockets.connect(ws_url) as ws:
                while not stop.is_set():
                    try:
                        await asyncio.wait_for(ws.recv(), 1)
                    except TimeoutError:
                        pass

        asyncio.run(run())

    listeners = [threading.Thread(target=listen, daemon=True) for _ in range(3)]
    for listener in listeners:
        listener.start()

    ends = time.monotonic() + seconds
    n = 0
    while time.monotonic() < ends:
        n += 1
        client.post(f"/api/flows/{orders}/run", json={"args": {"n": n}})
        if n % 3 == 0:
            client.post(f"/api/flows/{imports}/run", json={"args": {"doc": '{"ok": 1}' if n % 2 else "{broken"}})
        if n % 5 == 0:
            client.post(f"/api/flows/{naps}/run", json={"args": {"ms": random.randint(200, 3000)}})
        if n % 20 == 0:
            client.post(f"/api/flows/{review}/run", json={})
            run_at = (datetime.now(UTC) + timedelta(minutes=30)).isoformat()
            client.post(f"/api/flows/{orders}/run", json={"args": {"n": -n}, "runAt": run_at})
        if n % 40 == 0:
            client.post(f"/api/flows/{reports}/run", json={})
        time.sleep(0.5 + random.random() * 0.5)
    stop.set()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
