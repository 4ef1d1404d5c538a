"""A private flowplay deployment for tests that kill and restart its processes.

``Cluster`` runs the Procfile's processes (web = Daphne, worker = Celery worker, beat =
Celery beat) as subprocesses of the test, each in its own process group so that a test can
SIGKILL one worker (and its pool children) without touching anything else. It has a
database and broker of its own:

- embedded default: SQLite and the filesystem broker in a temporary ``FLOWPLAY_VAR_DIR``;
- when ``DATABASE_URL`` / ``REDIS_URL`` are set (CI's second run): a PostgreSQL database
  ``flowplay_rel_<random>`` on the same server and Redis database 11 (12 if the
  environment already uses 11), dropped and flushed when the cluster stops.

Leases and sweeps are short (lease 3 s, heartbeat 1 s, reaper every second) so that fault
tests see recovery in seconds; every wait is a deadline on an observed condition, never a
fixed sleep that assumes a machine's speed.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import secrets
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import httpx

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".venv" / "bin"
PASSWORD = "integration-pass-123"
TERMINAL = ("DONE", "FAIL", "SKIP", "FILTERED")

PG_ONLY_REASON = "needs DATABASE_URL (PostgreSQL) and REDIS_URL: run by CI's second pass"


def pg_and_redis() -> bool:
    """True in the configuration with real PostgreSQL and Redis (CI's second run)."""
    return os.environ.get("DATABASE_URL", "").startswith("postgres") and bool(os.environ.get("REDIS_URL"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except (httpx.HTTPError, OSError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


# --- Services of this machine -------------------------------------------------------------


def pg_admin_url(database_url: str, dbname: str) -> str:
    parts = urlsplit(database_url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, parts.fragment))


def pg_execute(url: str, sql: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql)


def redis_url_for(db: int) -> str:
    base = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    parts = urlsplit(base)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", "", ""))


# The Redis and PostgreSQL servers the drills restart are the ones REDIS_URL and DATABASE_URL
# name: CI points them at the machine's services; on a shared machine point them at private
# instances (a redis-server on its own port, a cluster of initdb + pg_ctl in a temporary
# folder: see the README's Reliability section) and nobody else is disturbed.


def redis_address() -> tuple[str, int]:
    parts = urlsplit(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    return parts.hostname or "127.0.0.1", parts.port or 6379


def redis_cli(*args: str, db: int | None = None) -> subprocess.CompletedProcess:
    host, port = redis_address()
    cmd = ["redis-cli", "-h", host, "-p", str(port)]
    if db is not None:
        cmd += ["-n", str(db)]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=30)


def redis_up() -> bool:
    return redis_cli("ping").stdout.strip() == "PONG"


def restart_redis() -> None:
    """Stop Redis without saving (every queued message is lost) and start it again."""
    try:
        stop_redis()
    finally:
        start_redis()


def stop_redis() -> None:
    redis_cli("shutdown", "nosave")
    wait_until(lambda: not redis_up(), 15, "Redis to stop")


def start_redis() -> None:
    if redis_up():
        return
    host, port = redis_address()
    subprocess.run(["redis-server", "--daemonize", "yes", "--bind", host, "--port", str(port),
                    "--save", "", "--appendonly", "no"], capture_output=True, timeout=30)
    wait_until(redis_up, 30, "Redis to start", every=0.2)


def pg_address() -> tuple[str, int]:
    parts = urlsplit(os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"))
    return parts.hostname or "127.0.0.1", parts.port or 5432


def pg_up() -> bool:
    host, port = pg_address()
    return subprocess.run(["pg_isready", "-h", host, "-p", str(port), "-q"], timeout=10).returncode == 0


def pg_restart_command() -> list[str]:
    """How to restart the server DATABASE_URL names: its Debian cluster (pg_ctlcluster) when
    one listens on that port, else pg_ctl on the server's data directory, as its owner."""
    _host, port = pg_address()
    listed = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True, timeout=30)
    for line in listed.stdout.splitlines() if listed.returncode == 0 else []:
        version, name, cluster_port = line.split()[:3]
        if cluster_port == str(port):
            return ["pg_ctlcluster", "--skip-systemctl-redirect", version, name, "restart"]
    url = pg_admin_url(os.environ["DATABASE_URL"], "postgres")
    import psycopg

    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        data = conn.execute("SHOW data_directory").fetchone()[0]
        binaries = conn.execute("SELECT setting FROM pg_config WHERE name = 'BINDIR'").fetchone()[0]
    command = [os.path.join(binaries, "pg_ctl"), "-D", data, "-m", "fast", "-w", "-l",
               os.path.join(data, "restart.log"), "restart"]
    owner = Path(data).owner()
    if os.geteuid() == 0 and owner != "root":
        command = ["runuser", "-u", owner, "--", *command]
    return command


def restart_postgres() -> None:
    """Restart the PostgreSQL server of DATABASE_URL (every connection is cut)."""
    command = pg_restart_command()
    try:
        subprocess.run(command, capture_output=True, timeout=120)
    finally:
        if not pg_up() and command[0] == "pg_ctlcluster":
            subprocess.run([*command[:-1], "start"], capture_output=True, timeout=120)
        wait_until(pg_up, 60, "PostgreSQL to accept connections", every=0.3)


# --- A counting HTTP server ------------------------------------------------------------------


class CountingServer:
    """Counts requests per path. ``/slow/<name>?s=<seconds>`` answers after a delay."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                parts = urlsplit(self.path)
                with outer.lock:
                    outer.hits[parts.path] = outer.hits.get(parts.path, 0) + 1
                    n = outer.hits[parts.path]
                delay = float((parse_qs(parts.query).get("s") or ["0"])[0])
                if delay:
                    time.sleep(delay)
                body = json.dumps({"path": parts.path, "n": n}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the worker that asked was killed

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def count(self, path: str) -> int:
        with self.lock:
            return self.hits.get(path, 0)

    def close(self) -> None:
        self.httpd.shutdown()


# --- The cluster -----------------------------------------------------------------------------


@dataclass
class Cluster:
    root: Path
    env: dict[str, str]
    port: int
    redis_db: int | None = None
    pg_url: str | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    users: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/ws"

    @classmethod
    def create(cls, root: Path, **extra_env: str) -> Cluster:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PYTEST", "DJANGO_SETTINGS", "FLOWPLAY_", "CELERY_"))
               and k not in ("DATABASE_URL", "REDIS_URL", "SQLITE_PATH")}
        env.update(
            FLOWPLAY_VAR_DIR=str(root), PYTHONUNBUFFERED="1", PATH=f"{BIN}:{env.get('PATH', '')}",
            FLOWPLAY_LEASE_SECONDS="3", FLOWPLAY_HEARTBEAT_SECONDS="1", FLOWPLAY_REAP_EVERY_SECONDS="1",
            FLOWPLAY_REAP_IDLE_SECONDS="5", LOGIN_THROTTLE_RATE="1000/min", FLOWPLAY_CURL_ALLOW="127.0.0.1/32",
        )
        cluster = cls(root=root, env=env, port=free_port())
        if pg_and_redis():
            name = f"flowplay_rel_{secrets.token_hex(4)}"
            admin = pg_admin_url(os.environ["DATABASE_URL"], "postgres")
            pg_execute(admin, f'CREATE DATABASE "{name}"')
            cluster.pg_url = pg_admin_url(os.environ["DATABASE_URL"], name)
            env_db = urlsplit(os.environ["REDIS_URL"]).path.strip("/")
            cluster.redis_db = 12 if env_db == "11" else 11
            redis_cli("flushdb", db=cluster.redis_db)
            env.update(DATABASE_URL=cluster.pg_url, REDIS_URL=redis_url_for(cluster.redis_db),
                       CELERY_BROKER_URL=redis_url_for(cluster.redis_db))
        env.update(extra_env)
        return cluster

    # -- processes ----------------------------------------------------------------------------

    def command(self, kind: str, name: str) -> list[str]:
        if kind == "web":
            return [str(BIN / "python"), "-m", "flowplay.web", "-b", "127.0.0.1", "-p", str(self.port), "--ping-interval", "15",
                    "--ping-timeout", "30", "flowplay.asgi:application"]
        if kind == "worker":
            return [str(BIN / "celery"), "-A", "flowplay", "worker", "--loglevel", "INFO", "--concurrency", "2",
                    "-Q", "default", "-n", f"{name}@%h", "--without-gossip", "--without-mingle"]
        if kind == "beat":
            return [str(BIN / "celery"), "-A", "flowplay", "beat", "--loglevel", "INFO",
                    "-s", str(self.root / "celerybeat-schedule")]
        raise ValueError(kind)

    def start(self, name: str, kind: str | None = None) -> subprocess.Popen:
        kind = kind or name.split("-")[0]
        old = self.procs.get(name)
        if old is not None and old.poll() is None:
            return old
        log = (self.root / f"{name}.log").open("a")
        proc = subprocess.Popen(self.command(kind, name), cwd=ROOT, env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        if kind == "web":
            self.wait_healthy()
        elif kind == "worker":
            wait_until(lambda: "ready." in self.log(name), 60, f"{name} to be ready", every=0.2)
        return proc

    def running(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the whole process group of ``name`` (the worker and its pool)."""
        proc = self.procs[name]
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGKILL:
            proc.wait(timeout=30)

    def terminate(self, name: str, timeout: float = 60) -> int:
        """SIGTERM the main process only (a graceful shutdown) and wait for it to exit."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(name)
            raise

    def stop(self, name: str) -> None:
        proc = self.procs.get(name)
        if proc is not None:
            self._stop([proc])

    def stop_all(self) -> None:
        self._stop(list(self.procs.values()))

    @staticmethod
    def _stop(procs: list[subprocess.Popen]) -> None:
        """SIGTERM each process group, then wait up to 20 s in all (SIGKILL after that): the
        shutdowns overlap (a worker finishing its task or Daphne closing its connections
        takes seconds each)."""
        live = [proc for proc in procs if proc.poll() is None]
        for proc in live:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 20
        for proc in live:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)

    def destroy(self) -> None:
        self.stop_all()
        if self.pg_url:
            try:
                pg_execute(pg_admin_url(self.pg_url, "postgres"),
                           f'DROP DATABASE IF EXISTS "{urlsplit(self.pg_url).path.strip("/")}" WITH (FORCE)')
            except Exception:  # noqa: BLE001 - best effort: the server may be restarting
                pass
        if self.redis_db is not None:
            redis_cli("flushdb", db=self.redis_db)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self, tail: int = 60) -> str:
        out = []
        for name in self.procs:
            lines = self.log(name).splitlines()[-tail:]
            out.append(f"--- {name} ---\n" + "\n".join(lines))
        return "\n".join(out)

    def manage(self, *args: str, timeout: float = 300) -> str:
        out = subprocess.run([str(BIN / "python"), "manage.py", *args], cwd=ROOT, env=self.env,
                             capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    def wait_healthy(self, timeout: float = 90) -> None:
        def healthy() -> bool:
            web = self.procs.get("web")
            if web is not None and web.poll() is not None:
                raise AssertionError(f"web exited with {web.returncode}:\n{self.log('web')[-3000:]}")
            return httpx.get(f"{self.url}/api/health", timeout=3).status_code == 200

        wait_until(healthy, timeout, "the web process to be healthy", every=0.2)

    # -- setup ---------------------------------------------------------------------------------

    def migrate_and_seed(self) -> None:
        self.manage("migrate", "--noinput")
        script = (
            "from tenancy.models import Company, User\n"
            "acme, _ = Company.objects.get_or_create(slug='acme', defaults={'name': 'Acme'})\n"
            "globex, _ = Company.objects.get_or_create(slug='globex', defaults={'name': 'Globex'})\n"
            f"for name, company in (('alice', acme), ('bob', acme), ('charlie', globex)):\n"
            f"    User.objects.create_user(name, name + '@rel.test', {PASSWORD!r}, company=company)\n"
        )
        self.manage("shell", "-c", script)
        self.users = {name: f"{name}@rel.test" for name in ("alice", "bob", "charlie")}

    def client(self, name: str = "alice") -> httpx.Client:
        client = httpx.Client(base_url=self.url, timeout=30)
        r = client.post("/api/auth/login", json={"email": self.users[name], "password": PASSWORD})
        assert r.status_code == 200, r.text
        client.headers["X-CSRFToken"] = client.cookies["csrftoken"]
        return client

    # -- direct database access (for what the API does not offer, e.g. ageing rows) -----

    def sql(self, query: str, params: tuple = ()) -> list[tuple]:
        if self.pg_url:
            import psycopg

            with psycopg.connect(self.pg_url, autocommit=True, connect_timeout=10) as conn:
                cur = conn.execute(query.replace("?", "%s"), params)
                return cur.fetchall() if cur.description else []
        conn = sqlite3.connect(self.root / "flowplay.sqlite3", timeout=30)
        try:
            cur = conn.execute(query, params)
            rows = cur.fetchall()
            conn.commit()
            return rows
        finally:
            conn.close()


def run_play(client: httpx.Client, flow_id: str, args: dict[str, Any] | None = None, **body: Any) -> str:
    r = client.post(f"/api/flows/{flow_id}/run", json={"args": args or {}, **body})
    assert r.status_code in (200, 201), r.text
    return r.json()["playId"]


def make_flow(client: httpx.Client, name: str, layers: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    r = client.post("/api/flows", json={"name": name, "layers": layers, **fields})
    assert r.status_code == 201, r.text
    return r.json()


def wait_terminal(client: httpx.Client, play_ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    """Wait until every play is terminal; return them by id."""
    done: dict[str, dict[str, Any]] = {}

    def check() -> bool:
        for play_id in play_ids:
            if play_id in done:
                continue
            try:
                r = client.get(f"/api/plays/{play_id}")
            except httpx.HTTPError:
                return False
            if r.status_code == 200 and r.json()["state"] in TERMINAL:
                done[play_id] = r.json()
        return len(done) == len(play_ids)

    try:
        wait_until(check, timeout, f"{len(play_ids)} plays to finish", every=0.3)
    except AssertionError:
        pending = {p: client.get(f"/api/plays/{p}").json().get("state") for p in play_ids if p not in done}
        raise AssertionError(f"plays not finished after {timeout:g} s: {pending}") from None
    return done


class EventCollector:
    """A WebSocket client that reconnects with ``?since=<last cursor>`` whenever it is cut off."""

    def __init__(self, ws_url: str, cookies: httpx.Cookies):
        self.ws_url = ws_url
        self.cookie = "; ".join(f"{k}={v}" for k, v in cookies.items())
        self.events: list[dict[str, Any]] = []
        self.reconnects = 0
        self.last_cursor: str | None = None
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> EventCollector:
        self._thread.start()
        wait_until(self._connected.is_set, 30, "the WebSocket to connect")
        return self

    def _run(self) -> None:
        from websockets.sync.client import connect

        while not self._stop.is_set():
            url = self.ws_url if self.last_cursor is None else f"{self.ws_url}?since={self.last_cursor}"
            try:
                with connect(url, additional_headers={"Cookie": self.cookie}, open_timeout=5) as ws:
                    # The pong carries the connection's starting cursor: the point to resume from.
                    ws.send(json.dumps({"type": "ping"}))
                    while not self._stop.is_set():
                        try:
                            message = json.loads(ws.recv(timeout=0.5))
                        except TimeoutError:
                            continue
                        if "cursor" in message and "playId" in message:
                            self.events.append(message)
                            self.last_cursor = message["cursor"]
                        elif message.get("type") == "pong":
                            if self.last_cursor is None:
                                self.last_cursor = message.get("cursor")
                            self._connected.set()
                    return
            except Exception:  # noqa: BLE001 - cut off: reconnect with since
                if self._stop.is_set():
                    return
                self.reconnects += 1
                time.sleep(0.3)

    def seqs_for(self, play_ids: set[str]) -> list[str]:
        """The cursors of the plays' events received (company-wide, so comparable)."""
        return [e["cursor"] for e in self.events if e["playId"] in play_ids]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def seqs_of(client: httpx.Client, play_id: str) -> list[str]:
    """The cursors of a play's stored events."""
    r = client.get(f"/api/plays/{play_id}/events")
    assert r.status_code == 200, r.text
    return [e["cursor"] for e in r.json()]


def scrape(pattern: str, text: str) -> list[str]:
    return re.findall(pattern, text)


__all__ = ["Cluster", "CountingServer", "EventCollector", "pg_and_redis", "restart_postgres", "restart_redis",
           "run_play", "make_flow", "wait_terminal", "wait_until", "seqs_of", "start_redis", "stop_redis", "Iterator"]
