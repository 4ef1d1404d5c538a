"""array-filter/map, send-mail, kv-*, router branches, GET /api/modules and docs/modules.md."""

from __future__ import annotations

import base64
import threading
from typing import Any

import pytest
from django.core import mail
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, connections

from flows import modules
from flows.models import KV, Flow
from flows.modules import RunContext, StepError
from plays.models import Play
from tenancy.models import Company, User

from .conftest import client_for
from .factories import check_module, make_flow, run_module


def fails(app_id: str, args: Any, ctx: RunContext | None = None) -> StepError:
    with pytest.raises(StepError) as info:
        run_module(app_id, args, ctx)
    return info.value


INVOICES = [{"id": "a", "amount": 50}, {"id": "b", "amount": 1500}, {"id": "c", "amount": 900}]


# --- where a module lives ----------------------------------------------------------------

FAMILIES = {"base64": "codecs", "url": "codecs", "json": "json_", "kv": "kv", "array": "arrays", "aggregator": "iterator"}


def test_every_module_lives_in_the_file_named_after_its_app_id() -> None:
    for app_id, module in modules.REGISTRY.items():
        if app_id.startswith("test-"):
            continue
        family = FAMILIES.get(app_id.split("-")[0], app_id.replace("-", "_"))
        assert type(module).__module__ == f"flows.modules.{family}", app_id


# --- array-filter / array-map ---------------------------------------------------------


def test_array_filter_keeps_items_whose_condition_is_true() -> None:
    out = run_module("array-filter", {"items": INVOICES, "condition": "{{ $prev.item.amount >= 900 }}"})
    assert out == {"items": [INVOICES[1], INVOICES[2]], "count": 2}


def test_array_filter_reads_the_item_under_its_own_ref_and_data() -> None:
    args = {"items": INVOICES, "condition": "{{ $prev.big.item.amount > $prev.data.limit }}", "data": {"limit": 1000}}
    assert run_module("array-filter", args, RunContext(ref="big"))["items"] == [INVOICES[1]]
    assert run_module("array-filter", {"items": [1, 2, 3, 4], "condition": "{{ $prev.index % 2 == 0 }}"})["items"] == [1, 3]


def test_array_map_evaluates_the_expression_per_item_keeping_json_types() -> None:
    out = run_module("array-map", {"items": INVOICES, "expression": "{{ $prev.item.amount * 2 }}"})
    assert out == {"items": [100, 3000, 1800], "count": 3}
    shaped = run_module(
        "array-map",
        {"items": INVOICES, "expression": {"ref": "{{ $prev.item.id | upper }}", "n": "{{ $prev.index + 1 }}/{{ $prev.total }}"}},
    )
    assert shaped["items"][0] == {"ref": "A", "n": "1/3"}
    assert run_module("array-map", {"items": [], "expression": "{{ $prev.item }}"}) == {"items": [], "count": 0}


def test_array_modules_report_bad_args_and_runtime_errors() -> None:
    assert "condition" in check_module("array-filter", {"items": [], "condition": "{{ $prev.item. }}"})
    assert "items" in check_module("array-map", {"items": 3, "expression": "x"})
    assert "expression" in check_module("array-map", {"items": []})
    assert check_module("array-map", {"items": "{{ $prev.fetch.body }}", "expression": "{{ $prev.item.id }}"}) == {}
    error = fails("array-map", {"items": [1, 0], "expression": "{{ 1 / $prev.item }}"})
    assert error.code == "EXPRESSION_ERROR" and "item 1" in error.message and not error.retryable
    assert fails("array-filter", {"items": "nope", "condition": "true"}).code == "INVALID_INPUT"


