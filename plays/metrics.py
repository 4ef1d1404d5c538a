"""Prometheus metrics at ``/metrics``.

Counters and histograms are counted where things happen, in whichever process that is
(web, worker, its prefork children, the scheduler), with ``prometheus_client``'s
multiprocess mode: each process writes its values to files in ``PROMETHEUS_MULTIPROC_DIR``
(``var/metrics`` by default, set in settings) and the scrape sums them. Files of processes
that are gone are removed when a web or worker process starts (``clean_multiproc_dir``), so
a restart begins from zero as Prometheus expects.

Gauges that are facts in the database (queue depth, the oldest waiting play, deferred
backlog, approvals, live workers) are read at scrape time by ``DatabaseCollector``.

Labels stay bounded: no play ids; flows by permanentId, at most ``METRICS_MAX_FLOWS``
distinct ones per process (the rest are ``other``); modules by appId; routes by URL pattern.

Access: the bearer token ``FLOWPLAY_METRICS_TOKEN``, or a client address in
``FLOWPLAY_METRICS_ALLOW`` (CIDRs; loopback by default).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

log = logging.getLogger(__name__)

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
PLAY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)

PLAYS_STARTED = Counter("flowplay_plays_started", "Plays that started running (play:started).", ["flow"])
PLAYS_TRIGGERED = Counter(
    "flowplay_plays_triggered",
    "Plays created, by what started them: api, schedule (a schedule's fire), channel (an HTTP channel "
    "request), mcp (a tool call), subflow, retry.",
    ["trigger"],
)
PLAYS_FINISHED = Counter("flowplay_plays_finished", "Plays that ended, by final state.", ["flow", "state"])
PLAY_DURATION = Histogram(
    "flowplay_play_duration_seconds", "From a play's start to its end.", ["flow", "state"], buckets=PLAY_BUCKETS
)
STEP_DURATION = Histogram(
    "flowplay_step_duration_seconds",
    "A step's run in a worker (its attempts and in-worker retry waits), by module and outcome.",
    ["module", "outcome"],
    buckets=STEP_BUCKETS,
)
START_LATENCY = Histogram(
    "flowplay_play_start_latency_seconds",
    "From a play's start (its trigger, or the release of a deferred play) to its first step running.",
    buckets=LATENCY_BUCKETS,
)
REAPED = Counter(
    "flowplay_reaper_requeues",
    "Plays and iterations the reaper requeued: reason lease_expired (the runner died) or task_lost.",
    ["kind", "reason"],
)
WS_CONNECTIONS = Gauge("flowplay_ws_connections", "Open WebSocket connections.", multiprocess_mode="livesum")
WS_EVENT_LAG = Histogram(
    "flowplay_ws_event_delivery_seconds",
    "From an event's commit to its send on a WebSocket (replays older than 10 min are not counted).",
    buckets=LATENCY_BUCKETS,
)
HTTP_LATENCY = Histogram(
    "flowplay_http_request_duration_seconds",
    "HTTP requests by route pattern, method and status class.",
    ["route", "method", "status"],
    buckets=LATENCY_BUCKETS,
)

FINAL = {"play:completed", "play:failed"}
REPLAY_SECONDS = 600


# --- multiprocess files ----------------------------------------------------------------


def multiproc_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_multiproc_dir(path: str | None = None) -> int:
    """Remove the value files of processes that no longer run (a previous start's). Called
    when a web or worker process starts; the files of live processes are never touched."""
    path = path or multiproc_dir()
    if not path or not os.path.isdir(path):
        return 0
    removed = 0
    for name in os.listdir(path):
        if not name.endswith(".db"):
            continue
        try:
            pid = int(name.rsplit("_", 1)[-1].removesuffix(".db"))
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            try:
                os.remove(os.path.join(path, name))
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def process_exited(pid: int) -> None:
    """A prefork child ended: drop its live gauges (its counters stay summed)."""
    if multiproc_dir():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


# --- flow labels -----------------------------------------------------------------------

_flow_labels: dict[str, str] = {}
_flow_lock = threading.Lock()


def flow_label(flow_id: str | None) -> str:
    """The flow's permanentId, for at most METRICS_MAX_FLOWS flows in this process."""
    if not flow_id:
        return "unknown"
    found = _flow_labels.get(flow_id)
    if found is not None:
        return found
    from flows.models import Flow

    permanent = Flow.objects.filter(pk=flow_id).values_list("permanent_id", flat=True).first() or "unknown"
    with _flow_lock:
        distinct = set(_flow_labels.values())
        cap = int(settings.FLOWPLAY.get("METRICS_MAX_FLOWS", 100))
        label = permanent if permanent in distinct or len(distinct) < cap else "other"
        if len(_flow_labels) < 10 * cap:
            _flow_labels[flow_id] = label
    return label


# --- counting ----------------------------------------------------------------------------


def observe_events(payloads: list[dict[str, Any]]) -> None:
    """Count the play events a transaction committed (plays started and finished)."""
    for payload in payloads:
        kind = payload.get("type")
        if kind == "play:started":
            PLAYS_STARTED.labels(flow_label(payload.get("flowId"))).inc()
        elif kind in FINAL or (kind == "play:state" and payload.get("state") in {"SKIP", "FILTERED"}):
            state = payload.get("state") or ("DONE" if kind == "play:completed" else "FAIL")
            flow = flow_label(payload.get("flowId"))
            PLAYS_FINISHED.labels(flow, state).inc()
            if payload.get("duration") is not None:
                PLAY_DURATION.labels(flow, state).observe(payload["duration"] / 1000)


def events_committed(payloads: list[dict[str, Any]]) -> None:
    """Hooked into ``plays.outbox.publish_on_commit``: count after the commit."""
    from django.db import transaction

    def count() -> None:
        try:
            observe_events(payloads)
        except Exception:  # metrics must never break a play
            log.warning("could not count events", exc_info=True)

    transaction.on_commit(count)


def play_created(kind: str) -> None:
    """A play was created (counted once its transaction commits)."""
    from django.db import transaction

    from .models import TriggerKind

    label = kind if kind in TriggerKind.values else "other"
    transaction.on_commit(lambda: PLAYS_TRIGGERED.labels(label).inc())


def reaped(kind: str, lease_expired: bool) -> None:
    REAPED.labels(kind, "lease_expired" if lease_expired else "task_lost").inc()


# --- scrape-time gauges from the database ------------------------------------------------


def _age(now: datetime, then: datetime | None) -> float:
    return max(0.0, (now - then).total_seconds()) if then is not None else 0.0


class DatabaseCollector:
    """Gauges read from the database at each scrape."""

    def collect(self) -> Any:
        from django.db.models import Case, Count, F, Min, Q, When
        from django.db.models.fields.json import KeyTextTransform, KeyTransform

        from .models import Play, State
        from .workers import DEFAULT_QUEUE, live_queues, wanted_queues

        now = timezone.now()
        depth = GaugeMetricFamily(
            "flowplay_queue_depth",
            "Plays sent to a queue and not yet taken by a worker (RUN, no runner).",
            labels=["queue"],
        )
        running = GaugeMetricFamily(
            "flowplay_queue_running", "Plays a worker is running now, by queue.", labels=["queue"]
        )
        oldest = GaugeMetricFamily(
            "flowplay_queue_oldest_waiting_seconds",
            "Age of the oldest play waiting for a worker: since its start if no step ran yet, else since it was last queued.",
            labels=["queue"],
        )
        consumers = GaugeMetricFamily(
            "flowplay_queue_workers", "Live workers consuming the queue (seen in the last 30 s).", labels=["queue"]
        )
        live = live_queues(now)
        queues = wanted_queues() | set(live)
        stats: dict[str, dict[str, Any]] = {q: {"waiting": 0, "running": 0, "oldest": None} for q in queues}
        rows = (
            Play.objects.filter(state=State.RUN)
            .annotate(queue=KeyTextTransform("queue", KeyTransform("execution", "flow_version__definition")))
            .values("queue")
            .annotate(
                waiting=Count("pk", filter=Q(runner="")),
                total=Count("pk"),
                oldest=Min(
                    Case(When(next_index=0, started_at__isnull=False, then=F("started_at")), default=F("updated_at")),
                    filter=Q(runner=""),
                ),
            )
        )
        for row in rows:
            queue = row["queue"] or DEFAULT_QUEUE
            entry = stats.setdefault(queue, {"waiting": 0, "running": 0, "oldest": None})
            entry["waiting"] += row["waiting"]
            entry["running"] += row["total"] - row["waiting"]
            if row["oldest"] is not None and (entry["oldest"] is None or row["oldest"] < entry["oldest"]):
                entry["oldest"] = row["oldest"]
        for queue, entry in sorted(stats.items()):
            depth.add_metric([queue], entry["waiting"])
            running.add_metric([queue], entry["running"])
            oldest.add_metric([queue], _age(now, entry["oldest"]))
            consumers.add_metric([queue], live.get(queue, 0))
        yield from (depth, running, oldest, consumers)

        broker = GaugeMetricFamily(
            "flowplay_broker_messages", "Messages waiting in the broker's queue (Celery tasks).", labels=["queue"]
        )
        for queue, n in broker_depths(sorted(stats)).items():
            broker.add_metric([queue], n)
        yield broker

        deferred = GaugeMetricFamily(
            "flowplay_deferred_plays",
            "DEFERRED plays: due (run_at passed, not released yet), scheduled (run_at ahead), slot (waiting for maxConcurrency).",
            labels=["kind"],
        )
        base = Play.objects.filter(state=State.DEFERRED)
        counts = base.aggregate(
            due=Count("pk", filter=Q(run_at__lte=now)),
            scheduled=Count("pk", filter=Q(run_at__gt=now)),
            slot=Count("pk", filter=Q(run_at__isnull=True)),
            oldest_due=Min("run_at", filter=Q(run_at__lte=now)),
        )
        for kind in ("due", "scheduled", "slot"):
            deferred.add_metric([kind], counts[kind] or 0)
        yield deferred
        yield GaugeMetricFamily(
            "flowplay_deferred_release_lag_seconds",
            "How late the oldest due DEFERRED play is (now − its run_at); 0 when none is due.",
            value=_age(now, counts["oldest_due"]),
        )
        yield GaugeMetricFamily(
            "flowplay_plays_waiting_approval",
            "Plays in WAIT for an approval.",
            value=Play.objects.filter(state=State.WAIT).count(),
        )
        yield GaugeMetricFamily(
            "flowplay_plays_on_hold",
            "Plays an operator put ON_HOLD.",
            value=Play.objects.filter(state=State.ON_HOLD).count(),
        )
        yield GaugeMetricFamily("flowplay_workers_live", "Workers seen in the last 30 s.", value=len(_live_names(now)))


def _live_names(now: datetime) -> list[str]:
    from .workers import live_workers

    return [w.name for w in live_workers(now)]


def broker_depths(queues: list[str]) -> dict[str, int]:
    """Messages per queue in the broker: files of the filesystem transport, or Redis lists."""
    url = settings.CELERY_BROKER_URL
    depths: dict[str, int] = {}
    try:
        if url.startswith("filesystem://"):
            folder = Path(settings.CELERY_BROKER_TRANSPORT_OPTIONS.get("data_folder_in") or ".")
            names = os.listdir(folder) if folder.is_dir() else []
            for queue in queues:
                suffix = f".{queue}.msg"
                depths[queue] = sum(1 for name in names if name.endswith(suffix) and not name.startswith("."))
        elif url.startswith(("redis://", "rediss://")):
            import redis

            client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
            try:
                with client.pipeline(transaction=False) as pipe:
                    for queue in queues:
                        pipe.llen(queue)
                    depths = dict(zip(queues, pipe.execute(), strict=True))
            finally:
                client.close()
    except Exception:  # the broker is down: /api/ready says so; the other gauges still count
        log.warning("could not read the broker's queue lengths", exc_info=True)
        return {}
    return depths


# --- the endpoint ------------------------------------------------------------------------


def allowed(request: HttpRequest) -> bool:
    token = settings.FLOWPLAY.get("METRICS_TOKEN") or ""
    header = request.headers.get("Authorization", "")
    if token and header.startswith("Bearer ") and _same(header[7:].strip(), token):
        return True
    try:
        address = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    for network in settings.FLOWPLAY.get("METRICS_ALLOW", []):
        try:
            if address in ipaddress.ip_network(network, strict=False):
                return True
        except ValueError:
            log.warning("FLOWPLAY_METRICS_ALLOW: %r is not a network", network)
    return False


def _same(a: str, b: str) -> bool:
    import hmac

    return hmac.compare_digest(a.encode(), b.encode())


def registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    path = multiproc_dir()
    if path:
        os.makedirs(path, exist_ok=True)
        MultiProcessCollector(reg, path=path)
    reg.register(DatabaseCollector())
    return reg


def metrics_view(request: HttpRequest) -> HttpResponse:
    from flows.api import body

    if request.method not in ("GET", "HEAD"):
        return JsonResponse(body("METHOD_NOT_ALLOWED", f"Method {request.method} not allowed", 405), status=405)
    if not allowed(request):
        return JsonResponse(
            body("FORBIDDEN", "Metrics need FLOWPLAY_METRICS_TOKEN as a bearer token or an allowed address", 403),
            status=403,
        )
    return HttpResponse(generate_latest(registry()), content_type=CONTENT_TYPE_LATEST)


# --- HTTP and WebSocket instrumentation -----------------------------------------------------


class HttpMetricsMiddleware:
    """Request latency by route pattern (``api/plays/<str:play_id>``, never the path)."""

    def __init__(self, get_response: Any):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        started = time.perf_counter()
        response = self.get_response(request)
        match = getattr(request, "resolver_match", None)
        route = _route(match.route or match.view_name or "<unnamed>") if match is not None else "<unmatched>"
        observe_http(route, request.method or "", response.status_code, time.perf_counter() - started)
        return response


def observe_http(route: str, method: str, status_code: int, seconds: float) -> None:
    """One request into the latency histogram: by route pattern, method and status class."""
    method = method if method in {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"} else "OTHER"
    HTTP_LATENCY.labels(route[:120], method, f"{status_code // 100}xx").observe(seconds)


def _route(pattern: str) -> str:
    """``api/flows/(?P<flow_id>[^/]+)/run$`` (a router's regex) → ``api/flows/<flow_id>/run``."""
    return re.sub(r"\(\?P<(\w+)>[^)]*\)", r"<\1>", pattern).replace("^", "").replace("$", "")


def _event_lag(text: str, now: float) -> float | None:
    if '"timestamp"' not in text or '"seq"' not in text:
        return None
    try:
        payload = json.loads(text)
        stamp = datetime.fromisoformat(payload["timestamp"].replace("Z", "+00:00"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    lag = now - stamp.timestamp()
    return max(0.0, lag) if lag < REPLAY_SECONDS else None


class WebSocketMetrics:
    """ASGI middleware: open WebSocket connections and the lag of the events they are sent."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if scope.get("type") != "websocket":
            return await self.app(scope, receive, send)
        accepted = False

        async def counting_send(message: dict[str, Any]) -> None:
            nonlocal accepted
            kind = message.get("type")
            if kind == "websocket.accept" and not accepted:
                accepted = True
                WS_CONNECTIONS.inc()
            elif kind == "websocket.send" and message.get("text"):
                lag = _event_lag(message["text"], time.time())
                if lag is not None:
                    WS_EVENT_LAG.observe(lag)
            elif kind == "websocket.close" and accepted:
                accepted = False
                WS_CONNECTIONS.dec()
            await send(message)

        try:
            return await self.app(scope, receive, counting_send)
        finally:
            if accepted:
                WS_CONNECTIONS.dec()


__all__ = [
    "PLAYS_STARTED",
    "PLAYS_TRIGGERED",
    "PLAYS_FINISHED",
    "STEP_DURATION",
    "START_LATENCY",
    "REAPED",
    "WS_CONNECTIONS",
    "WS_EVENT_LAG",
    "HTTP_LATENCY",
    "observe_http",
    "DatabaseCollector",
    "HttpMetricsMiddleware",
    "WebSocketMetrics",
    "clean_multiproc_dir",
    "events_committed",
    "flow_label",
    "metrics_view",
    "reaped",
]
