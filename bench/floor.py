"""The bench's API floor: a bare DRF view that inserts and commits one row.

Served by the same web server as the app (``python -m flowplay.serve --app
bench.floor:application``), it is what ``POST /run`` is compared with in the bench's
``floor`` scenario. Only the bench mounts it: this module's ASGI application is the app's,
with this module as its URLconf (``/bench/floor`` plus every URL of the app).
"""

from __future__ import annotations  # noqa: I001  (flowplay.asgi first: it sets Django up)

import json
from typing import Any

from flowplay.asgi import application  # first: sets Django up

from django.conf import settings  # noqa: E402
from django.db import connection, transaction
from django.urls import path
from django.utils import timezone
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

TABLE = "bench_floor"


def create_table() -> None:
    key = "BIGSERIAL PRIMARY KEY" if connection.vendor == "postgresql" else "INTEGER PRIMARY KEY"
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id {key}, at TEXT NOT NULL, body TEXT NOT NULL)")


def drop_table() -> None:
    with connection.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {TABLE}")


class FloorView(APIView):
    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]

    def post(self, request: Any) -> Response:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {TABLE} (at, body) VALUES (%s, %s)",
                [timezone.now().isoformat(), json.dumps(request.data)],
            )
        return Response({"ok": True}, status=201)


from flowplay.urls import handler400, handler404, handler500  # noqa: E402
from flowplay.urls import urlpatterns as app_urls  # noqa: E402

urlpatterns = [path("bench/floor", FloorView.as_view()), *app_urls]
__all__ = ["application", "handler400", "handler404", "handler500", "urlpatterns"]
settings.ROOT_URLCONF = __name__
