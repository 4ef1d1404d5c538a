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


try:
    from drf_spectacular.extensions import OpenApiAuthenticationExtension

    class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
        """Documents ``Authorization: Bearer <token>`` in the OpenAPI schema."""

        target_class = "flows.auth.ApiKeyAuthentication"
        name = "apiKey"

        def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
            return {"type": "http", "scheme": "bearer", "description": "An API key from POST /api/auth/api-keys"}
except ImportError:  # pragma: no cover - drf-spectacular is a dependency
    pass
