"""Shared fixtures: the personas alice and bob (one company) and charlie (another).

Tests call the Celery tasks' functions directly (``drain``) instead of running a worker;
the integration tests in ``tests/integration`` start the real processes.
"""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from tenancy.models import Company, User

PASSWORD = "correct horse battery staple"


@pytest.fixture(autouse=True)
def _fast_settings(settings: Any, tmp_path: Any) -> None:
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    settings.CELERY_TASK_ALWAYS_EAGER = False
    settings.REDIS_URL = ""
    # PBKDF2's 1M iterations per login or create_user cost more CPU than the rest of a test.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def acme(db: Any) -> Company:
    return Company.objects.create(name="Acme", slug="acme")


@pytest.fixture
def globex(db: Any) -> Company:
    return Company.objects.create(name="Globex", slug="globex")


@pytest.fixture
def alice(acme: Company) -> User:
    return User.objects.create_user("alice", "alice@acme.test", PASSWORD, company=acme, first_name="Alice")


@pytest.fixture
def bob(acme: Company) -> User:
    return User.objects.create_user("bob", "bob@acme.test", PASSWORD, company=acme, first_name="Bob")


@pytest.fixture
def charlie(globex: Company) -> User:
    return User.objects.create_user("charlie", "charlie@globex.test", PASSWORD, company=globex, first_name="Charlie")


def client_for(user: User) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


@pytest.fixture
def api(alice: User) -> APIClient:
    """alice's authenticated API client."""
    return client_for(alice)


@pytest.fixture
def bob_api(bob: User) -> APIClient:
    return client_for(bob)


@pytest.fixture
def charlie_api(charlie: User) -> APIClient:
    return client_for(charlie)


@pytest.fixture
def anon() -> APIClient:
    return APIClient()


@pytest.fixture
def no_enqueue(monkeypatch: Any) -> list[str]:
    """Capture run_play enqueues instead of sending them to a broker."""
    sent: list[str] = []
    from plays import tasks

    monkeypatch.setattr(tasks.run_play, "apply_async", lambda args, **kw: sent.append(args[0]))
    monkeypatch.setattr(tasks.release_flow, "delay", lambda flow_id: tasks.release_flow_slots(flow_id))
    return sent


@pytest.fixture
def drain(no_enqueue: list[str], django_capture_on_commit_callbacks: Any, monkeypatch: Any) -> Any:
    """Run every enqueued play to completion in this process, like a worker would.

    The test runs inside one transaction that is never committed; its on-commit callbacks
    (enqueueing the runner, publishing events) are captured and run when the test calls
    ``drain()`` or ``drain.flush()``, as a commit would run them - and, like a commit, only
    those of savepoints that were not rolled back.
    """
    from plays import runner, tasks

    iterations: list[int] = []
    monkeypatch.setattr(tasks.run_iteration, "apply_async", lambda args, **kw: iterations.append(args[0]))
    capture = [django_capture_on_commit_callbacks(execute=True)]
    capture[0].__enter__()

    def flush() -> None:
        """Run the callbacks registered so far (and those they register)."""
        capture[0].__exit__(None, None, None)
        capture[0] = django_capture_on_commit_callbacks(execute=True)
        capture[0].__enter__()

    def run_all(limit: int = 1000) -> int:
        n = 0
        flush()
        while (no_enqueue or iterations) and n < limit:
            if iterations:
                runner.run_iteration(iterations.pop(0))
            else:
                runner.run(no_enqueue.pop(0))
            flush()
            n += 1
        return n

    def step() -> None:
        """Run the next enqueued play once (a worker's one task), then what it committed."""
        flush()
        runner.run(no_enqueue.pop(0))
        flush()

    run_all.iterations = iterations  # type: ignore[attr-defined]
    run_all.flush = flush  # type: ignore[attr-defined]
    run_all.step = step  # type: ignore[attr-defined]
    yield run_all
    capture[0].__exit__(None, None, None)
