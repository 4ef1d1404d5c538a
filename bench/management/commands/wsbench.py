"""Load check of the WebSocket: N clients each receive every event of M concurrent plays.

Runs against a server over HTTP and WebSocket only (it touches no database itself), so it
measures what a client sees: ``python manage.py wsbench --url http://host:4454 --token
<api key>``. Each client subscribes with ``?flowId=`` to a flow made for the run; when
every play has ended, each client's events are compared, play by play, with the stored
ones from ``GET /api/plays/{id}/events``: same events, same order, nothing lost, nothing
twice. Latency is the time from an event's ``timestamp`` (its ``created_at``, taken
before its transaction commits) to its arrival at the client.
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

    def handle(self, *args: Any, **options: Any) -> None:
        # One INFO line per HTTP request would bury the table.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        if options["clients"] < 1 or options["plays"] < 1 or options["steps"] < 1:
            raise CommandError("--clients, --plays and --steps must be at least 1")
        result = asyncio.run(
            bench(
                options["url"].rstrip("/"),
                options["token"],
                options["clients"],
                options["plays"],
                options["steps"],
                options["timeout"],
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


async def bench(url: str, token: str, n_clients: int, n_plays: int, steps: int, timeout: float) -> dict[str, Any]:
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
        received: list[list[tuple[dict[str, Any], float]]] = [[] for _ in range(n_clients)]
        sockets = []
        try:
            for _ in range(n_clients):
                sockets.append(await connect(f"{ws_base(url)}?{query}", max_size=None, open_timeout=60))
            started = time.monotonic()

            async def listen(i: int) -> None:
                ws = sockets[i]
                async for raw in ws:
                    received[i].append((json.loads(raw), time.time()))

            listeners = [asyncio.create_task(listen(i)) for i in range(n_clients)]
            sem = asyncio.Semaphore(20)

            async def trigger(k: int) -> str:
                async with sem:
                    r = await http.post(f"/api/flows/{flow_id}/run", json={"args": {"k": k}})
                    if r.status_code != 201:
                        raise CommandError(f"run failed: {r.status_code} {r.text[:300]}")
                    return r.json()["playId"]

            play_ids = await asyncio.gather(*(trigger(k) for k in range(n_plays)))

            async def all_ended() -> None:
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
            while time.monotonic() < deadline and any(len(r) < stored for r in received):
                await asyncio.sleep(0.1)
            finished = time.monotonic()
            for task in listeners:
                task.cancel()
        finally:
            for ws in sockets:
                await ws.close()

    # Cursors are company-wide and sort as strings; seq numbers only one play's events.
    wanted = {cursor: play_id for play_id, cursors in expected.items() for cursor in cursors}
    lost = duplicates = out_of_order = unexpected = 0
    details: list[str] = []
    latencies: list[float] = []
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
        latencies += [(arrived - parse_ts(e["timestamp"])) * 1000 for e, arrived in events]
    elapsed = max(finished - started, 1e-9)
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [latencies[0] if latencies else 0.0] * 99
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
        "lost": lost,
        "duplicates": duplicates,
        "out of order": out_of_order,
        "unexpected": unexpected,
        "details": details,
    }


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
        "lost",
        "duplicates",
        "out of order",
    ]
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---:" for _ in columns) + "|"
    row = "| " + " | ".join(str(result[c]) for c in columns) + " |"
    return "\n".join([head, rule, row]) + "\n"
