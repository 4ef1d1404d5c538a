"""Bearer API-key authentication for DRF and the WebSocket."""

from __future__ import annotations

from typing import Any

from rest_framework import authentication, exceptions

from .models import ApiKey


class ApiKeyAuthentication(authentication.BaseAuthentication):
    """``Authorization: Bearer <token>``; a revoked or unknown token is refused at once."""

    keyword = "Bearer"

    def authenticate(self, request: Any) -> tuple[Any, ApiKey] | None:
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].lower() != self.keyword.lower().encode():
            return None
        if len(header) != 2:
            raise exceptions.AuthenticationFailed("Invalid Authorization header: expected 'Bearer <token>'")
        try:
            token = header[1].decode()
        except UnicodeDecodeError:
            raise exceptions.AuthenticationFailed("Invalid token") from None
        key = ApiKey.lookup(token)
        if key is None:
            raise exceptions.AuthenticationFailed("Invalid or revoked API key")
        return key.user, key

    def authenticate_header(self, request: Any) -> str:
        return self.keyword
