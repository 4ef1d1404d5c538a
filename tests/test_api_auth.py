from __future__ import annotations

from typing import Any

from django.core.management import call_command
from rest_framework.test import APIClient

from tenancy.models import ApiKey, User

from .conftest import PASSWORD


def test_login_sets_a_session_and_me_answers(alice: User) -> None:
    client = APIClient(enforce_csrf_checks=True)
    r = client.post("/api/auth/login", {"email": "ALICE@acme.test", "password": PASSWORD}, format="json")
    assert r.status_code == 200, r.content
    assert r.json() == {"id": str(alice.pk), "email": "alice@acme.test", "name": "Alice"}
    me = client.get("/api/auth/me").json()
    assert me["company"]["name"] == "Acme"


def test_wrong_password_is_401_with_the_error_body(alice: User) -> None:
    r = APIClient().post("/api/auth/login", {"email": "alice@acme.test", "password": "nope"}, format="json")
    assert r.status_code == 401
    assert r.json()["error"] == "UNAUTHORIZED"


def test_anonymous_requests_are_401(anon: APIClient, db: Any) -> None:
    for path in ("/api/flows", "/api/plays", "/api/auth/me", "/api/auth/api-keys"):
        r = anon.get(path)
        assert r.status_code == 401, path
        assert r.json()["error"] == "UNAUTHORIZED"


def test_cookie_requests_need_the_csrf_token(alice: User) -> None:
    client = APIClient(enforce_csrf_checks=True)
    client.post("/api/auth/login", {"email": "alice@acme.test", "password": PASSWORD}, format="json")
    r = client.post("/api/flows", {"name": "x", "layers": []}, format="json")
    assert r.status_code == 403
    assert r.json()["error"] == "FORBIDDEN"
    token = client.cookies["csrftoken"].value
    r = client.post("/api/flows", {"name": "x", "layers": []}, format="json", HTTP_X_CSRFTOKEN=token)
    assert r.status_code == 201, r.content


def test_api_keys_are_shown_once_stored_hashed_and_revocable(api: APIClient, alice: User) -> None:
    r = api.post("/api/auth/api-keys", {"name": "ci", "scopes": ["flows"]}, format="json")
    assert r.status_code == 201
    created = r.json()
    token = created["token"]
    assert set(created) == {"id", "name", "token", "scopes", "issuedAt"}
    key = ApiKey.objects.get(pk=created["id"])
    assert token not in key.token_hash and len(key.token_hash) == 64
    listed = api.get("/api/auth/api-keys").json()
    assert "token" not in listed[0] and listed[0]["name"] == "ci"

    bearer = APIClient()
    bearer.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    assert bearer.get("/api/auth/me").json()["email"] == "alice@acme.test"
    # Bearer requests need no CSRF token.
    assert bearer.post("/api/flows", {"name": "by key", "layers": []}, format="json").status_code == 201
    assert api.get("/api/auth/api-keys").json()[0]["lastUsedAt"] is not None

    assert api.delete(f"/api/auth/api-keys/{created['id']}").status_code == 204
    assert bearer.get("/api/auth/me").status_code == 401


def test_logout_ends_the_session(alice: User) -> None:
    client = APIClient()
    client.post("/api/auth/login", {"email": "alice@acme.test", "password": PASSWORD}, format="json")
    assert client.post("/api/auth/logout").status_code == 204
    assert client.get("/api/auth/me").status_code == 401


def test_createsuperuser_noinput_lands_in_the_default_company(db: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("DJANGO_SUPERUSER_EMAIL", "admin@example.com")
    monkeypatch.setenv("DJANGO_SUPERUSER_USERNAME", "admin")
    monkeypatch.setenv("DJANGO_SUPERUSER_PASSWORD", "s3cret-pass")
    call_command("createsuperuser", interactive=False, verbosity=0)
    admin = User.objects.get(username="admin")
    assert admin.company.slug == "default"
    r = APIClient().post("/api/auth/login", {"email": "admin@example.com", "password": "s3cret-pass"}, format="json")
    assert r.status_code == 200


def test_health_needs_no_auth(anon: APIClient, db: Any) -> None:
    r = anon.get("/api/health")
    assert r.json()["database"] == "ok"
    assert set(r.json()) == {"status", "database", "broker"}
