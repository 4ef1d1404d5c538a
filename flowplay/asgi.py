"""ASGI entry point: HTTP through Django, WebSockets through Channels."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "flowplay.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from plays.metrics import WebSocketMetrics, clean_multiproc_dir  # noqa: E402
from plays.routing import websocket_urlpatterns  # noqa: E402
from plays.wsauth import ApiKeyOrSessionAuthMiddleware  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        # WebSocketMetrics inside the auth stack: SendBacklogMiddleware must see Daphne's own send.
        "websocket": ApiKeyOrSessionAuthMiddleware(WebSocketMetrics(URLRouter(websocket_urlpatterns))),
    }
)
clean_multiproc_dir()  # metrics of the processes of a previous start (plays/metrics.py)
