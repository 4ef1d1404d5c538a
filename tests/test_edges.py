"""The edges of issue 13, each reproduced as it was found: the login throttle keyed on a
header the client chooses, a huge anonymous body read whole before its 413, a login that
answers faster for unknown emails, and ``make run`` on every interface with a fixed key.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.hashers import get_hasher
from django.core.cache import cache
from django.test import Client

from tenancy.models import User

from .conftest import PASSWORD

ROOT = Path(__file__).resolve().parents[1]


# --- 1. The login throttle trusts no proxy by default ------------------------------------


def _wrong_logins(client: Client, email: str, forwarded: list[str]) -> list[int]:
    return [
        client.post(
            "/api/auth/login",
            {"email": email, "password": "wrong"},
            content_type="application/json",
            HTTP_X_FORWARDED_FOR=xff,
        ).status_code
        for xff in forwarded
    ]


def test_a_forged_x_forwarded_for_gets_no_fresh_login_budget(db: Any, alice: User) -> None:
    cache.clear()
    try:
        # Found: 30 wrong passwords, each with another X-Forwarded-For, and no 429.
        statuses = _wrong_logins(Client(), alice.email, [f"203.0.113.{i}" for i in range(30)])
        assert statuses[0] == 401 and 429 in statuses
    finally:
        cache.clear()


def test_with_one_trusted_proxy_the_client_is_the_address_it_appended(db: Any, alice: User, settings: Any) -> None:
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "NUM_PROXIES": 1}
    cache.clear()
    try:
        # Behind one proxy each client has its own budget: the proxy appends the real address.
        statuses = _wrong_logins(Client(), alice.email, [f"198.51.100.7, 203.0.113.{i}" for i in range(30)])
        assert 429 not in statuses
        # The same client, whatever it forges in front of the proxy's entry, shares one budget.
        statuses = _wrong_logins(Client(), alice.email, [f"10.0.0.{i}, 203.0.113.99" for i in range(30)])
        assert 429 in statuses
    finally:
        cache.clear()


def test_trusted_proxies_setting_is_a_count(monkeypatch: pytest.MonkeyPatch) -> None:
    code = "from django.conf import settings; print(settings.REST_FRAMEWORK['NUM_PROXIES'])"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "flowplay.settings"}
    out = subprocess.run(
        [sys.executable, "-c", "import django; django.setup(); " + code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.strip() == "0", out.stderr
    out = subprocess.run(
        [sys.executable, "-c", "import django; django.setup(); " + code],
        cwd=ROOT,
        env={**env, "FLOWPLAY_TRUSTED_PROXIES": "2"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.strip() == "2", out.stderr
    out = subprocess.run(
        [sys.executable, "-c", "import django; django.setup(); " + code],
        cwd=ROOT,
        env={**env, "FLOWPLAY_TRUSTED_PROXIES": "-1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "FLOWPLAY_TRUSTED_PROXIES must be 0 or more" in out.stderr


# --- 2. Bodies over the limit are refused before they are read ---------------------------


class FakeConnection:
    """An ASGI client: a body in chunks, and what the application sent back."""

    def __init__(self, chunks: list[bytes]):
        self.chunks = list(chunks)
        self.read = 0
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        if not self.chunks:  # the whole body was read: the client waits for the answer
            await asyncio.Event().wait()
        chunk = self.chunks.pop(0)
        self.read += 1
        return {"type": "http.request", "body": chunk, "more_body": bool(self.chunks)}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def answer(self) -> tuple[int, dict[str, Any]]:
        start = next(m for m in self.sent if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")
        return start["status"], json.loads(body)


def _scope(headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http",
        "method": "POST",
        "path": "/api/auth/login",
        "raw_path": b"/api/auth/login",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), *headers],
        "client": ["127.0.0.1", 5000],
        "server": ["127.0.0.1", 4454],
        "scheme": "http",
        "http_version": "1.1",
    }


def test_a_declared_length_over_the_limit_is_refused_without_reading_the_body() -> None:
    from flowplay.bodylimit import BodyLimitMiddleware

    reached: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope)

    conn = FakeConnection([b"x" * 1000] * 10)
    guarded = BodyLimitMiddleware(app, limit=4096)
    asyncio.run(guarded(_scope([(b"content-length", str(1024**3).encode())]), conn.receive, conn.send))
    status, body = conn.answer()
    assert (status, body["error"], body["statusCode"]) == (413, "PAYLOAD_TOO_LARGE", 413)
    assert conn.read == 0 and reached == []


def test_a_chunked_body_is_refused_once_it_passes_the_limit_and_django_never_answers(settings: Any) -> None:
    from flowplay.asgi import application

    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 4096
    conn = FakeConnection([b'{"email": "' + b"x" * 1000] + [b"x" * 1000] * 99 + [b'", "password": "p"}'])
    scope = _scope([(b"transfer-encoding", b"chunked")])
    asyncio.run(application(scope, conn.receive, conn.send))
    status, body = conn.answer()
    assert (status, body["error"]) == (413, "PAYLOAD_TOO_LARGE")
    # Read up to the limit and one chunk more, not the whole body; one answer only.
    assert conn.read == 5
    assert [m["type"] for m in conn.sent] == ["http.response.start", "http.response.body"]


def test_a_body_within_the_limit_reaches_django() -> None:
    from flowplay.asgi import application

    payload = json.dumps({"email": "not an email", "password": ""}).encode()
    conn = FakeConnection([payload[:10], payload[10:]])
    cache.clear()
    asyncio.run(application(_scope([(b"content-length", str(len(payload)).encode())]), conn.receive, conn.send))
    status, body = conn.answer()  # Django read and validated the body
    assert (status, body["error"]) == (400, "VALIDATION_ERROR") and "password" in body["details"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def web(tmp_path: Path) -> Any:
    """The Procfile's web process (``python -m flowplay.web``) with a 64 KiB body limit."""
    port = _free_port()
    env = {
        **os.environ,
        "FLOWPLAY_VAR_DIR": str(tmp_path),
        "FLOWPLAY_MAX_BODY_BYTES": "65536",
        "DJANGO_SETTINGS_MODULE": "flowplay.settings",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("DATABASE_URL", None)
    log = (tmp_path / "web.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowplay.web", "-b", "127.0.0.1", "-p", str(port), "flowplay.asgi:application"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None, (tmp_path / "web.log").read_text()
            time.sleep(0.1)
    yield port
    proc.terminate()
    proc.wait(timeout=30)


def _answer(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def test_daphne_answers_a_1_gb_declared_body_from_its_headers(web: int) -> None:
    with socket.create_connection(("127.0.0.1", web), timeout=30) as sock:
        sock.sendall(
            b"POST /api/auth/login HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1073741824\r\n\r\n" + b"x" * 10000
        )
        answer = _answer(sock)  # no more than 10 KB of the gigabyte was ever sent
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert json.loads(body)["error"] == "PAYLOAD_TOO_LARGE"


def test_daphne_stops_reading_a_chunked_body_past_the_limit(web: int) -> None:
    with socket.create_connection(("127.0.0.1", web), timeout=30) as sock:
        sock.sendall(
            b"POST /api/auth/login HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"%x\r\n%s\r\n" % (16384, b"x" * 16384)
        sent = 0
        try:
            for _ in range(64 * 1024):  # up to 1 GiB, if the server kept reading
                sock.sendall(chunk)
                sent += 16384
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = _answer(sock)
    assert sent < 64 * 1024 * 16384  # the server closed the connection long before
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


# --- 3. Login takes as long for an unknown email as for a known one -----------------------


@pytest.fixture
def hashings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The passwords the default hasher (the one Django hashes new passwords with) hashed."""
    calls: list[str] = []
    hasher = type(get_hasher("default"))
    real = hasher.encode

    def counting(self: Any, password: str, *args: Any, **kwargs: Any) -> str:
        calls.append(password)
        return real(self, password, *args, **kwargs)

    monkeypatch.setattr(hasher, "encode", counting)
    return calls


@pytest.mark.parametrize("login", ["nobody@acme.test", "alice@acme.test", "ALICE@acme.test", "alice", "nobody"])
def test_api_login_hashes_the_password_once_for_known_and_unknown_emails(
    db: Any, alice: User, hashings: list[str], login: str
) -> None:
    cache.clear()
    response = Client().post("/api/auth/login", {"email": login, "password": "wrong"}, content_type="application/json")
    assert response.status_code == 401
    # Found: 11 ms for an unknown email, 350 ms for a known one (no hashing when unknown).
    assert hashings == ["wrong"]


@pytest.mark.parametrize("login", ["nobody@acme.test", "alice@acme.test", "alice"])
def test_page_login_hashes_the_password_once_for_known_and_unknown_emails(
    db: Any, alice: User, hashings: list[str], login: str
) -> None:
    cache.clear()
    response = Client().post("/login/", {"username": login, "password": "wrong"})
    assert response.status_code == 200 and b"Wrong email or password" in response.content
    assert hashings == ["wrong"]


def test_both_logins_accept_an_email_in_any_case_or_a_username(db: Any, alice: User) -> None:
    cache.clear()
    for login in ("alice@acme.test", "Alice@ACME.test", "alice"):
        api = Client().post("/api/auth/login", {"email": login, "password": PASSWORD}, content_type="application/json")
        assert api.status_code == 200, login
        page = Client().post("/login/", {"username": login, "password": PASSWORD})
        assert page.status_code == 302, login
    alice.is_active = False
    alice.save()
    assert (
        Client()
        .post("/api/auth/login", {"email": alice.email, "password": PASSWORD}, content_type="application/json")
        .status_code
        == 401
    )
    cache.clear()


# --- 8. make run: this machine only, and a secret key of its own ------------------------


def test_procfile_and_makefile_bind_loopback_by_default() -> None:
    procfile = (ROOT / "Procfile").read_text()
    web = next(line for line in procfile.splitlines() if line.startswith("web:"))
    assert "-b ${WEB_HOST:-127.0.0.1}" in web and "0.0.0.0" not in procfile
    # flowplay.serve runs WEB_CONCURRENCY processes of flowplay.web on the one socket.
    assert "python -m flowplay.serve" in web and '"-m", "flowplay.web"' in (ROOT / "flowplay" / "serve.py").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "WEB_HOST ?= 127.0.0.1" in makefile and "WEB_HOST=$(WEB_HOST)" in makefile


def _secret_key(var: Path, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("SECRET_KEY", "FLOWPLAY_PRODUCTION")}
    full.update(FLOWPLAY_VAR_DIR=str(var), DJANGO_SETTINGS_MODULE="flowplay.settings", **env)
    return subprocess.run(
        [sys.executable, "-c", "from django.conf import settings; print(settings.SECRET_KEY)"],
        cwd=ROOT,
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_secret_key_is_generated_once_per_var_folder(tmp_path: Path) -> None:
    first, again = _secret_key(tmp_path / "a"), _secret_key(tmp_path / "a")
    other = _secret_key(tmp_path / "b")
    assert first.returncode == 0, first.stderr
    key = first.stdout.strip()
    assert len(key) >= 50 and "insecure" not in key
    assert again.stdout.strip() == key  # web, worker and beat agree, and restarts keep sessions
    assert other.stdout.strip() != key
    assert (tmp_path / "a" / "secret_key").stat().st_mode & 0o777 == 0o600
    assert _secret_key(tmp_path / "a", SECRET_KEY="x" * 60).stdout.strip() == "x" * 60


def test_processes_starting_together_agree_on_one_key(tmp_path: Path) -> None:
    full = {k: v for k, v in os.environ.items() if k != "SECRET_KEY"}
    full.update(FLOWPLAY_VAR_DIR=str(tmp_path), DJANGO_SETTINGS_MODULE="flowplay.settings")
    code = "from django.conf import settings; print(settings.SECRET_KEY)"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=full, stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    keys = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(keys) == 1 and len(keys.pop()) >= 50


def test_http_channels_keep_their_own_larger_limits(web: int) -> None:
    """/hooks/… bodies are held to the channels' ceiling only; each channel applies its own limit."""
    with socket.create_connection(("127.0.0.1", web), timeout=30) as sock:
        body = b"x" * 100_000  # over the 64 KiB of the fixture, under the hooks' ceiling
        sock.sendall(
            b"POST /hooks/nothing-here HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
        )
        answer = _answer(sock)
    assert not answer.startswith(b"HTTP/1.1 413"), answer[:200]


@pytest.mark.parametrize(("proxies", "expected"), [("0", "None"), ("1", "('HTTP_X_FORWARDED_PROTO', 'https')")])
def test_x_forwarded_proto_is_trusted_only_behind_a_declared_proxy(proxies: str, expected: str) -> None:
    env = {
        **os.environ,
        "FLOWPLAY_PRODUCTION": "1",
        "FLOWPLAY_TRUSTED_PROXIES": proxies,
        "SECRET_KEY": "x" * 50,
        "FLOWPLAY_SECRET_KEYS": "hT1wIAbrcbnPk3ShlpXxIMHgjDXWlqAKrlbKf8X8xAc=",
        "ALLOWED_HOSTS": "flowplay.example.com",
    }
    code = "from django.conf import settings; print(settings.SECURE_PROXY_SSL_HEADER)"
    done = subprocess.run(
        [sys.executable, "-c", f"import django, os; os.environ['DJANGO_SETTINGS_MODULE']='flowplay.settings'; {code}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == expected
