"""Credentials through the real processes of `make run`: the worker's log and every file the
embedded default writes (SQLite database and its WAL, the broker's messages) hold no value."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import Server, wait_for

pytestmark = pytest.mark.integration

TOKEN = "sk_integration_9f8e7d6c5b4a3210"


class _Echo(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        payload = json.dumps({"headers": dict(self.headers.items()), "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def echo() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_credential_leaves_no_trace_in_logs_or_files(server: Server, alice: httpx.Client, echo: str) -> None:
    r = alice.post("/api/credentials", json={"name": "integration", "kind": "token", "value": TOKEN})
    assert r.status_code in (201, 400), r.text  # 400: created by an earlier run of this session
    r = alice.post(
        "/api/flows",
        json={
            "name": "Credential trace",
            "layers": [
                {
                    "ref": "call",
                    "appId": "curl",
                    "args": {
                        # In the URL too: httpx logs every request line at INFO in the worker.
                        "url": echo + "/x?key={{ $credentials.integration.token }}",
                        "auth": "integration",
                    },
                },
            ],
        },
    )
    assert r.status_code == 201, r.text
    play_id = alice.post(f"/api/flows/{r.json()['id']}/run", json={"args": {}}).json()["playId"]
    assert wait_for(alice, play_id)["state"] == "DONE"
    out = alice.get(f"/api/plays/{play_id}/layers").json()[0]["out"]
    assert out["body"]["headers"]["Authorization"] == "[REDACTED]" and out["body"]["path"] == "/x?key=[REDACTED]"

    log = server.log("server")
    assert "/x?key=[REDACTED]" in log  # the worker logged the request, masked
    assert TOKEN not in log
    var = Path(server.env["FLOWPLAY_VAR_DIR"])
    files = [path for path in var.rglob("*") if path.is_file()]
    if not server.env.get("DATABASE_URL", "").startswith("postgres"):
        # Embedded: the database is a file of the var folder, searched too (on PostgreSQL
        # tests/test_credentials.py searches a pg_dump instead).
        assert any(path.name.startswith("flowplay.sqlite3") for path in files)
    for path in files:
        assert TOKEN.encode() not in path.read_bytes(), path
