"""ASGI entry point: HTTP through Django, WebSockets through Channels; on the same port, the
HTTP channels (``/hooks/…``) and the MCP server (``/mcp``) as ASGI apps of their own."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "flowplay.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from flowplay.bodylimit import BodyLimitMiddleware  # noqa: E402
from plays.metrics import WebSocketMetrics, clean_multiproc_dir  # noqa: E402
from plays.routing import websocket_urlpatterns  # noqa: E402
from plays.wsauth import ApiKeyOrSessionAuthMiddleware  # noqa: E402
from triggers.channels import PREFIX as HOOKS_PREFIX  # noqa: E402
from triggers.channels import hooks_app  # noqa: E402
from triggers.mcp import MCP_PATH, mcp_app  # noqa: E402


async def http_app(scope, receive, send):  # noqa: ANN001, ANN201
    """Requests that wait for a play (hooks, MCP tool calls) never enter Django's middleware,
    which would hold a thread for them (see triggers/channels.py)."""
    path = scope["path"]
    if path.startswith(HOOKS_PREFIX):
        return await hooks_app(scope, receive, send)
    if path == MCP_PATH or path.startswith(MCP_PATH + "/"):
        return await mcp_app(scope, receive, send)
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
