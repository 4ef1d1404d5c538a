"""A flowplay fleet across hosts, each host a Linux network namespace of this machine.

``Fleet`` makes a bridge and one namespace per host, joined to the bridge by a veth pair
(addresses in a private /24 chosen per run; nothing else is ever a target):

- ``db``: a PostgreSQL cluster and a Redis server of its own (started inside the
  namespace, listening only on its link address), the scheduler (Celery beat) and the
  counting HTTP target of the ``curl`` steps (tests/integration/fleet_target.py);
- ``web1``, ``web2``: one Daphne each;
- ``w1``, ``w2``, ``w3``: one Celery worker each on the default queue, ``w3`` also on
  ``second``.

The test process talks to the hosts through the bridge's host address. Cutting a host
(``cut``) takes its link down: its processes keep running but reach nothing, as when a
host is partitioned; ``heal`` brings the link back. Needs root and iproute2: ``available()``
says why not where they are missing.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .processes import BIN, PASSWORD, ROOT, wait_until

HOSTS = {"db": 2, "web1": 11, "web2": 12, "w1": 21, "w2": 22, "w3": 23}
WORKER_QUEUES = {"w1": "default", "w2": "default", "w3": "default,second"}


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    return found[-1].parent if found else None


def available() -> str | None:
    """None if a fleet can be made here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "redis-server", "runuser"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if _pg_bin() is None:
        return "PostgreSQL server binaries (/usr/lib/postgresql/*/bin) are not installed"
    name = f"fpchk{secrets.token_hex(2)}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
    return done


