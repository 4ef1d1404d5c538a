"""``manage.py bench``: speed and scale of flowplay against a bare Celery chain, on the configured DB/broker.

Scenarios (``--only`` picks some, by number or name):

1. ``sequential``: one play of ``--steps`` (40) ``bench-cpu`` steps of ~10 ms, one worker
   process; wall time, per-step overhead ((wall - steps' own time) / steps), and the same
   tasks as a bare Celery ``chain``. ratio = chain_time / flowplay_time (>= 1.0: flowplay is
   at least as fast).
2. ``throughput``: ``--plays`` plays x 5 no-op steps, 2 worker processes; plays/s, steps/s,
   against as many bare chains of 5 no-op tasks (ratio = flowplay steps/s / chain steps/s).
3. ``trigger``: POST /api/flows/{id}/run against a daphne started here -> first step started
   (the first Layer's started_at), p50/p95/p99 from the client side.
4. ``api``: POST /run and GET /api/plays/{id}, ``--clients`` concurrent clients for
   ``--seconds``: req/s, p50/p99, errors.
5. ``history``: ``--history`` plays over 100 flows bulk-loaded (COPY on PostgreSQL,
   executemany elsewhere), then GET /api/flows/{id}/plays with state=FAIL, a date range,
   page=0 and a deep page; p50/p95 and EXPLAIN of the queries.
6. ``memory``: worker RSS at start and after ``--memory-plays`` plays.
7. ``scaling``: steps/s with 1, 2, 4 worker processes.

Workers (``python -m plays.bench.worker``, a Celery worker that knows ``bench-cpu``) listen
on a dedicated queue, so they never take other workers' tasks. Everything is made under the
company ``bench`` and deleted at the end (``--keep`` keeps it). Results: a Markdown table
on stdout and ``bench/results.json``.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import connection, transaction
from django.utils import timezone

SCENARIOS = ["sequential", "throughput", "trigger", "api", "history", "memory", "scaling", "floor"]
TERMINAL = ("DONE", "FAIL", "SKIP", "FILTERED")
ROOT = Path(settings.BASE_DIR)


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return round(s[k], 2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    """RSS of a process and its children (the pool), in KiB, from /proc."""
    total = 0
    pids = {pid}
    try:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except OSError:
                    continue
                if ppid == pid:
                    pids.add(int(entry))
        for p in pids:
            try:
                with open(f"/proc/{p}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1])
            except OSError:
                pass
    except OSError:
        return 0
    return total


class Procs:
    """Subprocesses started by the bench, each in its own process group; stopped by pid."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.logdir = ROOT / "bench" / "logs"
        self.logdir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=os.environ.copy()
        )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
                except ProcessLookupError:
                    pass
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.procs):
            self.stop(proc)


