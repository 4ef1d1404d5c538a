"""WebSocket authentication and the send-buffer probe of ``/api/ws``.

Credentials are the session cookie or ``?token=<api key>``; a token, when given, wins over
the cookie (a bad token is refused even beside a valid session). Cookie-authenticated
handshakes coming from a browser page must come from the same origin (or one of
``CSRF_TRUSTED_ORIGINS``): a browser sends the cookie with a WebSocket handshake from any
page of the same site, so without this check another page on the same host could read a
logged-in user's events (cross-site WebSocket hijacking). Non-browser clients send no
``Origin`` and are not concerned.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth.models import AnonymousUser

from tenancy.models import ApiKey

# Scope keys this module adds (ASGI allows extension keys).
API_KEY_ID = "flowplay.api_key_id"
API_KEY_SCOPES = "flowplay.api_key_scopes"
SEND_BACKLOG = "flowplay.send_backlog"


@database_sync_to_async
def _key_for_token(token: str) -> ApiKey | None:
    return ApiKey.lookup(token)


class TokenMiddleware:
    def __init__(self, inner: Any):
        self.inner = inner

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        query = parse_qs(scope.get("query_string", b"").decode(errors="replace"))
        token = (query.get("token") or [""])[0]
        if token:
            key = await _key_for_token(token)
            scope = dict(
                scope,
                user=key.user if key is not None else AnonymousUser(),
                **{
                    API_KEY_ID: key.pk if key is not None else None,
                    API_KEY_SCOPES: list(key.scopes) if key is not None else [],
                },
            )
        return await self.inner(scope, receive, send)


class SendBacklogMiddleware:
    """Give the consumer a way to see how many bytes wait in its connection's send buffer.

    Daphne hands every message to Twisted, whose transport buffers without limit when the
    client reads slower than we write; ASGI has no back-pressure for WebSocket sends. Daphne
    passes ``send`` as ``partial(server.handle_reply, protocol)``, so the protocol and its
    transport are reachable here; the count is Twisted's own bookkeeping of unwritten bytes.
    Under another server the probe is absent and the consumer does not throttle.
    """

    def __init__(self, inner: Any):
        self.inner = inner

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        probe = _backlog_probe(send)
        if probe is not None:
            scope = dict(scope, **{SEND_BACKLOG: probe})
        return await self.inner(scope, receive, send)


def _backlog_probe(send: Any) -> Callable[[], int] | None:
    if not isinstance(send, functools.partial) or not send.args:
        return None
    transport = getattr(send.args[0], "transport", None)
    if transport is None or not hasattr(transport, "dataBuffer") or not hasattr(transport, "_tempDataLen"):
        return None

    def backlog() -> int:
        if not getattr(transport, "connected", False):
            return 0
        return len(transport.dataBuffer) - getattr(transport, "offset", 0) + transport._tempDataLen

    return backlog


def origin_allowed(scope: dict[str, Any]) -> bool:
    """False for a cookie-authenticated handshake from a browser page of another origin."""
    if scope.get(API_KEY_ID):
        return True
    headers = dict(scope.get("headers") or [])
    origin = headers.get(b"origin", b"").decode("latin1")
    if not origin:
        return True
    if origin in getattr(settings, "CSRF_TRUSTED_ORIGINS", []):
        return True
    host = headers.get(b"host", b"").decode("latin1")
    parts = urlsplit(origin)
    return bool(host) and parts.netloc == host and parts.scheme in ("http", "https")


def ApiKeyOrSessionAuthMiddleware(inner: Any) -> Any:  # noqa: N802 (a middleware factory)
    # TokenMiddleware runs inside the session one, so its user replaces the cookie's.
    return SendBacklogMiddleware(AuthMiddlewareStack(TokenMiddleware(inner)))
