"""``/api/health`` (liveness) and ``/api/ready`` (readiness).

- Health answers from this process: a ``SELECT 1`` and the broker's last known state. The
  broker is probed in a background thread at most every ``BROKER_PROBE_SECONDS`` per
  process, never on the request path, so a load balancer polling it opens no broker
  connection per call. A broker that is down makes it ``degraded`` (still 200: restarting
  the web process would not bring the broker back); a database that is down makes it 503.
- Ready checks everything a play needs to run, now: the database, a fresh broker
  connection, and at least one worker seen in the last 30 s for every queue a play can be
  sent to (``default`` and the queues of enabled flows; see plays/workers.py). 503 with the
  details of what is missing otherwise.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import connection
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import permissions, serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from . import workers

log = logging.getLogger(__name__)

BROKER_PROBE_SECONDS = 15.0


def check_database() -> dict[str, Any]:
    started = time.monotonic()
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception as exc:  # noqa: BLE001  (any failure means "down")
        return {"status": "down", "error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"status": "ok", "ms": round((time.monotonic() - started) * 1000, 1)}


def check_broker(url: str | None = None, timeout: float = 2.0) -> dict[str, Any]:
    """Connect to the broker once (the readiness probe, and health's background probe)."""
    url = url if url is not None else settings.CELERY_BROKER_URL
    started = time.monotonic()
    try:
        if url.startswith("filesystem://"):
            options = settings.CELERY_BROKER_TRANSPORT_OPTIONS
            folder = Path(options.get("data_folder_in") or ".")
            if not folder.is_dir():
                raise OSError(f"broker folder {folder} is missing")
            probe = folder / f".ready-{threading.get_ident()}"
            probe.write_bytes(b"")
            probe.unlink()
        else:
            from kombu import Connection

            import flowplay.celery  # noqa: F401  (registers the transport aliases)

            with Connection(url, connect_timeout=timeout) as conn:
                conn.ensure_connection(
                    max_retries=1, interval_start=0, interval_step=0.2, interval_max=0.2, timeout=timeout
                )
    except Exception as exc:  # noqa: BLE001
        return {"status": "down", "error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"status": "ok", "ms": round((time.monotonic() - started) * 1000, 1)}


class BrokerProbe:
    """The broker's state as last seen by this process, refreshed in the background."""

    def __init__(self) -> None:
        self.status = "unknown"
        self.checked = 0.0
        self._lock = threading.Lock()
        self._running: threading.Thread | None = None

    def current(self, wait: float = 0.5) -> str:
        with self._lock:
            stale = time.monotonic() - self.checked > BROKER_PROBE_SECONDS
            if stale and (self._running is None or not self._running.is_alive()):
                self._running = threading.Thread(target=self._probe, name="flowplay-broker-probe", daemon=True)
                self._running.start()
            running = self._running
        if self.status == "unknown" and running is not None:
            running.join(wait)  # the first call in a process waits a little for a real answer
        return self.status

    def _probe(self) -> None:
        try:
            self.status = check_broker()["status"]
        finally:
            self.checked = time.monotonic()

    def reset(self) -> None:
        with self._lock:
            self.status, self.checked = "unknown", 0.0


broker_probe = BrokerProbe()


def health() -> tuple[dict[str, Any], int]:
    database = check_database()["status"]
    broker = broker_probe.current()
    status = "ok" if database == "ok" and broker == "ok" else "degraded"
    return {"status": status, "database": database, "broker": broker}, 200 if database == "ok" else 503


def ready() -> tuple[dict[str, Any], int]:
    database = check_database()
    broker = check_broker()
    checks: dict[str, Any] = {"database": database, "broker": broker}
    if database["status"] == "ok":
        now = timezone.now()
        live = workers.live_workers(now)
        consumers: dict[str, list[str]] = {}
        for worker in live:
            for queue in worker.queues:
                consumers.setdefault(queue, []).append(worker.name)
        queues = {}
        for queue in sorted(workers.wanted_queues() | set(consumers)):
            names = consumers.get(queue, [])
            queues[queue] = {"status": "ok" if names else "down", "workers": names}
        checks["workers"] = {
            "status": "ok" if all(q["status"] == "ok" for q in queues.values()) else "down",
            "seenWithinSeconds": workers.live_seconds(),
            "queues": queues,
        }
    else:
        checks["workers"] = {"status": "unknown", "error": "the database is down"}
    ok = all(check["status"] == "ok" for check in checks.values())
    return {"status": "ok" if ok else "down", **checks}, 200 if ok else 503


# GET /api/health: liveness, without a broker connection per call (``broker_probe``). No
# docstring: it would become the operation's description in the OpenAPI document.
class HealthView(APIView):

    permission_classes = [permissions.AllowAny]
    authentication_classes: list[Any] = []

    @extend_schema(responses={200: inline_serializer("Health", {
        "status": serializers.CharField(), "database": serializers.CharField(), "broker": serializers.CharField()})})
    def get(self, request: Any) -> Response:
        body, code = health()
        return Response(body, status=code)


class ReadyView(APIView):
    """``GET /api/ready``: 200 when plays can run now, 503 with what is missing."""

    permission_classes = [permissions.AllowAny]
    authentication_classes: list[Any] = []

    @extend_schema(
        responses={
            200: OpenApiResponse(OpenApiTypes.OBJECT, description="Database, broker and a live worker per queue."),
            503: OpenApiResponse(OpenApiTypes.OBJECT, description="Not ready; the checks that failed say why."),
        }
    )
    def get(self, request: Any) -> Response:
        body, code = ready()
        return Response(body, status=code)


__all__ = ["HealthView", "ReadyView", "health", "ready", "check_broker", "check_database", "broker_probe"]
