"""Real processes: the server started the README way (`make run`), driven over HTTP.

One server per test session. It uses the database and broker the environment names
(SQLite + filesystem broker in a temporary folder by default; PostgreSQL + Redis in CI's
second run), never the unit tests' database.
"""

from __future__ import annotations

import http.server
import json
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "integration-pass-123"


def free_port(preferred: int | None = None) -> int:
    if preferred:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", preferred))
                return preferred
            except OSError:
                pass
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    port: int
    env: dict[str, str]
    proc: subprocess.Popen
    log: Path
    users: dict[str, tuple[str, str]] = field(default_factory=dict)

    def manage(self, *args: str, extra_env: dict[str, str] | None = None) -> str:
        out = subprocess.run(
            [str(ROOT / ".venv/bin/python"), "manage.py", *args],
            cwd=ROOT, env={**self.env, **(extra_env or {})}, capture_output=True, text=True, timeout=120,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    def client(self, email: str) -> httpx.Client:
        """A logged-in cookie client that sends the CSRF header like a browser app would."""
        client = httpx.Client(base_url=self.url, timeout=30)
        r = client.post("/api/auth/login", json={"email": email, "password": PASSWORD})
        assert r.status_code == 200, r.text
        client.headers["X-CSRFToken"] = client.cookies["csrftoken"]
        return client

    def tail(self, n: int = 80) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    var = tmp_path_factory.mktemp("var")
    port = free_port(4454)
    # PROMETHEUS_MULTIPROC_DIR: the server counts in its own var folder, not the test run's.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "DJANGO_SETTINGS", "PROMETHEUS_MULTIPROC"))}
    env.update(FLOWPLAY_VAR_DIR=str(var), PORT=str(port), PYTHONUNBUFFERED="1",
               # Short leases so that the crash tests see a dead worker's play reaped quickly.
               FLOWPLAY_LEASE_SECONDS=env.get("FLOWPLAY_LEASE_SECONDS", "6"),
               FLOWPLAY_HEARTBEAT_SECONDS=env.get("FLOWPLAY_HEARTBEAT_SECONDS", "2"))
    log = var / "server.log"
    proc = subprocess.Popen(["make", "run", f"PORT={port}"], cwd=ROOT, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    srv = Server(url=f"http://127.0.0.1:{port}", port=port, env=env, proc=proc, log=log)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"make run exited with {proc.returncode}:\n{srv.tail()}")
            try:
                if httpx.get(f"{srv.url}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server did not become healthy:\n{srv.tail()}")
            time.sleep(0.3)
        tag = secrets.token_hex(3)
        for name in ("alice", "bob"):
            email = f"{name}-{tag}@acme.test"
            srv.manage("createsuperuser", "--noinput", extra_env={
                "DJANGO_SUPERUSER_EMAIL": email, "DJANGO_SUPERUSER_USERNAME": f"{name}-{tag}",
                "DJANGO_SUPERUSER_PASSWORD": PASSWORD})
            srv.users[name] = (email, PASSWORD)
        yield srv
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)


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
