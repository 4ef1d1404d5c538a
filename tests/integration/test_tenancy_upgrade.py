"""The move of Company, User, ApiKey and AuditEntry to ``tenancy`` (AUTH_USER_MODEL included)
is safe for databases made before it and for fresh ones.

- a fresh database migrates from zero, and the models then match the migrations;
- a database migrated and filled by the code just before the move (taken from git: the parent
  of the commit that added tenancy/migrations/0001_initial.py) migrates forward with every row
  and foreign key intact: the same users log in with the same password and API key, their
  permissions (through content types that changed app) still hold, the admin's log still
  points at them.

On the database the environment names (SQLite by default; PostgreSQL when DATABASE_URL is
set, on a database of its own that the test drops).
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PYTHON = str(ROOT / ".venv/bin/python")

SEED = r'''
import json
from django.contrib.admin.models import ADDITION, LogEntry
from django.contrib.auth.models import Group, Permission
from django.contrib.contenttypes.models import ContentType
from flows.audit import record
from flows.models import ApiKey, Company, Flow, Flowlet, User
from plays.models import Play

acme = Company.objects.create(name="Acme", slug="acme")
alice = User.objects.create_user("alice", "Alice@Example.com", "pw-alice-123", company=acme)
key, token = ApiKey.issue(alice, "ci", ["read", "run"])
child, _ = ApiKey.issue(alice, "child", ["read"], parent=key)
flow = Flow.objects.create(company=acme, name="F", permanent_id="f")
Flowlet.objects.create(flow=flow, ref="a", app_id="set-variable", index=0)
flow.snapshot()
play, _ = Play.trigger(flow, {"x": 1}, user=alice, start=False)
entry = record(alice, "play.triggered", play)
# A second user with a role (alice, with none, is a member: MemberBackend).
carol = User.objects.create_user("carol", "carol@example.com", "pw-carol-123", company=acme)
ops = Group.objects.create(name="Ops")
ops.permissions.add(Permission.objects.get(content_type__app_label="flows", codename="view_user"))
carol.groups.add(ops)
carol.user_permissions.add(Permission.objects.get(content_type__app_label="flows", codename="change_apikey"))
log = LogEntry.objects.create(user=alice, content_type=ContentType.objects.get_for_model(User), object_id=str(alice.pk),
                              object_repr="alice", action_flag=ADDITION)
types = {m: ContentType.objects.get(app_label="flows", model=m).pk for m in ["company", "user", "apikey", "auditentry"]}
print(json.dumps({"company": acme.pk, "user": alice.pk, "key": key.pk, "child": child.pk, "token": token,
                  "flow": flow.pk, "play": play.pk, "entry": entry.pk, "log": log.pk, "types": types}))
'''

CHECK = r'''
import json, os
from django.contrib.admin.models import LogEntry
from django.contrib.contenttypes.models import ContentType
from django.db import IntegrityError, connection, transaction
from django.db.models import ProtectedError
from django.db.migrations.recorder import MigrationRecorder
from django.test import Client
from flows.models import Flow
from plays.models import Play
from tenancy.auth import authenticate_by_login
from tenancy.models import ApiKey, AuditEntry, Company, User

seed = json.loads(os.environ["SEED"])
acme = Company.objects.get(pk=seed["company"])
alice = User.objects.get(pk=seed["user"])
assert alice.company == acme and alice.email.lower() == "alice@example.com"
assert authenticate_by_login(None, "alice@example.com", "pw-alice-123") == alice
assert authenticate_by_login(None, "alice@example.com", "wrong") is None
answer = Client().post("/api/auth/login", {"email": "alice@example.com", "password": "pw-alice-123"},
                       content_type="application/json")
assert answer.status_code == 200, answer.content
key = ApiKey.lookup(seed["token"])
assert key is not None and key.pk == seed["key"] and key.user == alice and key.scopes == ["read", "run"]
child = ApiKey.objects.get(pk=seed["child"])
assert child.parent == key and child.user == alice
listed = Client().get("/api/plays", HTTP_AUTHORIZATION="Bearer " + seed["token"])
assert listed.status_code == 200 and [p["id"] for p in listed.json()["data"]] == [seed["play"]], listed.content
flow = Flow.objects.get(pk=seed["flow"])
play = Play.objects.get(pk=seed["play"])
assert flow.company == acme and play.company == acme and play.flow == flow and play.triggered_by == alice
entry = AuditEntry.objects.get(pk=seed["entry"])
assert entry.actor == alice and entry.company == acme and entry.object_id == play.pk
# Permissions given on the moved models' content types, directly and through a group.
carol = User.objects.get(username="carol")
assert carol.has_perm("tenancy.view_user") and carol.has_perm("tenancy.change_apikey")
assert not carol.has_perm("tenancy.change_user")
for model, pk in seed["types"].items():
    assert ContentType.objects.get(app_label="tenancy", model=model).pk == pk
assert not ContentType.objects.filter(app_label="flows", model__in=list(seed["types"])).exists()
log = LogEntry.objects.get(pk=seed["log"])
assert log.user == alice and log.get_edited_object() == alice
# The foreign keys are still enforced by the database, and by the ORM.
try:
    with transaction.atomic():
        ApiKey.objects.create(user_id=10**9, name="x", prefix="x", token_hash="x" * 64)
    raise AssertionError("a key of a missing user was stored")
except IntegrityError:
    pass
try:
    acme.delete()
    raise AssertionError("a company with users was deleted")
except ProtectedError:
    pass
bob = User.objects.create_user("bob", "bob@example.com", "pw-bob-123", company=acme)
assert ApiKey.issue(bob, "k")[0].user == bob and bob.pk > alice.pk
applied = MigrationRecorder(connection).applied_migrations()
assert ("tenancy", "0001_initial") in applied and ("flows", "0006_i14a_tenancy") in applied
print("ok", connection.vendor)
'''


def run(args: list[str], cwd: Path, env: dict[str, str], **extra: str) -> str:
    done = subprocess.run(args, cwd=cwd, env={**env, **extra}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(args)} in {cwd}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def database(tmp_path: Path) -> Any:
    """Environment for a manage.py on a database of its own (SQLite file, or a new PostgreSQL db)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "DJANGO_SETTINGS"))}
    env.update(FLOWPLAY_VAR_DIR=str(tmp_path / "var"), PYTHONPATH="")
    url = os.environ.get("DATABASE_URL", "")
    if not url:
        env["SQLITE_PATH"] = str(tmp_path / "upgrade.sqlite3")
        yield env
        return
    import psycopg

    name = (os.environ.get("FLOWPLAY_TEST_DB_NAME") or "test_flowplay") + "_upgrade"
    base, _, _ = url.rpartition("/")
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    env["DATABASE_URL"] = f"{base}/{name}"
    try:
        yield env
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_fresh_database_migrates_from_zero(database: dict[str, str]) -> None:
    out = run([PYTHON, "manage.py", "migrate", "--noinput"], ROOT, database)
    assert "tenancy.0001_initial... OK" in out and "flows.0006_i14a_tenancy... OK" in out
    assert "flows.0005" not in out  # replaced by tenancy.0001
    run([PYTHON, "manage.py", "makemigrations", "--check", "--dry-run"], ROOT, database)
    assert run([PYTHON, "manage.py", "migrate", "--noinput"], ROOT, database).strip().endswith("No migrations to apply.")


