"""ASGI entry point: HTTP through Django, WebSockets through Channels; on the same port, the
HTTP channels (``/hooks/…``) and the MCP server (``/mcp``) as ASGI apps of their own."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "flowplay.settings")
django_asgi_app = get_asgi_application()

import time  # noqa: E402

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from flowplay.bodylimit import BodyLimitMiddleware  # noqa: E402
from flowplay.logs import bind, request_id_from  # noqa: E402
from plays.metrics import WebSocketMetrics, clean_multiproc_dir, observe_http  # noqa: E402
from plays.routing import websocket_urlpatterns  # noqa: E402
from plays.wsauth import ApiKeyOrSessionAuthMiddleware  # noqa: E402
from triggers.channels import PREFIX as HOOKS_PREFIX  # noqa: E402
from triggers.channels import hooks_app  # noqa: E402
from triggers.mcp import MCP_PATH, mcp_app  # noqa: E402


class Observed:
    """What Django's middleware gives its requests (an ``X-Request-ID`` bound to the log lines
    and answered back, the HTTP latency metric), for an ASGI app that bypasses it."""

    def __init__(self, app, route: str):  # noqa: ANN001
        self.app, self.route = app, route

    async def __call__(self, scope, receive, send):  # noqa: ANN001, ANN204
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = request_id_from(given)
        status = 500  # what the client gets if the app fails before it answers

        async def sending(message):  # noqa: ANN001, ANN202
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        started = time.perf_counter()
        with bind(requestId=request_id):
            try:
                await self.app(scope, receive, sending)
            finally:
                observe_http(self.route, scope.get("method", ""), status, time.perf_counter() - started)


observed_hooks = Observed(hooks_app, HOOKS_PREFIX.strip("/") + "/<slug>/<path>")
observed_mcp = Observed(mcp_app, MCP_PATH.strip("/"))


async def http_app(scope, receive, send):  # noqa: ANN001, ANN201
    """Requests that wait for a play (hooks, MCP tool calls) never enter Django's middleware,
    which would hold a thread for them (see triggers/channels.py)."""
    path = scope["path"]
    if path.startswith(HOOKS_PREFIX):
        return await observed_hooks(scope, receive, send)
    if path == MCP_PATH or path.startswith(MCP_PATH + "/"):
        return await observed_mcp(scope, receive, send)
    return await django_asgi_app(scope, receive, send)


application = ProtocolTypeRouter(
    {
        # Bodies over FLOWPLAY_MAX_BODY_BYTES are answered 413 before they are read (Django,
        # the hooks and MCP alike).
        "http": BodyLimitMiddleware(http_app),
        # WebSocketMetrics inside the auth stack: SendBacklogMiddleware must see Daphne's own send.
        "websocket": ApiKeyOrSessionAuthMiddleware(WebSocketMetrics(URLRouter(websocket_urlpatterns))),
    }
)
clean_multiproc_dir()  # metrics of the processes of a previous start (plays/metrics.py)
