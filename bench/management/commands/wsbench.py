"""Load check of the WebSocket: N clients each receive every event of M concurrent plays.

Runs against a server over HTTP and WebSocket only (it touches no database itself), so it
measures what a client sees: ``python manage.py wsbench --url http://host:4454 --token
<api key>``. Each client subscribes with ``?flowId=`` to a flow made for the run; when
every play has ended, each client's events are compared, play by play, with the stored
ones from ``GET /api/plays/{id}/events``: same events, same order, nothing lost, nothing
twice. Latency is the time from an event's ``timestamp`` (its ``created_at``, taken
before its transaction commits) to its arrival at the client.

The client disturbs the server as little as it can: it learns that the plays ended from
the stream itself (the API is asked only to confirm), and it keeps each message's text
and arrival time, parsing them after the run. The floor, measured in the same run
and the same event loop as the clients: a bare Redis pub/sub round trip (``--redis``,
default ``REDIS_URL``), which also shows how late this busy loop reads what arrived.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import statistics
import time
from datetime import datetime
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import httpx
from django.core.management.base import BaseCommand, CommandError

TERMINAL = {"DONE", "FAIL", "SKIP", "FILTERED"}


class Command(BaseCommand):
    help = "N WebSocket clients x M concurrent plays: checks order, loss and duplicates; prints figures."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--url", default="http://127.0.0.1:4454", help="the server (default %(default)s)")
        parser.add_argument("--token", required=True, help="an API key of the user to run as")
        parser.add_argument("--clients", type=int, default=50, help="WebSocket clients (default %(default)s)")
        parser.add_argument("--plays", type=int, default=200, help="plays started at once (default %(default)s)")
        parser.add_argument("--steps", type=int, default=3, help="var steps per play (default %(default)s)")
        parser.add_argument("--timeout", type=float, default=600, help="give up after this many seconds")
        parser.add_argument("--redis", default=None, help="Redis for the floor (default REDIS_URL; '' for none)")

    def handle(self, *args: Any, **options: Any) -> None:
        # One INFO line per HTTP request would bury the table.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        if options["clients"] < 1 or options["plays"] < 1 or options["steps"] < 1:
            raise CommandError("--clients, --plays and --steps must be at least 1")
        from django.conf import settings

        redis_url = settings.REDIS_URL if options["redis"] is None else options["redis"]
        result = asyncio.run(
            bench(
                options["url"].rstrip("/"),
                options["token"],
                options["clients"],
                options["plays"],
                options["steps"],
                options["timeout"],
                redis_url,
            )
        )
        self.stdout.write(table(result))
        problems = result["lost"] + result["duplicates"] + result["out of order"] + result["unexpected"]
        if problems:
            raise CommandError(f"{problems} delivery problems: {result['details'][:5]}")


def ws_base(url: str) -> str:
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme)
    if scheme is None:
        raise CommandError(f"--url must be http:// or https://, not {url!r}")
    return urlunsplit((scheme, parts.netloc, "/api/ws", "", ""))


def parse_ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def ended(message: dict[str, Any]) -> bool:
    kind = message.get("type")
    return kind in ("play:completed", "play:failed") or (kind == "play:state" and message.get("state") in TERMINAL)


class Floor:
    """A bare Redis pub/sub round trip every 20 ms, published and received in this
    process's event loop: the machine's and this client's share of the latency."""

    def __init__(self, redis_url: str):
        self.redis_url = redis_url
        self.latencies: list[float] = []
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        if self.redis_url:
            from redis import asyncio as aioredis

            self.redis = aioredis.Redis.from_url(self.redis_url)
            self.pubsub = self.redis.pubsub()
            self.channel = f"wsbench.floor.{secrets.token_hex(6)}"
            await self.pubsub.subscribe(self.channel)
            self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async def publish() -> None:
            while True:
                await self.redis.publish(self.channel, repr(time.time()))
                await asyncio.sleep(0.02)

        publisher = asyncio.create_task(publish())
        try:
            async for message in self.pubsub.listen():
                if message["type"] == "message":
                    self.latencies.append((time.time() - float(message["data"])) * 1000)
        finally:
            publisher.cancel()

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            await self.pubsub.aclose()
            await self.redis.aclose()


