"""WebSocket authentication: the session cookie, or ``?token=<api key>``."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from django.contrib.auth.models import AnonymousUser

from flows.models import ApiKey


@database_sync_to_async
def user_for_token(token: str) -> Any:
    key = ApiKey.lookup(token)
    return key.user if key is not None else AnonymousUser()


class TokenMiddleware:
    def __init__(self, inner: Any):
        self.inner = inner

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        query = parse_qs(scope.get("query_string", b"").decode(errors="replace"))
        token = (query.get("token") or [""])[0]
        if token:
            scope = dict(scope, user=await user_for_token(token))
        return await self.inner(scope, receive, send)


def ApiKeyOrSessionAuthMiddleware(inner: Any) -> Any:  # noqa: N802 (a middleware factory)
    # The token, when given, wins over the cookie: TokenMiddleware runs after the session one.
    return AuthMiddlewareStack(TokenMiddleware(inner))