@dataclass
class Fleet:
    root: Path
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    subnet: str = field(default_factory=lambda: f"10.{random.randint(200, 250)}.{random.randint(0, 255)}")
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    latency: str = ""  # how the slow link was made: "netem" or "proxy"
    token: str = ""

    # -- the network ------------------------------------------------------------------------

    def ns(self, host: str) -> str:
        return f"fp{self.tag}{host}"

    def ip(self, host: str) -> str:
        return f"{self.subnet}.{HOSTS[host]}"

    def link(self, host: str) -> str:
        return f"fp{self.tag}{host}h"  # the host-side end of the host's veth pair

    @property
    def bridge(self) -> str:
        return f"fp{self.tag}br"

    def make_network(self) -> None:
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for host in HOSTS:
            ns, outer, inner = self.ns(host), self.link(host), f"fp{self.tag}{host}n"
            sh("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            sh("ip", "link", "set", inner, "netns", ns)
            sh("ip", "link", "set", outer, "master", self.bridge)
            sh("ip", "link", "set", outer, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", inner, "name", "eth0")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.ip(host)}/24", "dev", "eth0")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")

    def cut(self, host: str) -> None:
        sh("ip", "link", "set", self.link(host), "down")

    def heal(self, host: str) -> None:
        sh("ip", "link", "set", self.link(host), "up")

    def slow(self, host: str, ms: int, jitter: int) -> str:
        """Add ``ms ± jitter`` of one-way latency between ``host`` and the database and
        broker: ``tc netem`` on its link where the kernel has it, else a delaying proxy in
        the db host (the worker must then be restarted with ``proxied_env``)."""
        done = sh(
            "ip",
            "netns",
            "exec",
            self.ns(host),
            "tc",
            "qdisc",
            "add",
            "dev",
            "eth0",
            "root",
            "netem",
            "delay",
            f"{ms}ms",
            f"{jitter}ms",
            check=False,
        )
        if done.returncode == 0:
            self.latency = "netem"
            return "netem"
        for name, port, target in (("pgproxy", 15432, 5432), ("redisproxy", 16379, 6379)):
            self.spawn(
                name,
                "db",
                [
                    str(BIN / "python"),
                    str(ROOT / "tests/integration/fleet_proxy.py"),
                    self.ip("db"),
                    str(port),
                    self.ip("db"),
                    str(target),
                    str(ms),
                    str(jitter),
                ],
            )
        self.latency = "proxy"
        return "proxy"

    def proxied_env(self) -> dict[str, str]:
        db = self.ip("db")
        redis = f"redis://{db}:16379/0"
        return {"DATABASE_URL": f"postgres://postgres@{db}:15432/fleet", "REDIS_URL": redis, "CELERY_BROKER_URL": redis}

    # -- processes ----------------------------------------------------------------------------

    def spawn(
        self, name: str, host: str, cmd: list[str], *, user: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        prefix = ["ip", "netns", "exec", self.ns(host)]
        if user:
            prefix += [shutil.which("runuser") or "runuser", "-u", user, "--"]
        log = (self.root / f"{name}.log").open("a")
        base = self.env or dict(os.environ)
        proc = subprocess.Popen(
            [*prefix, *cmd],
            cwd=ROOT,
            env={**base, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def start_services(self) -> None:
        pg_bin = _pg_bin()
        assert pg_bin is not None
        data = self.root / "pg"
        data.mkdir()
        shutil.chown(data, "postgres", "postgres")
        self.root.chmod(0o755)
        sh(
            shutil.which("runuser") or "runuser",
            "-u",
            "postgres",
            "--",
            str(pg_bin / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
        )
        with (data / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {self.subnet}.0/24 trust\n")
        self.spawn(
            "postgres",
            "db",
            [
                str(pg_bin / "postgres"),
                "-D",
                str(data),
                "-c",
                f"listen_addresses={self.ip('db')}",
                "-c",
                f"unix_socket_directories={data}",
                "-c",
                "max_connections=300",
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
            ],
            user="postgres",
        )
        self.spawn(
            "redis",
            "db",
            [
                "redis-server",
                "--bind",
                self.ip("db"),
                "--port",
                "6379",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ],
        )
        self.spawn(
            "target",
            "db",
            [str(BIN / "python"), str(ROOT / "tests/integration/fleet_target.py"), self.ip("db"), "8080"],
        )
        wait_until(
            lambda: sh("pg_isready", "-h", self.ip("db"), "-q", check=False).returncode == 0,
            60,
            "the fleet's PostgreSQL",
        )
        sh("psql", "-h", self.ip("db"), "-U", "postgres", "-d", "postgres", "-qc", "CREATE DATABASE fleet")
        wait_until(
            lambda: sh("redis-cli", "-h", self.ip("db"), "ping", check=False).stdout.strip() == "PONG",
            30,
            "the fleet's Redis",
        )
        wait_until(lambda: httpx.get(f"{self.target}/counts", timeout=2).status_code == 200, 30, "the target")

    @property
    def target(self) -> str:
        return f"http://{self.ip('db')}:8080"

    def url(self, web: str) -> str:
        return f"http://{self.ip(web)}:8000"

    def start(self) -> None:
        """Make the network and the services, migrate, and start every process."""
        self.make_network()
        self.start_services()
        db = self.ip("db")
        redis = f"redis://{db}:6379/0"
        self.env = {
            **{
                k: v
                for k, v in os.environ.items()
                if not k.startswith(("PYTEST", "DJANGO_SETTINGS", "FLOWPLAY_", "CELERY_"))
                and k not in ("DATABASE_URL", "REDIS_URL", "SQLITE_PATH")
            },
            "DATABASE_URL": f"postgres://postgres@{db}:5432/fleet",
            "REDIS_URL": redis,
            "CELERY_BROKER_URL": redis,
            "FLOWPLAY_VAR_DIR": str(self.root),
            "PYTHONUNBUFFERED": "1",
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
            "SECRET_KEY": "fleet-" + secrets.token_hex(16),
            "ALLOWED_HOSTS": "*",
            "FLOWPLAY_LEASE_SECONDS": "3",
            "FLOWPLAY_HEARTBEAT_SECONDS": "1",
            "FLOWPLAY_REAP_EVERY_SECONDS": "1",
            "FLOWPLAY_REAP_IDLE_SECONDS": "5",
            "LOGIN_THROTTLE_RATE": "10000/min",
            # The curl steps call the target on the fleet's private network.
            "FLOWPLAY_CURL_ALLOW": f"{self.subnet}.0/24",
            "FLOWPLAY_EGRESS_ALLOW": f"{self.subnet}.0/24",
            "DB_POOL_MAX_SIZE": "8",
        }
        self.manage("migrate", "--noinput")
        self.manage(
            "shell",
            "-c",
            (
                "from tenancy.models import Company, User\n"
                "acme, _ = Company.objects.get_or_create(slug='acme', defaults={'name': 'Acme'})\n"
                f"User.objects.create_user('alice', 'alice@fleet.test', {PASSWORD!r}, company=acme)\n"
            ),
        )
        self.spawn(
            "beat",
            "db",
            [
                str(BIN / "celery"),
                "-A",
                "flowplay",
                "beat",
                "--loglevel",
                "INFO",
                "-s",
                str(self.root / "celerybeat-schedule"),
            ],
        )
        for web in ("web1", "web2"):
            self.start_web(web)
        for worker in WORKER_QUEUES:
            self.start_worker(worker)
        client = self.client("web1")
        try:
            r = client.post("/api/auth/api-keys", json={"name": "fleet"})
            assert r.status_code == 201, r.text
            self.token = r.json()["token"]
        finally:
            client.close()

    def start_web(self, web: str) -> None:
        # The Procfile's web process: Daphne with the request-body guard.
        self.spawn(web, web, [str(BIN / "python"), "-m", "flowplay.web", "-b", self.ip(web), "-p", "8000",
                              "flowplay.asgi:application"])
        wait_until(
            lambda: httpx.get(f"{self.url(web)}/api/health", timeout=3).status_code == 200, 90, f"{web} to be healthy"
        )

    def start_worker(self, worker: str, env: dict[str, str] | None = None) -> None:
        log = self.root / f"{worker}.log"
        mark = log.stat().st_size if log.exists() else 0
        self.spawn(
            worker,
            worker,
            [
                str(BIN / "celery"),
                "-A",
                "flowplay",
                "worker",
                "--loglevel",
                "INFO",
                "--concurrency",
                "2",
                "-Q",
                WORKER_QUEUES[worker],
                "-n",
                f"{worker}@fleet",
                "--without-gossip",
                "--without-mingle",
            ],
            env=env,
        )
        wait_until(lambda: "ready." in log.read_text(errors="replace")[mark:], 90, f"{worker} to be ready", every=0.2)

    def pids(self, name: str) -> set[int]:
        """The process ids of ``name`` and its children (a worker's pool)."""
        proc = self.procs[name]
        out = sh("ps", "-o", "pid=", "--ppid", str(proc.pid), check=False).stdout.split()
        found = {proc.pid, *map(int, out)}
        for pid in list(found):
            found |= set(map(int, sh("ps", "-o", "pid=", "--ppid", str(pid), check=False).stdout.split()))
        return found

    def terminate(self, name: str, timeout: float = 90) -> None:
        """SIGTERM (a warm shutdown: a worker finishes its tasks) and wait for the exit."""
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)

    def manage(self, *args: str) -> str:
        done = subprocess.run(
            [str(BIN / "python"), "manage.py", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    def sql(self, query: str, params: tuple = ()) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.env["DATABASE_URL"], autocommit=True, connect_timeout=10) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def client(self, web: str = "web1", timeout: float = 30) -> httpx.Client:
        if self.token:
            return httpx.Client(
                base_url=self.url(web), timeout=timeout, headers={"Authorization": f"Bearer {self.token}"}
            )
        client = httpx.Client(base_url=self.url(web), timeout=timeout)
        r = client.post("/api/auth/login", json={"email": "alice@fleet.test", "password": PASSWORD})
        assert r.status_code == 200, r.text
        client.headers["X-CSRFToken"] = client.cookies["csrftoken"]
        return client

    def counts(self) -> dict[str, list[str]]:
        return httpx.get(f"{self.target}/counts", timeout=30).json()

    def logs(self, tail: int = 40) -> str:
        out = []
        for name in self.procs:
            path = self.root / f"{name}.log"
            lines = path.read_text(errors="replace").splitlines()[-tail:] if path.exists() else []
            out.append(f"--- {name} ---\n" + "\n".join(lines))
        return "\n".join(out)

    def destroy(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        for ns in self.namespaces:
            sh("ip", "netns", "del", ns, check=False)
        sh("ip", "link", "del", self.bridge, check=False)


def fleet_root() -> Path:
    return Path(tempfile.mkdtemp(prefix="flowplay-fleet-"))


def five_curl_steps(fleet: Fleet, ms: int = 0) -> list[dict[str, Any]]:
    query = f"?ms={ms}" if ms else ""
    return [
        {
            "ref": f"s{i}",
            "appId": "curl",
            "args": {"url": f"{fleet.target}/hit/{{{{ $playId }}}}/s{i}{query}", "timeout": 30},
            "timeout": 60,
        }
        for i in range(1, 6)
    ]


def as_json(value: Any) -> str:
    return json.dumps(value, indent=1, sort_keys=True)[:4000]