def test_array_map_in_a_flow_reads_earlier_steps_through_data(api: Any, drain: Any) -> None:
    flow = make_flow(api, [
        {"ref": "src", "appId": "var", "args": {"values": {"list": INVOICES, "rate": 2}}},
        {"ref": "big", "appId": "array-filter",
         "args": {"items": "{{ $prev.src.list }}", "condition": "{{ $prev.big.item.amount > 100 }}"}},
        {"ref": "ids", "appId": "array-map",
         "args": {"items": "{{ $prev.big.items }}", "data": {"rate": "{{ $prev.src.rate }}"},
                  "expression": "{{ $prev.item.id }}:{{ $prev.item.amount * $prev.data.rate }}"}},
    ])
    play = api.post(f"/api/flows/{flow['id']}/run", {"args": {}}, format="json").json()
    drain()
    layers = api.get(f"/api/plays/{play['playId']}/layers").json()
    assert [layer["state"] for layer in layers] == ["DONE", "DONE", "DONE"]
    assert layers[2]["out"] == {"items": ["b:3000", "c:1800"], "count": 2}


# --- router -----------------------------------------------------------------------------


def test_router_picks_the_first_true_route_and_true_is_a_catch_all() -> None:
    routes = [{"condition": "false", "label": "small"}, {"condition": True, "label": "big"}, {"condition": "true", "label": "x"}]
    assert run_module("router", {"routes": routes}) == {"route": "big"}
    assert run_module("router", {"routes": [{"condition": "0", "label": "a"}, {"condition": "true", "label": "other"}]}) == {"route": "other"}
    assert "routes" in check_module("router", {"routes": []})


def test_router_branches_not_taken_end_filtered(api: Any, drain: Any) -> None:
    def branch(label: str) -> list[dict[str, Any]]:
        return [{"leftValue": "{{ $prev.route.route }}", "operator": "eq", "rightValue": label}]

    flow = make_flow(api, [
        {"ref": "route", "appId": "router", "args": {"routes": [
            {"condition": "{{ $prev.args.amount >= 1000 }}", "label": "large"},
            {"condition": "true", "label": "small"},
        ]}},
        {"ref": "onLarge", "appId": "var", "args": {"values": {"large": True}}, "filters": branch("large")},
        {"ref": "onSmall", "appId": "var", "args": {"values": {"small": True}}, "filters": branch("small")},
    ])
    for amount, states in ((5000, ["DONE", "DONE", "FILTERED"]), (10, ["DONE", "FILTERED", "DONE"])):
        play = api.post(f"/api/flows/{flow['id']}/run", {"args": {"amount": amount}}, format="json").json()
        drain()
        layers = api.get(f"/api/plays/{play['playId']}/layers").json()
        assert [layer["state"] for layer in layers] == states


# --- send-mail --------------------------------------------------------------------------


PDF_B64 = base64.b64encode(b"%PDF-1.4 fake").decode()


def test_send_mail_sends_text_html_cc_and_attachments_through_the_backend() -> None:
    out = run_module("send-mail", {
        "to": ["ann@example.com", "Bob <bob@example.com>"],
        "cc": "carol@example.com",
        "subject": "Invoices",
        "body": {"text": "2 large invoices", "html": "<p>2 <b>large</b> invoices</p>"},
        "attachments": [
            {"filename": "invoice.pdf", "content": PDF_B64, "contentType": "application/pdf"},
            {"filename": "download.pdf", "content": {"statusCode": 200, "body": PDF_B64}, "contentType": "application/pdf"},
            {"filename": "notes.txt", "content": "hello", "encoding": "text", "contentType": "text/plain"},
        ],
    })
    assert len(mail.outbox) == 1
    message = mail.outbox[0]
    assert out == {"messageId": message.extra_headers["Message-ID"], "recipients": 3}
    assert out["messageId"].startswith("<") and out["messageId"].endswith(">")
    assert message.to == ["ann@example.com", "Bob <bob@example.com>"] and message.cc == ["carol@example.com"]
    assert message.subject == "Invoices" and message.body == "2 large invoices"
    assert message.alternatives[0][0] == "<p>2 <b>large</b> invoices</p>"
    assert message.alternatives[0][1] == "text/html"
    assert [(name, data, kind) for name, data, kind in message.attachments] == [
        ("invoice.pdf", b"%PDF-1.4 fake", "application/pdf"),
        ("download.pdf", b"%PDF-1.4 fake", "application/pdf"),
        ("notes.txt", "hello", "text/plain"),
    ]
    assert message.from_email == "flowplay@localhost"
    assert "Message-ID: " + out["messageId"] in message.message().as_string()


