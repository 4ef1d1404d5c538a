"""Logging in by email, and bearer API-key authentication for DRF and the WebSocket."""

from __future__ import annotations

from typing import Any

from rest_framework import authentication, exceptions

from .models import ApiKey, User


def authenticate_by_login(request: Any, login: str, password: str) -> Any:
    """The user whose email (case-insensitive) or else username is ``login``, if ``password`` is theirs.

    The one login of both ``POST /api/auth/login`` and the login page. It takes as long for an
    unknown login as for a known one: Django's backend runs the password hasher once in both
    cases (for an unknown user on a throwaway password), so the answer's time does not tell
    which emails have an account.
    """
    from django.contrib.auth import authenticate

    login = (login or "").strip()
    user = User.objects.filter(email__iexact=login).first() if login else None
    # Unknown as an email: Django's backend looks the login up as a username, which is the
    # fallback, and hashes the password whether it finds one or not.
    username = user.get_username() if user is not None else login
    return authenticate(request, username=username, password=password)


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

        target_class = "tenancy.auth.ApiKeyAuthentication"
        name = "apiKey"

        def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
            return {"type": "http", "scheme": "bearer", "description": "An API key from POST /api/auth/api-keys"}
except ImportError:  # pragma: no cover - drf-spectacular is a dependency
    pass
