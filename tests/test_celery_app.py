"""The Celery app's handling of database connections in worker processes."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from celery.fixups.django import DjangoWorkerFixup

from flowplay import celery


class FakeConnection:
    alias = "default"

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def close(self) -> None:
        self.log.append("close")

    def close_pool(self) -> None:
        self.log.append("close_pool")


def test_task_boundaries_hand_connections_back_but_keep_the_pool(monkeypatch: Any) -> None:
    """Celery's fixup closed a prefork child's whole pool before and after every task, so each
    task opened a new PostgreSQL connection (celery/celery#10554); flowplay keeps the pool."""
    log: list[str] = []
    fixup = DjangoWorkerFixup(celery.app)
    monkeypatch.setattr(fixup, "_settings", SimpleNamespace(DATABASES={"default": {"OPTIONS": {"pool": {"min_size": 1}}}}))
    monkeypatch.setattr(fixup, "_is_prefork", lambda: True)
    monkeypatch.setattr(fixup._db.connections, "all", lambda initialized_only=False: [FakeConnection(log)])
    fixup.close_database()  # task_prerun / task_postrun
    fixup.close_database()
    assert log == ["close", "close"]


def test_a_child_closes_its_pool_when_it_exits(monkeypatch: Any) -> None:
    from django.db import connections

    log: list[str] = []
    monkeypatch.setattr(connections, "all", lambda initialized_only=False: [FakeConnection(log)])
    celery._close_the_childs_database_pool()
    assert log == ["close_pool"]
