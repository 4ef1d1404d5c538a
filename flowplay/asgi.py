"""ASGI entry point: HTTP through Django, WebSockets through Channels."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "flowplay.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from flowplay.bodylimit import BodyLimitMiddleware  # noqa: E402
from plays.routing import websocket_urlpatterns  # noqa: E402
from plays.wsauth import ApiKeyOrSessionAuthMiddleware  # noqa: E402

application = ProtocolTypeRouter(
    {
        # Bodies over FLOWPLAY_MAX_BODY_BYTES are answered 413 before Django reads them.
        "http": BodyLimitMiddleware(django_asgi_app),
        "websocket": ApiKeyOrSessionAuthMiddleware(URLRouter(websocket_urlpatterns)),
    }
)