async def bench(
    url: str, token: str, n_clients: int, n_plays: int, steps: int, timeout: float, redis_url: str = ""
) -> dict[str, Any]:
    from websockets.asyncio.client import connect

    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=60, limits=httpx.Limits(max_connections=20)
    ) as http:
        r = await http.post(
            "/api/flows",
            json={
                "name": f"wsbench {secrets.token_hex(4)}",
                "category": "wsbench",
                "layers": [
                    {"ref": f"step{i}", "appId": "var", "args": {"values": {"i": i, "play": "{{ $playId }}"}}}
                    for i in range(steps)
                ],
            },
        )
        if r.status_code != 201:
            raise CommandError(f"could not create the bench flow: {r.status_code} {r.text[:300]}")
        flow_id = r.json()["id"]
        query = urlencode({"token": token, "flowId": flow_id})
        raw_received: list[list[tuple[str | bytes, float]]] = [[] for _ in range(n_clients)]
        sockets = []
        floor = Floor(redis_url)
        seen_ended: set[str] = set()
        all_seen = asyncio.Event()
        play_ids: list[str] = []
        try:
            for _ in range(n_clients):
                sockets.append(await connect(f"{ws_base(url)}?{query}", max_size=None, open_timeout=60))
            await floor.start()
            started = time.monotonic()

            async def listen(i: int) -> None:
                ws, into = sockets[i], raw_received[i]
                async for raw in ws:
                    into.append((raw, time.time()))
                    if i == 0:  # one client tells when the plays have ended
                        message = json.loads(raw)
                        if ended(message):
                            seen_ended.add(message["playId"])
                            if play_ids and seen_ended.issuperset(play_ids):
                                all_seen.set()

            listeners = [asyncio.create_task(listen(i)) for i in range(n_clients)]
            sem = asyncio.Semaphore(20)

            async def trigger(k: int) -> str:
                async with sem:
                    r = await http.post(f"/api/flows/{flow_id}/run", json={"args": {"k": k}})
                    if r.status_code != 201:
                        raise CommandError(f"run failed: {r.status_code} {r.text[:300]}")
                    return r.json()["playId"]

            play_ids += await asyncio.gather(*(trigger(k) for k in range(n_plays)))
            if seen_ended.issuperset(play_ids):
                all_seen.set()

            async def all_ended() -> None:
                await all_seen.wait()
                pending = set(play_ids)
                while pending:
                    for play_id in list(pending)[:50]:
                        r = await http.get(f"/api/plays/{play_id}")
                        if r.status_code == 200 and r.json()["state"] in TERMINAL:
                            pending.discard(play_id)
                    if pending:
                        await asyncio.sleep(0.5)

            try:
                await asyncio.wait_for(all_ended(), timeout)
            except TimeoutError:
                raise CommandError(f"plays did not end within {timeout} s") from None
            expected = {}
            for play_id in play_ids:
                r = await http.get(f"/api/plays/{play_id}/events")
                expected[play_id] = [e["cursor"] for e in r.json()]
            stored = sum(len(v) for v in expected.values())
            # Wait (bounded) until every client has every stored event, then stop listening.
            deadline = time.monotonic() + min(timeout, 120)
            while time.monotonic() < deadline and any(len(r) < stored for r in raw_received):
                await asyncio.sleep(0.1)
            finished = time.monotonic()
            for task in listeners:
                task.cancel()
        finally:
            await floor.stop()
            for ws in sockets:
                await ws.close()
    received = [[(json.loads(raw), arrived) for raw, arrived in events] for events in raw_received]

    # Cursors are company-wide and sort as strings; seq numbers only one play's events.
    wanted = {cursor: play_id for play_id, cursors in expected.items() for cursor in cursors}
    lost = duplicates = out_of_order = unexpected = 0
    details: list[str] = []
    latencies: list[float] = []
    by_type: dict[str, list[float]] = {}
    delivered = 0
    for i, events in enumerate(received):
        seqs = [e["cursor"] for e, _ in events]
        delivered += len(seqs)
        if len(seqs) != len(set(seqs)):
            duplicates += len(seqs) - len(set(seqs))
            details.append(f"client {i}: duplicates")
        if seqs != sorted(seqs):
            out_of_order += 1
            details.append(f"client {i}: out of order")
        extra = [s for s in seqs if s not in wanted]
        if extra:
            unexpected += len(extra)
            details.append(f"client {i}: {len(extra)} events of other plays")
        per_play: dict[str, list[str]] = {}
        for seq in seqs:
            if seq in wanted:
                per_play.setdefault(wanted[seq], []).append(seq)
        for play_id, want in expected.items():
            got = per_play.get(play_id, [])
            if got != want:
                missing = len(set(want) - set(got))
                lost += missing
                if missing:
                    details.append(f"client {i}: play {play_id} lost {missing}")
        for e, arrived in events:
            latency = (arrived - parse_ts(e["timestamp"])) * 1000
            latencies.append(latency)
            by_type.setdefault(e.get("type", "?"), []).append(latency)
    elapsed = max(finished - started, 1e-9)
    q = percentiles(latencies)
    fq = percentiles(floor.latencies)
    return {
        "clients": n_clients,
        "plays": n_plays,
        "steps": steps,
        "events stored": stored,
        "events delivered": delivered,
        "seconds": round(elapsed, 2),
        "events/s": round(delivered / elapsed),
        "p50 ms": round(q[49], 1),
        "p99 ms": round(q[98], 1),
        "max ms": round(max(latencies, default=0.0), 1),
        "floor p50 ms": round(fq[49], 1) if floor.latencies else "-",
        "floor p99 ms": round(fq[98], 1) if floor.latencies else "-",
        "lost": lost,
        "duplicates": duplicates,
        "out of order": out_of_order,
        "unexpected": unexpected,
        "details": details,
        "by type": {
            kind: {"events": len(values), "p50 ms": round(percentiles(values)[49], 1), "p99 ms": round(percentiles(values)[98], 1)}
            for kind, values in sorted(by_type.items())
        },
    }


def percentiles(values: list[float]) -> list[float]:
    return statistics.quantiles(values, n=100) if len(values) >= 2 else [values[0] if values else 0.0] * 99


def table(result: dict[str, Any]) -> str:
    columns = [
        "clients",
        "plays",
        "steps",
        "events stored",
        "events delivered",
        "seconds",
        "events/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "floor p50 ms",
        "floor p99 ms",
        "lost",
        "duplicates",
        "out of order",
    ]
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---:" for _ in columns) + "|"
    row = "| " + " | ".join(str(result[c]) for c in columns) + " |"
    kinds = ["", "| event type | delivered | p50 ms | p99 ms |", "|---|---:|---:|---:|"] + [
        f"| {kind} | {v['events']} | {v['p50 ms']} | {v['p99 ms']} |" for kind, v in result.get("by type", {}).items()
    ]
    return "\n".join([head, rule, row, *kinds]) + "\n"