def test_send_mail_splits_an_address_list_as_a_header_would() -> None:
    out = run_module("send-mail", {"to": '"Doe, Jane" <jane@x.test>, bob@x.test', "subject": "s", "body": "b"})
    assert mail.outbox[0].to == ['"Doe, Jane" <jane@x.test>', "bob@x.test"] and out["recipients"] == 2
    assert check_module("send-mail", {"to": "x\nBcc: y@z.test", "subject": "s", "body": "b"}) == {
        "to": ["must not contain line breaks"]
    }
    assert fails("send-mail", {"to": "a@x.test\r\nBcc: y@z.test", "subject": "s", "body": "b"}).code == "INVALID_INPUT"


def test_send_mail_with_only_html_gets_a_text_part() -> None:
    run_module("send-mail", {"to": "a@example.com", "subject": "s", "body": {"html": "<h1>Hi</h1>"}})
    assert mail.outbox[0].body == "Hi"


def test_send_mail_validation() -> None:
    assert "to" in check_module("send-mail", {"to": "not an address", "subject": "s", "body": "b"})
    assert "subject" in check_module("send-mail", {"to": "a@b.example", "subject": "a\nBcc: x@y.example", "body": "b"})
    assert "body" in check_module("send-mail", {"to": "a@b.example", "subject": "s"})
    assert check_module("send-mail", {"to": "{{ $prev.args.email }}", "subject": "s", "body": "{{ $prev.t.result }}"}) == {}
    assert fails("send-mail", {"to": [], "subject": "s", "body": "b"}).code == "INVALID_INPUT"
    bad = {"to": "a@b.example", "subject": "s", "body": "b", "attachments": [{"filename": "x", "content": "***"}]}
    assert fails("send-mail", bad).code == "INVALID_INPUT"
    assert mail.outbox == []


def test_send_mail_backend_failure_is_a_retryable_step_error(settings: Any) -> None:
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", 9  # nothing listens on discard
    error = fails("send-mail", {"to": "a@b.example", "subject": "s", "body": "b"})
    assert error.code == "MAIL_ERROR" and error.retryable


# --- kv ---------------------------------------------------------------------------------


@pytest.fixture
def ctx(acme: Company) -> RunContext:
    flow = Flow.objects.create(company=acme, name="f", permanent_id="f")
    return RunContext(company_id=acme.id, flow_id=flow.id, ref="kv")


def test_kv_set_then_get_and_missing_keys(ctx: RunContext) -> None:
    assert run_module("kv-get", {"key": "k"}, ctx) == {"value": None, "found": False}
    assert run_module("kv-get", {"key": "k", "default": 7}, ctx) == {"value": 7, "found": False}
    assert run_module("kv-set", {"key": "k", "value": {"a": [1]}}, ctx) == {"value": {"a": [1]}, "found": False}
    assert run_module("kv-set", {"key": "k", "value": "v2"}, ctx) == {"value": "v2", "found": True}
    assert run_module("kv-get", {"key": "k"}, ctx) == {"value": "v2", "found": True}
    assert KV.objects.get(key="k").flow_id is None