class Command(BaseCommand):
    help = "Benchmark flowplay against bare Celery chains; prints a Markdown table, writes bench/results.json."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--quick", action="store_true", help="every scenario at small scale (under a minute)")
        parser.add_argument("--only", default="", help="comma-separated scenario numbers or names")
        parser.add_argument("--steps", type=int, default=None, help="steps of scenario 1 (default 40)")
        parser.add_argument("--step-ms", type=float, default=10.0, help="CPU ms per step of scenario 1")
        parser.add_argument("--plays", type=int, default=None, help="plays of scenario 2 (default 1000)")
        parser.add_argument("--trigger-plays", type=int, default=None, help="plays of scenario 3 (default 500)")
        parser.add_argument("--clients", type=int, default=16, help="concurrent clients of scenario 4")
        parser.add_argument("--seconds", type=float, default=None, help="duration of scenario 4 (default 20)")
        parser.add_argument("--history", type=int, default=None, help="plays loaded for scenario 5 (default 1,000,000)")
        parser.add_argument("--memory-plays", type=int, default=None, help="plays of scenario 6 (default 10,000)")
        parser.add_argument("--repeat", type=int, default=None, help="runs of scenario 1 (median; default 5)")
        parser.add_argument("--keep", action="store_true", help="keep the bench company and its data")
        parser.add_argument("--output", default=str(ROOT / "bench" / "results.json"))
        parser.add_argument(
            "--timeout", type=float, default=900, help="give up waiting for plays after this many seconds"
        )

    # -- set up / tear down -----------------------------------------------------------

    def handle(self, *args: Any, **options: Any) -> None:
        import logging

        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("tenancy.audit").setLevel(logging.WARNING)  # one line per bench flow would bury the table
        # The bench measures the machinery with thousands of plays of one company at once and
        # no scheduler: the per-company limit of running plays would park most of them.
        os.environ["FLOWPLAY_MAX_RUNNING_PLAYS_PER_COMPANY"] = "0"  # the processes it starts
        settings.FLOWPLAY["MAX_RUNNING_PLAYS_PER_COMPANY"] = 0  # this one
        quick = options["quick"]
        self.opts = {
            "steps": options["steps"] or (10 if quick else 40),
            "step_ms": options["step_ms"],
            "plays": options["plays"] or (40 if quick else 1000),
            "trigger_plays": options["trigger_plays"] or (20 if quick else 500),
            "clients": options["clients"] if not quick else min(options["clients"], 4),
            "seconds": options["seconds"] or (1.5 if quick else 20.0),
            "history": options["history"] if options["history"] is not None else (5000 if quick else 1_000_000),
            "memory_plays": options["memory_plays"] or (40 if quick else 10_000),
            "repeat": options["repeat"] or (1 if quick else 5),
            "scaling": [1, 2] if quick else [1, 2, 4],
            "timeout": options["timeout"],
            "quick": quick,
        }
        only = [s.strip() for s in options["only"].split(",") if s.strip()]
        chosen = []
        for s in only or SCENARIOS:
            name = SCENARIOS[int(s) - 1] if s.isdigit() and 1 <= int(s) <= len(SCENARIOS) else s
            if name not in SCENARIOS:
                raise CommandError(f"unknown scenario {s!r}; choose from 1-8 or {', '.join(SCENARIOS)}")
            chosen.append(name)
        self.queue = f"bench-{secrets.token_hex(4)}"
        self.procs = Procs()
        self.results: dict[str, Any] = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "database": connection.vendor,
            "broker": settings.CELERY_BROKER_URL.split("://", 1)[0],
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "options": {k: v for k, v in self.opts.items()},
            "scenarios": {},
        }
        from plays.bench import cpu

        cpu.install()
        started = time.monotonic()
        try:
            self.setup_company()
            for name in chosen:
                self.stderr.write(f"-- {name}")
                t0 = time.monotonic()
                try:
                    self.results["scenarios"][name] = getattr(self, f"s_{name}")()
                except Exception as exc:  # noqa: BLE001  (one broken scenario must not hide the others)
                    self.results["scenarios"][name] = {"error": f"{type(exc).__name__}: {exc}"}
                self.results["scenarios"][name]["seconds"] = round(time.monotonic() - t0, 2)
        finally:
            self.procs.stop_all()
            if not options["keep"] and hasattr(self, "company"):
                self.cleanup()
            cpu.uninstall()
        self.results["total_seconds"] = round(time.monotonic() - started, 2)
        out = Path(options["output"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        self.stdout.write(table(self.results))
        errors = [n for n, r in self.results["scenarios"].items() if "error" in r]
        if errors:
            raise CommandError(f"scenarios failed: {', '.join(errors)} (see {out})")

    def setup_company(self) -> None:
        from tenancy.models import ApiKey, Company, User

        self.company, _ = Company.objects.get_or_create(slug="bench", defaults={"name": "bench"})
        self.user = User.objects.filter(username="bench").first() or User.objects.create_user(
            "bench", "bench@bench.invalid", secrets.token_urlsafe(24), company=self.company
        )
        _, self.token = ApiKey.issue(self.user, "bench")

    def cleanup(self) -> None:
        from django.db.models.deletion import ProtectedError

        from flows.models import Flow
        from plays.models import Event, Layer, Play

        company = self.company
        with transaction.atomic():
            Event.objects.filter(company=company).delete()
            Layer.objects.filter(play__company=company).delete()
            # Self references (retry_of, parent) are SET_NULL: delete in chunks by id.
            Play.objects.filter(company=company).update(parent=None, retry_of=None, parent_layer=None)
        with connection.cursor() as cur:
            cur.execute("DELETE FROM plays_play WHERE company_id = %s", [company.pk])
        try:
            from django_celery_results.models import TaskResult

            TaskResult.objects.filter(task_name__startswith="plays.bench.").delete()
        except Exception:  # noqa: BLE001
            pass
        try:
            for flow in Flow.objects.filter(company=company):
                flow.delete()
            self.user.delete()
            company.delete()
        except ProtectedError as exc:
            self.stderr.write(f"bench company kept: {exc}")

    def make_flow(self, layers: list[dict[str, Any]], name: str) -> Any:
        from rest_framework.test import APIClient

        from flows.models import Flow

        client = APIClient()
        client.force_authenticate(self.user)
        body = {"name": name, "layers": layers, "execution": {"queue": self.queue}}
        response = client.post("/api/flows", body, format="json")
        if response.status_code != 201:
            raise CommandError(f"cannot create bench flow: {response.status_code} {response.content[:300]!r}")
        return Flow.objects.get(pk=response.json()["id"])

    def workers(self, processes: int) -> subprocess.Popen:
        name = f"worker-{processes}-{len(self.procs.procs)}"
        proc = self.procs.start(
            name,
            [
                sys.executable,
                "-m",
                "plays.bench.worker",
                "-Q",
                self.queue,
                "-c",
                str(processes),
                "-P",
                "prefork",
                "--loglevel",
                "WARNING",
                "-n",
                f"{self.queue}-{processes}-{secrets.token_hex(2)}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
        )
        self.wait_ready(proc)
        return proc

    def wait_ready(self, proc: subprocess.Popen) -> None:
        """A worker is ready when it answers a bare task on the bench queue."""
        from plays.bench.cpu import bare_done

        result = bare_done.apply_async((0,), queue=self.queue)
        ends = time.monotonic() + 60
        while time.monotonic() < ends:
            if proc.poll() is not None:
                raise CommandError(f"bench worker exited with {proc.returncode}; see bench/logs/")
            if result.ready():
                return
            time.sleep(0.05)
        raise CommandError("bench worker did not start within 60 s")

    # -- measuring helpers ------------------------------------------------------------

    def wait_plays(self, ids: list[str]) -> None:
        from plays.models import Play

        pending = set(ids)
        ends = time.monotonic() + self.opts["timeout"]
        while pending:
            if time.monotonic() > ends:
                raise CommandError(f"{len(pending)} plays not finished within {self.opts['timeout']} s")
            chunk = list(pending)[:2000]
            done = set(Play.objects.filter(pk__in=chunk, state__in=TERMINAL).values_list("pk", flat=True))
            pending -= done
            if pending and not done:
                time.sleep(0.005 if len(ids) == 1 else 0.05)
        bad = Play.objects.filter(pk__in=ids).exclude(state="DONE").values_list("state", "error")[:3]
        if bad:
            raise CommandError(f"bench plays did not end DONE: {list(bad)}")

    def run_plays(self, flow: Any, count: int) -> tuple[float, list[str]]:
        """Trigger ``count`` plays at once; the seconds from the first trigger to the last completion."""
        from plays.models import Play

        ids = []
        for _ in range(count):
            play, _ = Play.trigger(flow, {}, user=self.user)
            ids.append(play.pk)
        self.wait_plays(ids)
        rows = Play.objects.filter(pk__in=ids).values_list("created_at", "completed_at")
        first = min(r[0] for r in rows)
        last = max(r[1] for r in rows)
        return (last - first).total_seconds(), ids

    def run_chains(self, count: int, steps: int, ms: float) -> float:
        """``count`` bare chains of ``steps`` tasks at once; seconds from the first send to the last end."""
        from celery import chain
        from django_celery_results.models import TaskResult

        from plays.bench.cpu import bare_done, bare_step

        t0 = timezone.now()
        results = []
        for _ in range(count):
            sig = [bare_step.si(ms).set(queue=self.queue) for _ in range(steps - 1)] + [
                bare_done.si(ms).set(queue=self.queue)
            ]
            results.append(chain(*sig).apply_async())
        ids = {r.id for r in results}
        ends = time.monotonic() + self.opts["timeout"]
        while True:
            done = list(
                TaskResult.objects.filter(task_id__in=ids, status="SUCCESS").values_list("date_done", flat=True)
            )
            if len(done) == len(ids):
                break
            if time.monotonic() > ends:
                raise CommandError("bare chains did not finish in time")
            time.sleep(0.005 if count == 1 else 0.05)
        return (max(done) - t0).total_seconds()

    # -- scenarios ----------------------------------------------------------------------

    def s_sequential(self) -> dict[str, Any]:
        from plays.models import Layer, Play

        steps, ms = self.opts["steps"], self.opts["step_ms"]
        flow = self.make_flow(
            [{"ref": f"s{i}", "appId": "bench-cpu", "args": {"ms": ms}} for i in range(steps)], "bench sequential"
        )
        worker = self.workers(1)
        walls, own, chains = [], [], []
        try:
            for _ in range(self.opts["repeat"]):
                wall, ids = self.run_plays(flow, 1)
                play = Play.objects.get(pk=ids[0])
                wall = (play.completed_at - play.created_at).total_seconds()
                outs = Layer.objects.filter(play=play).values_list("out", flat=True)
                walls.append(wall)
                own.append(sum(o["ms"] for o in outs if isinstance(o, dict)) / 1000.0)
                chains.append(self.run_chains(1, steps, ms))
        finally:
            self.procs.stop(worker)
        wall, own_s, chain_s = statistics.median(walls), statistics.median(own), statistics.median(chains)
        return {
            "steps": steps,
            "step_ms": ms,
            "runs": len(walls),
            "flowplay_wall_s": round(wall, 4),
            "steps_own_s": round(own_s, 4),
            "per_step_overhead_ms": round((wall - own_s) / steps * 1000, 2),
            "chain_wall_s": round(chain_s, 4),
            "chain_per_step_overhead_ms": round((chain_s - own_s) / steps * 1000, 2),
            "ratio_chain_over_flowplay": round(chain_s / wall, 2) if wall else None,
            "all_flowplay_wall_s": [round(w, 4) for w in walls],
            "all_chain_wall_s": [round(c, 4) for c in chains],
        }

    def noop_flow(self, steps: int = 5) -> Any:
        return self.make_flow(
            [{"ref": f"n{i}", "appId": "var", "args": {"values": {}}} for i in range(steps)], "bench no-op"
        )

    def s_throughput(self) -> dict[str, Any]:
        plays = self.opts["plays"]
        flow = self.noop_flow()
        worker = self.workers(2)
        try:
            wall, _ = self.run_plays(flow, plays)
            chain_wall = self.run_chains(plays, 5, 0)
        finally:
            self.procs.stop(worker)
        return {
            "plays": plays,
            "steps_per_play": 5,
            "workers": 2,
            "flowplay_s": round(wall, 3),
            "plays_per_s": round(plays / wall, 1),
            "steps_per_s": round(plays * 5 / wall, 1),
            "chain_s": round(chain_wall, 3),
            "chain_steps_per_s": round(plays * 5 / chain_wall, 1),
            "ratio_chain_over_flowplay": round(chain_wall / wall, 2),
        }

    def server(self, processes: int = 1, app: str = "flowplay.asgi:application") -> tuple[subprocess.Popen, str]:
        """The web server as in production (flowplay.serve: daphne processes on one socket)."""
        import httpx

        port = free_port()
        proc = self.procs.start(
            f"web-{port}",
            [sys.executable, "-m", "flowplay.serve", "--host", "127.0.0.1", "--port", str(port)]
            + ["--processes", str(processes), "--app", app],
        )
        url = f"http://127.0.0.1:{port}"
        ends = time.monotonic() + 60
        while time.monotonic() < ends:
            if proc.poll() is not None:
                raise CommandError(f"the web server exited with {proc.returncode}; see bench/logs/")
            try:
                if httpx.get(url + "/api/health", timeout=2).status_code < 500:
                    return proc, url
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise CommandError("the web server did not start within 60 s")

    def s_trigger(self) -> dict[str, Any]:
        import httpx

        from plays.models import Layer

        flow = self.make_flow([{"ref": "a", "appId": "var", "args": {"values": {}}}], "bench trigger")
        worker = self.workers(2)
        server, url = self.server()
        latencies, posts, errors = [], [], 0
        try:
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {self.token}"}, timeout=30) as client:
                for _ in range(self.opts["trigger_plays"]):
                    sent = timezone.now()
                    t0 = time.perf_counter()
                    response = client.post(f"/api/flows/{flow.pk}/run", json={"args": {}})
                    posts.append((time.perf_counter() - t0) * 1000)
                    if response.status_code >= 300:
                        errors += 1
                        continue
                    play_id = response.json()["playId"]
                    ends = time.monotonic() + 30
                    started = None
                    while started is None and time.monotonic() < ends:
                        started = (
                            Layer.objects.filter(play_id=play_id)
                            .order_by("started_at")
                            .values_list("started_at", flat=True)
                            .first()
                        )
                        if started is None:
                            # The latency is read from the worker's timestamp, not from when
                            # this loop sees it: poll gently, not to take CPU from the worker.
                            time.sleep(0.005)
                    if started is None:
                        errors += 1
                        continue
                    latencies.append((started - sent).total_seconds() * 1000)
        finally:
            self.procs.stop(server)
            self.procs.stop(worker)
        return {
            "plays": len(latencies),
            "errors": errors,
            "p50_ms": pct(latencies, 50),
            "p95_ms": pct(latencies, 95),
            "p99_ms": pct(latencies, 99),
            "post_p50_ms": pct(posts, 50),
        }

    def s_api(self) -> dict[str, Any]:
        import httpx

        flow = self.make_flow([{"ref": "a", "appId": "var", "args": {"values": {}}}], "bench api")
        worker = self.workers(2)
        server, url = self.server()
        clients, seconds = self.opts["clients"], self.opts["seconds"]

        async def load() -> dict[str, Any]:
            posts: list[float] = []
            gets: list[float] = []
            errors: list[str] = []
            ends = time.monotonic() + seconds
            limits = httpx.Limits(max_connections=clients)
            async with httpx.AsyncClient(
                base_url=url, headers={"Authorization": f"Bearer {self.token}"}, timeout=30, limits=limits
            ) as client:

                async def one() -> None:
                    while time.monotonic() < ends:
                        t0 = time.perf_counter()
                        try:
                            r = await client.post(f"/api/flows/{flow.pk}/run", json={"args": {}})
                        except httpx.HTTPError as exc:
                            errors.append(repr(exc))
                            continue
                        posts.append((time.perf_counter() - t0) * 1000)
                        if r.status_code >= 300:
                            errors.append(f"POST {r.status_code}")
                            continue
                        t0 = time.perf_counter()
                        try:
                            g = await client.get(f"/api/plays/{r.json()['playId']}")
                        except httpx.HTTPError as exc:
                            errors.append(repr(exc))
                            continue
                        gets.append((time.perf_counter() - t0) * 1000)
                        if g.status_code >= 300:
                            errors.append(f"GET {g.status_code}")

                t0 = time.monotonic()
                await asyncio.gather(*(one() for _ in range(clients)))
                took = time.monotonic() - t0
            return {
                "clients": clients,
                "seconds": round(took, 2),
                "requests": len(posts) + len(gets),
                "req_per_s": round((len(posts) + len(gets)) / took, 1),
                "post_p50_ms": pct(posts, 50),
                "post_p99_ms": pct(posts, 99),
                "get_p50_ms": pct(gets, 50),
                "get_p99_ms": pct(gets, 99),
                "errors": len(errors),
                "error_samples": errors[:5],
            }

        try:
            return asyncio.run(load())
        finally:
            self.procs.stop(server)
            self.procs.stop(worker)

    def s_history(self) -> dict[str, Any]:
        from django.test import Client

        from plays.models import Play

        total = self.opts["history"]
        flows = [
            self.make_flow([{"ref": "a", "appId": "var", "args": {"values": {}}}], f"bench history {i}")
            for i in range(100 if total >= 1000 else 2)
        ]
        versions = [f.snapshot() for f in flows]
        t0 = time.monotonic()
        self.bulk_plays(flows, versions, total)
        load_s = time.monotonic() - t0
        with connection.cursor() as cur:
            if connection.vendor == "postgresql":
                cur.execute("ANALYZE plays_play")
            else:
                cur.execute("ANALYZE")
        flow = flows[0]
        per_flow = Play.objects.filter(flow=flow).count()
        now = timezone.now()
        frm = (now - timedelta(days=20)).date().isoformat()
        to = (now - timedelta(days=10)).date().isoformat()
        deep = max(0, min(200, per_flow // 25 - 1))
        queries = {
            "state=FAIL": "?state=FAIL",
            "date range": f"?from={frm}&to={to}",
            "page=0": "?page=0",
            f"page={deep}": f"?page={deep}",
        }
        client = Client()
        client.force_login(self.user)
        requests = 200 if total >= 100_000 else 20
        timings: dict[str, Any] = {}
        for label, qs in queries.items():
            ms = []
            for _ in range(requests):
                t = time.perf_counter()
                r = client.get(f"/api/flows/{flow.pk}/plays{qs}")
                ms.append((time.perf_counter() - t) * 1000)
                if r.status_code != 200:
                    raise CommandError(f"GET plays{qs}: {r.status_code}")
            timings[label] = {"p50_ms": pct(ms, 50), "p95_ms": pct(ms, 95)}
        plans = self.explain(flow, now - timedelta(days=20), now - timedelta(days=10), deep)
        return {
            "plays": total,
            "flows": len(flows),
            "plays_per_flow": per_flow,
            "load_s": round(load_s, 2),
            "requests_each": requests,
            "timings": timings,
            "plans": plans,
        }

    def explain(self, flow: Any, frm: datetime, to: datetime, deep: int) -> dict[str, str]:
        from plays.models import Play

        base = Play.objects.filter(flow=flow).order_by("-created_at", "-id")
        qsets = {
            "state=FAIL": base.filter(state__in=["FAIL"]),
            "date range": base.filter(created_at__gte=frm, created_at__lt=to),
            "page=0": base,
            f"page={deep}": base,
        }
        plans = {}
        for label, qs in qsets.items():
            offset = deep * 25 if label.startswith("page=") and label != "page=0" else 0
            sql, params = qs[offset : offset + 25].query.sql_with_params()
            with connection.cursor() as cur:
                cur.execute(("EXPLAIN " if connection.vendor == "postgresql" else "EXPLAIN QUERY PLAN ") + sql, params)
                plans[label] = "\n".join(" ".join(str(c) for c in row) for row in cur.fetchall())
        return plans

    def bulk_plays(self, flows: list[Any], versions: list[Any], total: int) -> None:
        """Insert ``total`` terminal plays spread over ``flows`` and the last 60 days."""
        from plays.models import Play
        from tenancy.ids import new_id

        fields = [f for f in Play._meta.concrete_fields]
        columns = [f.column for f in fields]
        now = timezone.now()
        states = ["DONE"] * 8 + ["FAIL", "SKIP"]

        def rows() -> Any:
            for i in range(total):
                k = i % len(flows)
                created = now - timedelta(seconds=(i * 5184000 // max(total, 1)) + 1)
                state = states[i % len(states)]
                values = {
                    "id": new_id(),
                    "company_id": self.company.pk,
                    "flow_id": flows[k].pk,
                    "flow_version_id": versions[k].pk,
                    "state": state,
                    "args": "{}",
                    "args_hash": "0" * 64,
                    "created_at": created,
                    "started_at": created,
                    "completed_at": created + timedelta(milliseconds=30),
                    "updated_at": created,
                    "error": '{"code": "BENCH"}' if state == "FAIL" else None,
                    "next_index": 1,
                    "runner": "",
                }
                yield tuple(values.get(f.attname, None if f.null else f.get_default()) for f in fields)

        if connection.vendor == "postgresql":
            cols = ", ".join(f'"{c}"' for c in columns)
            with transaction.atomic(), connection.cursor() as cur:
                with cur.cursor.copy(f"COPY plays_play ({cols}) FROM STDIN") as copy:
                    for row in rows():
                        copy.write_row(row)
        else:
            cols = ", ".join(f'"{c}"' for c in columns)
            sql = f"INSERT INTO plays_play ({cols}) VALUES ({', '.join(['%s'] * len(columns))})"
            batch = []
            with transaction.atomic(), connection.cursor() as cur:
                for row in rows():
                    batch.append(tuple(v.isoformat() if isinstance(v, datetime) else v for v in row))
                    if len(batch) >= 10000:
                        cur.executemany(sql, batch)
                        batch = []
                if batch:
                    cur.executemany(sql, batch)

    def s_memory(self) -> dict[str, Any]:
        flow = self.noop_flow(3)
        worker = self.workers(1)
        try:
            self.run_plays(flow, min(20, self.opts["memory_plays"]))  # warm up
            start = rss_kib(worker.pid)
            samples = [start]
            n = self.opts["memory_plays"]
            chunk = max(1, n // 5)
            done = 0
            while done < n:
                k = min(chunk, n - done)
                self.run_plays(flow, k)
                done += k
                samples.append(rss_kib(worker.pid))
        finally:
            self.procs.stop(worker)
        return {
            "plays": n,
            "rss_start_mib": round(start / 1024, 1),
            "rss_end_mib": round(samples[-1] / 1024, 1),
            "growth_mib": round((samples[-1] - start) / 1024, 1),
            "samples_mib": [round(s / 1024, 1) for s in samples],
        }

    def s_scaling(self) -> dict[str, Any]:
        flow = self.noop_flow()
        plays = max(20, self.opts["plays"] // 2)
        out = {}
        done = self.results["scenarios"].get("throughput", {})
        for n in self.opts["scaling"]:
            if self.opts["quick"] and n == 2 and "steps_per_s" in done:
                out[str(n)] = done["steps_per_s"]  # --quick: scenario 2 measured 2 processes already
                continue
            worker = self.workers(n)
            try:
                wall, _ = self.run_plays(flow, plays)
            finally:
                self.procs.stop(worker)
            out[str(n)] = round(plays * 5 / wall, 1)
        return {"plays": plays, "steps_per_s": out}

    def s_floor(self) -> dict[str, Any]:
        """POST /run against the API floor (a bare DRF view that inserts and commits one
        row, plays/bench/floor.py) on the same server in the same run, with 1 and 2 web
        processes, while 2 worker processes run the triggered plays."""
        import httpx

        from plays.bench import floor

        floor.create_table()
        flow = self.make_flow([{"ref": "a", "appId": "var", "args": {"values": {}}}], "bench floor")
        worker = self.workers(2)
        clients, seconds = self.opts["clients"], min(self.opts["seconds"], 10.0)
        serial = 20 if self.opts["quick"] else 200
        paths = {"floor": "/bench/floor", "run": f"/api/flows/{flow.pk}/run"}
        out: dict[str, Any] = {}

        async def load(url: str, target: str) -> dict[str, Any]:
            latencies: list[float] = []
            errors = 0
            ends = time.monotonic() + seconds
            async with httpx.AsyncClient(
                base_url=url,
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=30,
                limits=httpx.Limits(max_connections=clients),
            ) as client:

                async def one() -> None:
                    nonlocal errors
                    while time.monotonic() < ends:
                        t0 = time.perf_counter()
                        try:
                            r = await client.post(target, json={"args": {}})
                        except httpx.HTTPError:
                            errors += 1
                            continue
                        latencies.append((time.perf_counter() - t0) * 1000)
                        errors += r.status_code >= 300

                t0 = time.monotonic()
                await asyncio.gather(*(one() for _ in range(clients)))
                took = time.monotonic() - t0
            return {"req_per_s": round(len(latencies) / took, 1), "p50_ms": pct(latencies, 50), "errors": errors}

        try:
            for processes in (1, 2):
                server, url = self.server(processes, "plays.bench.floor:application")
                row: dict[str, Any] = {}
                try:
                    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {self.token}"}) as client:
                        for name, target in paths.items():
                            times = []
                            for _ in range(serial):
                                t0 = time.perf_counter()
                                r = client.post(target, json={"args": {}})
                                times.append((time.perf_counter() - t0) * 1000)
                                if r.status_code >= 300:
                                    raise CommandError(f"POST {target}: {r.status_code} {r.text[:200]}")
                            row[f"{name}_serial_p50_ms"] = pct(times, 50)
                    for name, target in paths.items():
                        row[f"{name}_{clients}_clients"] = asyncio.run(load(url, target))
                finally:
                    self.procs.stop(server)
                row["run_over_floor_req_per_s"] = round(
                    row[f"run_{clients}_clients"]["req_per_s"] / max(row[f"floor_{clients}_clients"]["req_per_s"], 0.1),
                    2,
                )
                row["run_over_floor_serial_p50"] = round(
                    row["run_serial_p50_ms"] / max(row["floor_serial_p50_ms"], 0.01), 2
                )
                out[str(processes)] = row
        finally:
            self.procs.stop(worker)
            floor.drop_table()
        return {"clients": clients, "seconds": seconds, "serial": serial, "web_processes": out}


def table(results: dict[str, Any]) -> str:
    s = results["scenarios"]
    lines = [
        f"flowplay bench — {results['database']} + {results['broker']} broker, {results['machine']['cpus']} CPUs, {results['date']}",
        "",
        "| scenario | measure | flowplay | bare Celery | ratio (chain/flowplay) |",
        "|---|---|---|---|---|",
    ]

    def err(name: str) -> bool:
        if name in s and "error" in s[name]:
            lines.append(f"| {name} | error | {s[name]['error'][:80]} | | |")
            return True
        return name not in s

    if not err("sequential"):
        r = s["sequential"]
        lines.append(
            f"| 1 sequential {r['steps']}×{r['step_ms']:g} ms | wall | {r['flowplay_wall_s']:.3f} s | {r['chain_wall_s']:.3f} s | {r['ratio_chain_over_flowplay']} |"
        )
        lines.append(
            f"| | per-step overhead | {r['per_step_overhead_ms']} ms | {r['chain_per_step_overhead_ms']} ms | |"
        )
    if not err("throughput"):
        r = s["throughput"]
        lines.append(
            f"| 2 no-op {r['plays']}×5, 2 workers | steps/s | {r['steps_per_s']} ({r['plays_per_s']} plays/s) | {r['chain_steps_per_s']} | {r['ratio_chain_over_flowplay']} |"
        )
    if not err("trigger"):
        r = s["trigger"]
        lines.append(
            f"| 3 trigger → first step ({r['plays']} plays) | p50 / p95 / p99 | {r['p50_ms']} / {r['p95_ms']} / {r['p99_ms']} ms | | |"
        )
    if not err("api"):
        r = s["api"]
        lines.append(
            f"| 4 API, {r['clients']} clients {r['seconds']} s | req/s, errors | {r['req_per_s']}, {r['errors']} errors | | |"
        )
        lines.append(f"| | POST /run p50 / p99 | {r['post_p50_ms']} / {r['post_p99_ms']} ms | | |")
        lines.append(f"| | GET /plays/{{id}} p50 / p99 | {r['get_p50_ms']} / {r['get_p99_ms']} ms | | |")
    if not err("history"):
        r = s["history"]
        lines.append(f"| 5 history, {r['plays']:,} plays / {r['flows']} flows | bulk load | {r['load_s']} s | | |")
        for label, t in r["timings"].items():
            lines.append(f"| | GET plays {label} p50 / p95 | {t['p50_ms']} / {t['p95_ms']} ms | | |")
    if not err("memory"):
        r = s["memory"]
        lines.append(
            f"| 6 memory, {r['plays']:,} plays | worker RSS start → end | {r['rss_start_mib']} → {r['rss_end_mib']} MiB ({r['growth_mib']:+} MiB) | | |"
        )
    if not err("scaling"):
        r = s["scaling"]
        lines.append(
            f"| 7 scaling ({r['plays']}×5 no-op) | steps/s by workers | "
            + ", ".join(f"{k}: {v}" for k, v in r["steps_per_s"].items())
            + " | | |"
        )
    if not err("floor"):
        r = s["floor"]
        c = r["clients"]
        for n, w in r["web_processes"].items():
            run, floor = w[f"run_{c}_clients"], w[f"floor_{c}_clients"]
            lines.append(
                f"| 8 API floor, {n} web process{'es' if n != '1' else ''}, {c} clients | POST /run req/s vs floor (p50) | "
                f"{run['req_per_s']} ({run['p50_ms']} ms) | floor {floor['req_per_s']} ({floor['p50_ms']} ms) | "
                f"{w['run_over_floor_req_per_s']} (run/floor) |"
            )
            lines.append(
                f"| | serial POST p50 | {w['run_serial_p50_ms']} ms | floor {w['floor_serial_p50_ms']} ms | "
                f"{w['run_over_floor_serial_p50']}× |"
            )
    return "\n".join(lines) + "\n"
