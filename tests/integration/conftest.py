"""Real processes: the server started the README way (`make run`), driven over HTTP.

One server per test session. It uses the database and broker the environment names
(SQLite + filesystem broker in a temporary folder by default; PostgreSQL + Redis in CI's
second run), never the unit tests' database.
"""

from __future__ import annotations

import http.server
import json
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from bench.harness import ROOT, Processes, child_env, free_port

PASSWORD = "integration-pass-123"
__all__ = ["ROOT", "free_port"]


@dataclass
class Server(Processes):
    """``make run`` (honcho: web, worker, beat) as one process named ``server`` (its log: ``log("server")``)."""

    port: int = 0
    users: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, email: str) -> httpx.Client:
        """A logged-in cookie client that sends the CSRF header like a browser app would."""
        client = httpx.Client(base_url=self.url, timeout=30)
        r = client.post("/api/auth/login", json={"email": email, "password": PASSWORD})
        assert r.status_code == 200, r.text
        client.headers["X-CSRFToken"] = client.cookies["csrftoken"]
        return client


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    var = tmp_path_factory.mktemp("var")
    port = free_port(4454)
    # PROMETHEUS_MULTIPROC_DIR: the server counts in its own var folder, not the test run's.
    env = child_env(FLOWPLAY_VAR_DIR=str(var), PORT=str(port), PYTHONUNBUFFERED="1")
    # Short leases so that the crash tests see a dead worker's play reaped quickly.
    env.setdefault("FLOWPLAY_LEASE_SECONDS", "6")
    env.setdefault("FLOWPLAY_HEARTBEAT_SECONDS", "2")
    srv = Server(root=var, env=env, port=port)
    try:
        srv.spawn("server", ["make", "run", f"PORT={port}"])
        srv.wait_healthy(srv.url, "server", timeout=180)
        tag = secrets.token_hex(3)
        for name in ("alice", "bob"):
            email = f"{name}-{tag}@acme.test"
            srv.manage("createsuperuser", "--noinput", env={
                "DJANGO_SUPERUSER_EMAIL": email, "DJANGO_SUPERUSER_USERNAME": f"{name}-{tag}",
                "DJANGO_SUPERUSER_PASSWORD": PASSWORD})
            srv.users[name] = (email, PASSWORD)
        yield srv
    finally:
        srv.stop_all(grace=15)


@pytest.fixture(scope="session")
def alice_session(server: Server) -> Iterator[httpx.Client]:
    # Logged in once: the login endpoint is throttled like a real one.
    client = server.client(server.users["alice"][0])
    yield client
    client.close()


@pytest.fixture
def alice(alice_session: httpx.Client) -> httpx.Client:
    return alice_session


def clone(client: httpx.Client) -> httpx.Client:
    """Another connection with the same session."""
    return httpx.Client(base_url=client.base_url, cookies=client.cookies, headers=client.headers, timeout=30)


def wait_for(client: httpx.Client, play_id: str, states: tuple[str, ...] = ("DONE", "FAIL", "SKIP", "FILTERED"),
             timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        play = client.get(f"/api/plays/{play_id}").json()
        if play["state"] in states:
            return play
        if time.monotonic() > deadline:
            raise AssertionError(f"play {play_id} still {play['state']} after {timeout} s")
        time.sleep(0.1)


class FileServer:
    """A local HTTP server with fixed routes, counting requests per path."""

    def __init__(self, routes: dict[str, tuple[int, str, bytes]]):
        self.routes = routes
        self.hits: dict[str, int] = {}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.hits[self.path] = outer.hits.get(self.path, 0) + 1
                status, ctype, body = outer.routes.get(self.path, (404, "text/plain", b"not found"))
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


@pytest.fixture
def files() -> Iterator[FileServer]:
    from tests.helpers import make_pdf

    srv = FileServer({
        "/INV-001.pdf": (200, "application/pdf", make_pdf("Invoice #INV-001", "Amount: $1,250.00")),
        "/invoices.json": (200, "application/json", json.dumps([{"id": "INV-001", "amount": 1250}]).encode()),
    })
    yield srv
    srv.close()