def test_kv_scopes_are_separate_per_flow_and_per_company(ctx: RunContext, globex: Company) -> None:
    run_module("kv-set", {"key": "k", "value": "company"}, ctx)
    run_module("kv-set", {"key": "k", "value": "flow", "scope": "flow"}, ctx)
    other_flow = Flow.objects.create(company_id=ctx.company_id, name="g", permanent_id="g")
    other = RunContext(company_id=ctx.company_id, flow_id=other_flow.id)
    assert run_module("kv-get", {"key": "k"}, ctx)["value"] == "company"
    assert run_module("kv-get", {"key": "k", "scope": "flow"}, ctx)["value"] == "flow"
    assert run_module("kv-get", {"key": "k", "scope": "flow"}, other)["found"] is False
    assert run_module("kv-get", {"key": "k"}, other)["value"] == "company"
    stranger = RunContext(company_id=globex.id, flow_id="")
    assert run_module("kv-get", {"key": "k"}, stranger)["found"] is False


def test_kv_increment_and_append(ctx: RunContext) -> None:
    assert run_module("kv-set", {"key": "n", "increment": 1}, ctx) == {"value": 1, "found": False}
    assert run_module("kv-set", {"key": "n", "increment": "2.5"}, ctx) == {"value": 3.5, "found": True}
    assert run_module("kv-append", {"key": "l", "value": {"id": 1}}, ctx) == {"value": [{"id": 1}], "found": False, "count": 1}
    run_module("kv-append", {"key": "l", "value": 2}, ctx)
    assert run_module("kv-append", {"key": "l", "value": 3, "maxItems": 2}, ctx) == {"value": [2, 3], "found": True, "count": 2}
    run_module("kv-set", {"key": "s", "value": "text"}, ctx)
    assert fails("kv-set", {"key": "s", "increment": 1}, ctx).code == "INVALID_INPUT"
    assert fails("kv-append", {"key": "s", "value": 1}, ctx).code == "INVALID_INPUT"
    assert run_module("kv-get", {"key": "s"}, ctx)["value"] == "text"  # the failed writes changed nothing


def test_kv_validation() -> None:
    assert "increment" in check_module("kv-set", {"key": "k", "value": 1, "increment": 1})
    assert "value" in check_module("kv-set", {"key": "k"})
    assert "key" in check_module("kv-get", {"key": ""})
    assert "scope" in check_module("kv-get", {"key": "k", "scope": "play"})
    assert "value" in check_module("kv-append", {"key": "k"})
    assert check_module("kv-set", {"key": "{{ $prev.args.k }}", "increment": "{{ $prev.args.n }}", "scope": "flow"}) == {}