def test_a_database_of_the_code_before_the_move_migrates_forward_intact(database: dict[str, str], tmp_path: Path) -> None:
    added = git("log", "-1", "--format=%H", "--diff-filter=A", "--", "tenancy/migrations/0001_initial.py")
    if not added:
        pytest.fail("tenancy/migrations/0001_initial.py is not committed yet: the code before it is unknown")
    before = tmp_path / "before"
    before.mkdir()
    archive = subprocess.run(["git", "archive", f"{added}^"], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(before, filter="data")
    assert not (before / "tenancy").exists()

    run([PYTHON, "manage.py", "migrate", "--noinput"], before, database)
    seed = run([PYTHON, "manage.py", "shell", "-c", SEED], before, database).strip().splitlines()[-1]

    out = run([PYTHON, "manage.py", "migrate", "--noinput"], ROOT, database)
    # tenancy.0001 stands in for flows.0005, which the old database applied: nothing of it runs.
    assert "tenancy.0001_initial" not in out and "flows.0006_i14a_tenancy... OK" in out, out
    checked = run([PYTHON, "manage.py", "shell", "-c", CHECK], ROOT, database, SEED=seed)
    assert checked.strip().splitlines()[-1].startswith("ok "), checked
    run([PYTHON, "manage.py", "makemigrations", "--check", "--dry-run"], ROOT, database)