def _in_thread(func: Any) -> Any:
    """Run func on a thread of its own (and its own database connection); return its result."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(func())
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)
        finally:
            connections.close_all()

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(300)
    if errors:
        raise errors[0]
    return result[0]


@pytest.fixture
def concurrent_db(transactional_db: Any, tmp_path: Any) -> Any:
    """A database that threads can write at once.

    PostgreSQL's test database is one already. SQLite's in-memory test database is shared
    between threads in shared-cache mode, which fails concurrent writers at once ("database
    table is locked") where the embedded default's file database queues them on the busy
    timeout; so on SQLite, threads started by the test use a migrated file database instead.
    """
    settings_dict = connections.settings["default"]
    if connection.vendor != "sqlite" or not connection.is_in_memory_db():
        yield
        return
    old_name = settings_dict["NAME"]
    settings_dict["NAME"] = str(tmp_path / "concurrent.sqlite3")
    try:
        _in_thread(lambda: call_command("migrate", verbosity=0))
        yield
    finally:
        settings_dict["NAME"] = old_name


def test_kv_counter_and_append_are_exact_with_20_concurrent_plays(concurrent_db: Any, no_enqueue: list[str]) -> None:
    from plays import runner

    def setup() -> tuple[str, list[str]]:
        acme = Company.objects.create(name="Acme", slug="acme")
        alice = User.objects.create_user("alice", "alice@acme.test", "pw", company=acme)
        api = client_for(alice)
        flow = make_flow(api, [
            {"ref": "count", "appId": "kv-set", "args": {"key": "plays", "increment": 1, "scope": "flow"}},
            {"ref": "log", "appId": "kv-append", "args": {"key": "seen", "value": "{{ $playId }}"}},
        ])
        runs = [api.post(f"/api/flows/{flow['id']}/run", {"args": {}}, format="json") for _ in range(20)]
        return flow["id"], [r.json()["playId"] for r in runs]

    flow_id, play_ids = _in_thread(setup)
    assert len(set(play_ids)) == 20 and sorted(no_enqueue) == sorted(play_ids)
    barrier = threading.Barrier(20)
    errors: list[BaseException] = []

    def play(play_id: str) -> None:
        try:
            barrier.wait()
            runner.run(play_id)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=play, args=(play_id,)) for play_id in play_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []

    def results() -> tuple[set[str], Any, Any]:
        states = set(Play.objects.filter(pk__in=play_ids).values_list("state", flat=True))
        counter = KV.objects.get(key="plays", flow_id=flow_id).plain_value
        seen = KV.objects.get(key="seen", flow__isnull=True).plain_value
        return states, counter, seen

    states, counter, seen = _in_thread(results)
    assert states == {"DONE"}
    assert counter == 20
    assert sorted(seen) == sorted(play_ids)


# --- GET /api/modules and docs/modules.md --------------------------------------------------


def test_module_list_needs_authentication(anon: Any) -> None:
    assert anon.get("/api/modules").status_code == 401


def test_module_list_lists_every_registered_module_with_schemas(api: Any) -> None:
    response = api.get("/api/modules")
    assert response.status_code == 200
    body = response.json()
    assert [m["appId"] for m in body] == sorted(modules.REGISTRY)
    kv_set = next(m for m in body if m["appId"] == "kv-set")
    assert kv_set["name"] == "KV set" and "increment" in kv_set["description"]
    assert set(kv_set["args"]["properties"]) == {"key", "value", "increment", "scope"}
    assert kv_set["out"]["required"] == ["value", "found"]


def test_module_list_is_in_the_openapi_schema(api: Any) -> None:
    schema = api.get("/api/schema", HTTP_ACCEPT="application/json").json()
    operation = schema["paths"]["/api/modules"]["get"]
    assert operation["operationId"] == "modules_list"
    assert "200" in operation["responses"]


def test_docs_modules_md_is_up_to_date() -> None:
    # Fails when a module changes without `python manage.py modules_doc` being rerun.
    call_command("modules_doc", "--check")


def test_modules_doc_check_fails_on_a_stale_file(tmp_path: Any) -> None:
    stale = tmp_path / "modules.md"
    stale.write_text("# Modules\n")
    with pytest.raises(CommandError, match="stale"):
        call_command("modules_doc", "--check", "--output", str(stale))
    call_command("modules_doc", "--output", str(stale))
    text = stale.read_text()
    for app_id in modules.REGISTRY:
        assert f"## {app_id}\n" in text
    call_command("modules_doc", "--check", "--output", str(stale))


def test_email_url_configures_smtp() -> None:
    import os
    import subprocess
    import sys

    code = (
        "import django; django.setup(); from django.conf import settings as s; "
        "print(s.EMAIL_BACKEND, s.EMAIL_HOST, s.EMAIL_PORT, s.EMAIL_HOST_USER, s.EMAIL_HOST_PASSWORD, s.EMAIL_USE_SSL)"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "flowplay.settings", "EMAIL_URL": "smtps://me%40x.test:p%3Ass@mail.test"}
    env.pop("EMAIL_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["django.core.mail.backends.smtp.EmailBackend", "mail.test", "465", "me@x.test", "p:ss", "True"]
    env["EMAIL_URL"] = "http://mail.test"
    failed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert failed.returncode != 0 and "EMAIL_URL must look like" in failed.stderr
